"""One study in one MLflow experiment, end to end on the multi-node Ray cluster and a real ``mlflow
server`` (artifacts on the S3 server): pre-training registers its encoder once however often it is
rerun, the fine-tuning study tags each trial with its encoder's tags, and the report adds the
pre-training table and logs its files to the study run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from ray_jobs import tracking
from ray_jobs.finetune.config import FinetuneConfig, parse_sizes
from ray_jobs.finetune.study import run_study
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.driver import run_pretrain
from ray_jobs.report.build import ReportConfig, build_report
from tests.ray_jobs.tiny_data import write_tiny_dataset

pytestmark = pytest.mark.timeout(900)

STUDY = "e2e-study"


def test_pre_training_fine_tuning_and_report_of_a_study_share_one_experiment_on_a_real_server(
        ray_cluster, mlflow_server, tmp_path):
    uri = mlflow_server.uri
    pool, labelled = str(tmp_path / "pool"), str(tmp_path / "labelled")
    write_tiny_dataset(pool, patients=4, slices=8, size=32, source="tinyct", labelled=False)  # 32 slices
    write_tiny_dataset(labelled, patients=10, slices=4, size=32, source="tinylab", seed=5)  # as test_finetune_study
    tags = {"ctssl.stage": "pretrain", "ctssl.study": STUDY, "encoder": "byol-all", "reduction": "all"}
    cfg = PretrainConfig(method="byol", data=pool, storage=str(tmp_path / "runs"), experiment=f"{STUDY}-byol-all-1a2b",
                         backbone="test_resnet", batch_size=8, max_steps=2, checkpoint_every=2, tracking_uri=uri,
                         mlflow_experiment=STUDY, register_as=f"{STUDY}-byol-all", tags=tags,
                         method_options={"hidden_dim": 64, "out_dim": 32})
    res = run_pretrain(cfg)
    assert (res.registered_model, res.model_version) == (f"{STUDY}-byol-all", "1")
    again = run_pretrain(cfg)  # a restarted study driver: the same run, no second version
    assert (again.run_id, again.model_version) == (res.run_id, "1")

    cl = tracking.client(uri)
    exp_id = cl.get_experiment_by_name(STUDY).experiment_id
    assert cl.get_experiment_by_name(cfg.experiment) is None
    run = cl.get_run(res.run_id)
    assert run.info.experiment_id == exp_id and run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in tags} == tags and run.data.tags["registered_version"] == "1"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "tinyct" and json.loads(inp.dataset.profile)["rows"] == 32
    (version,) = cl.search_model_versions(f"name = '{STUDY}-byol-all'")
    assert version.run_id == res.run_id and version.source.rstrip("/").endswith("/encoder")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=cl.get_model_version_download_uri(f"{STUDY}-byol-all", "1"), dst_path=str(tmp_path / "dl"),
        tracking_uri=uri)
    assert (Path(local) / "encoder.pt").stat().st_size > 0

    fc = FinetuneConfig(data=labelled, storage=str(tmp_path / "tune"), experiment=STUDY,
                        encoders=["random", f"byol-all={res.checkpoint_path}"],
                        sizes=parse_sizes(samples_per_class="all"), folds=2, epochs=1, recipes=["1e-3:0"],
                        batch_size=8, tracking_uri=uri,
                        encoder_tags={"byol-all": {"ctssl.stage": "finetune", "method": "byol", "reduction": "all"}})
    study = run_study(fc)
    assert (study.trials, study.failed) == (4, 0)
    parent = cl.get_run(study.parent_run_id)
    assert parent.info.experiment_id == exp_id and parent.data.tags[tracking.TAG_STAGE] == "finetune"
    trials = cl.search_runs([exp_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{study.parent_run_id}'")
    by_encoder = {}
    for t in trials:
        by_encoder.setdefault(t.data.tags["encoder"], []).append(t.data.tags)
    assert sorted(by_encoder) == ["byol-all", "random"] and all(len(v) == 2 for v in by_encoder.values())
    for t in by_encoder["byol-all"]:
        assert (t["reduction"], t[tracking.TAG_STAGE], t["method"], t["size"]) == ("all", "finetune", "byol-all",
                                                                                    "all")
    assert all("reduction" not in t and t[tracking.TAG_STAGE] == "finetune" for t in by_encoder["random"])

    paths = build_report(ReportConfig(experiment=STUDY, out=str(tmp_path / "report"), tracking_uri=uri,
                                      log_to_run=True))
    md = Path(paths.markdown).read_text()
    section = md.split("## Pre-training")[1].split("\n## ")[0]
    assert "| byol-all | byol | all | 32 | 2 |" in section and "| random | none (baseline) |" in section
    logged = sorted(f.path for f in cl.list_artifacts(study.parent_run_id, "report"))
    assert "report/report.md" in logged and "report/auc_vs_pretrain_time.png" in logged

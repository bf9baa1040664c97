"""A tiny fine-tuning study on the multi-node Ray cluster, tracked by a real ``mlflow server`` whose
artifacts live on the S3 server, then the report built from that server alone."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlflow
import pytest
import torch

from ray_jobs import tracking
from ray_jobs.cli import main
from ray_jobs.finetune.config import FinetuneConfig, parse_sizes
from ray_jobs.finetune.study import run_study
from ray_jobs.report.build import ReportConfig, build_report
from tests.ray_jobs.servers import list_keys
from tests.ray_jobs.tiny_data import write_tiny_dataset


@pytest.fixture(scope="module")
def labelled_s3(ray_s3):
    url = ray_s3.url("tiny-labelled")
    write_tiny_dataset(url, patients=10, slices=4, size=32, source="tinylab", seed=5)  # 5 disk + 5 square patients
    return url


@pytest.fixture
def mlflow_client_uri(mlflow_server):
    """mlflow's module-level API pointed at the server for one test (set_tracking_uri also exports
    MLFLOW_TRACKING_URI, which must not leak into later tests)."""
    mlflow.set_tracking_uri(mlflow_server.uri)
    yield mlflow_server.uri
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def seeded_encoder(tmp_path_factory) -> str:
    """An encoder folder as pre-training leaves it: encoder.pt (timm layout) + encoder_config.json."""
    from ssl_core.backbones import create_backbone, export_encoder_state_dict

    folder = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(1)
    torch.save(export_encoder_state_dict(create_backbone("resnet18", in_chans=1)), folder / "encoder.pt")
    (folder / "encoder_config.json").write_text(json.dumps({"backbone": "resnet18", "in_chans": 1,
                                                            "method": "seeded"}))
    return str(folder)


def test_study_logs_parent_and_child_runs_to_a_real_mlflow_server_and_the_report_reads_them(
        ray_cluster, ray_s3, mlflow_server, mlflow_client_uri, labelled_s3, seeded_encoder, tmp_path):
    cfg = FinetuneConfig(
        data=labelled_s3, storage=str(tmp_path / "tune"), experiment="tiny-study",
        encoders=["random", seeded_encoder], backbone="resnet18", sizes=parse_sizes(samples_per_class="2,all"),
        folds=2, seeds=[0], epochs=2, recipes=["1e-3:0", "1e-4:1"], batch_size=8, tracking_uri=mlflow_server.uri,
        stopping="fixed",  # exactly 2 epochs per recipe: the per-epoch logging below counts them
        search_margin=0.5, search_candidates=[1],  # everything within 0.5 of full-data AUC: minimum is 1
    )
    res = run_study(cfg)
    assert (res.trials, res.failed) == (12, 0)  # 2 encoders x 2 sizes x 2 folds + 4 search trials at n1

    parent = mlflow.get_run(res.parent_run_id)
    assert parent.data.tags[tracking.TAG_KIND] == "study" and parent.info.status == "FINISHED"
    assert parent.data.tags["min_spc.random"] == "1" and parent.data.tags["min_spc.seeded"] == "1"
    children = mlflow.search_runs(experiment_names=["tiny-study"],
                                  filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(children) == 12 and set(children["status"]) == {"FINISHED"}
    assert sorted(children["tags.method"].unique()) == ["random", "seeded"]
    assert sorted(children["tags.size"].unique()) == ["all", "n1", "n2"]
    assert sorted(children["tags.fold"].unique()) == ["0", "1"] and set(children["tags.seed"]) == {"0"}
    assert children["metrics.test_auc"].between(0, 1).all()
    assert children["metrics.test_f1_macro"].notna().all() and children["metrics.test_accuracy"].notna().all()
    grid_n2 = mlflow.search_runs(experiment_names=["tiny-study"],
                                 filter_string="tags.method = 'seeded' and tags.size = 'n2'")
    assert len(grid_n2) == 2  # one per fold
    assert (grid_n2["metrics.train_per_class_min"] == 2).all()
    one = grid_n2["run_id"].iloc[0]
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(one, "val_auc")][:2] == [0, 1]  # per epoch
    # both recipes trained (their curves under r0./r1.), the tag names the one validation chose
    for i in (0, 1):
        assert [m.step for m in mlflow.MlflowClient().get_metric_history(one, f"r{i}.val_auc")] == [0, 1]
    assert set(children["tags.recipe"]) <= {"0.001:0", "0.0001:1"}
    chosen = grid_n2.iloc[0]
    r_best = [mlflow.get_run(one).data.metrics[f"r{i}.best_val_auc"] for i in (0, 1)]
    assert chosen["tags.recipe"] == ("0.001:0" if r_best[0] >= r_best[1] else "0.0001:1")
    assert parent.data.tags["protocol"] == "tuned"

    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(res.parent_run_id)}
    assert {"summary.md", "summary.csv", "auc_vs_size.png", "search.json"} <= arts
    stored = list_keys(ray_s3, "mlflow/")
    assert any(k.endswith(f"{res.parent_run_id}/artifacts/auc_vs_size.png") for k in stored)  # on S3

    out = tmp_path / "report"
    paths = build_report(ReportConfig(experiment="tiny-study", out=str(out), tracking_uri=mlflow_server.uri))
    md = Path(paths.markdown).read_text()
    for row in ("| random | n1 |", "| random | n2 |", "| random | all |", "| seeded | n2 |", "| seeded | all |"):
        assert row in md
    assert "Paired Wilcoxon signed-rank test against `random`" in md and "| seeded | n2 | 2 |" in md
    assert "## Fine-tuning recipe per encoder" in md and "Fine-tuning recipe: tuned: each trial trains" in md
    assert re.search(r"\| random \| n2 \| lr 0\.00?01?, [01] frozen: \d/2", md)
    # every trial logged its test predictions; the report pooled them over the 2 folds per size
    preds = mlflow.MlflowClient().list_artifacts(one, "predictions")
    assert [a.path for a in preds] == ["predictions/test.npz"]
    assert "Patient-level bootstrap of the pooled out-of-fold AUC against `random`" in md
    for size in ("n1", "n2", "all"):
        assert re.search(rf"\| seeded \| {size} \| \d+ \| \d+ \| 0\.\d+ \| 0\.\d+ \| [+-]0\.\d+ \|", md), size
    html = Path(paths.html).read_text()
    assert "<h2>Patient-level bootstrap of the pooled out-of-fold AUC against `random`</h2>" in html
    assert "<th>ci_low</th>" in html  # the bootstrap table under its own heading
    assert "<h2>Verdict at the smallest training-set size</h2>" in html and "<li><code>seeded</code>" in html
    assert "data:image/png;base64," in html and "<img" in html and 'src="auc_vs_size.png"' not in html
    assert Path(paths.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unlabelled_data_and_unloadable_encoders_fail_before_any_trial(ray_s3, tmp_path, capsys):
    url = ray_s3.url("tiny-unlabelled")
    write_tiny_dataset(url, patients=4, slices=2, size=32, labelled=False)
    base = ["finetune", "--storage", str(tmp_path / "t"), "--experiment", "bad", "--folds", "2",
            "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--address", "local"]
    assert main([*base, "--data", url]) == 2
    assert f"--data {url}: no slice has a label" in capsys.readouterr().err

    labelled = tmp_path / "lab"
    write_tiny_dataset(str(labelled), patients=6, slices=2, size=32)
    assert main([*base, "--data", str(labelled), "--encoder", str(tmp_path / "nope")]) == 2
    assert f"--encoder {tmp_path / 'nope'}: not found" in capsys.readouterr().err
    (tmp_path / "empty-run").mkdir()
    assert main([*base, "--data", str(labelled), "--encoder", f"byol={tmp_path / 'empty-run'}"]) == 2
    assert "no encoder.pt here nor in a checkpoint_* folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "t")  # no Tune run was started

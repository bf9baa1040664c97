"""The MLflow side of "one study = one MLflow experiment", against a SQLite store (no Ray).

Pre-training runs land in the study's experiment with the study's tags and their data as a dataset
input, a run registers its encoder once however often its driver is rerun, trials carry their
encoder's tags, and the report finds its study run among pre-training runs, adds the pre-training
table and plot, and logs its files to the study run when asked.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from ctssl_base.errors import UserError
from data_prep import shards
from ray_jobs import tracking
from ray_jobs.finetune.config import FinetuneConfig
from ray_jobs.finetune.trial import trial_tags
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import inspect_data
from ray_jobs.pretrain.mlflow_run import open_run, register_encoder
from ray_jobs.report.build import ReportConfig, build_report
from ray_jobs.report.collect import load_study
from ray_jobs.trial_record import SizeSpec
from tests.ray_jobs.tiny_data import write_tiny_dataset


@pytest.fixture
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def pool(tmp_path) -> str:
    url = str(tmp_path / "pool")
    write_tiny_dataset(url, patients=4, slices=4, size=32, source="tinyct", labelled=False)  # 16 slices
    return url


def _selection(pool: str, dst: str, keep: int) -> str:
    ids = [f"tinyct-p{p:03d}-s{s:03d}" for p in range(4) for s in range(4)][:keep]
    shards.write_selection(dst, pool, ids, {"strategy": "hash", "threshold": 6})
    return dst


def _encoder_run(cl, exp_id: str, tmp_path: Path, name: str = "run") -> str:
    run_id = cl.create_run(exp_id, run_name=name).info.run_id
    folder = tmp_path / f"enc-{run_id}"
    folder.mkdir()
    (folder / "encoder.pt").write_bytes(b"weights of " + run_id.encode())
    (folder / "encoder_config.json").write_text(json.dumps({"backbone": "test_resnet"}))
    tracking.log_artifacts(cl, run_id, [str(folder / "encoder.pt"), str(folder / "encoder_config.json")], "encoder")
    return run_id


# ------------------------------------------------------------------------------------------ registry
def test_registering_the_same_run_twice_gives_one_version_whose_source_is_the_encoder_folder(uri, tmp_path):
    cl = tracking.client(uri)
    exp = tracking.get_or_create_experiment(cl, "study", f"file://{tmp_path / 'artifacts'}")
    first = _encoder_run(cl, exp, tmp_path)
    v1 = tracking.register_artifact(cl, "study-byol", first, tags={"reduction": "all"})
    again = tracking.register_artifact(cl, "study-byol", first)
    assert str(v1.version) == str(again.version) == "1"
    versions = cl.search_model_versions("name = 'study-byol'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", first)]
    assert versions[0].source.endswith(f"{first}/artifacts/encoder") and versions[0].tags["reduction"] == "all"
    # the version's source is the encoder folder: downloading the version gives encoder.pt
    local = mlflow.artifacts.download_artifacts(artifact_uri=cl.get_model_version_download_uri("study-byol", "1"),
                                                dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    assert (Path(local) / "encoder.pt").read_bytes() == b"weights of " + first.encode()

    second = _encoder_run(cl, exp, tmp_path, "rerun-with-new-settings")  # another run: a new version
    assert str(tracking.register_artifact(cl, "study-byol", second).version) == "2"
    assert sorted((str(v.version), v.run_id) for v in cl.search_model_versions("name = 'study-byol'")) == [
        ("1", first), ("2", second)]


def test_the_driver_registers_only_when_asked_and_tags_the_run_with_its_version(uri, tmp_path):
    cl = tracking.client(uri)
    exp = tracking.get_or_create_experiment(cl, "study")
    run_id = _encoder_run(cl, exp, tmp_path)
    base = {"method": "byol", "data": "/d", "storage": str(tmp_path / "runs"), "experiment": "study-byol-1a2b"}
    assert register_encoder(cl, PretrainConfig(**base), run_id) is None
    assert cl.search_registered_models() == []
    cfg = PretrainConfig(**base, register_as="study-byol-hash6", tags={"reduction": "hash6"})
    assert register_encoder(cl, cfg, run_id) == "1"
    assert register_encoder(cl, cfg, run_id) == "1"  # a restarted driver: no second version
    (v,) = cl.search_model_versions("name = 'study-byol-hash6'")
    assert v.run_id == run_id and v.tags["reduction"] == "hash6" and v.tags["method"] == "byol"
    tags = cl.get_run(run_id).data.tags
    assert (tags["registered_model"], tags["registered_version"]) == ("study-byol-hash6", "1")


# ------------------------------------------------------------------------------------------- dataset
def test_the_pre_training_data_is_the_runs_dataset_input_digested_from_its_manifests(uri, pool, tmp_path):
    cl = tracking.client(uri)
    exp = tracking.get_or_create_experiment(cl, "study")
    run_all = cl.create_run(exp).info.run_id
    run_sel = cl.create_run(exp).info.run_id
    sel = _selection(pool, str(tmp_path / "sel"), keep=10)
    tracking.log_dataset_input(cl, run_all, "tinyct", pool)
    tracking.log_dataset_input(cl, run_all, "tinyct", pool)  # a resumed run logs it again: still one input
    tracking.log_dataset_input(cl, run_sel, "tinyct", pool, sel)

    (full,) = cl.get_run(run_all).inputs.dataset_inputs
    (reduced,) = cl.get_run(run_sel).inputs.dataset_inputs
    assert full.dataset.name == reduced.dataset.name == "tinyct"
    assert full.dataset.digest == shards.manifest_digest(pool)[:tracking.DIGEST_CHARS]
    assert reduced.dataset.digest != full.dataset.digest and len(reduced.dataset.digest) <= 36
    assert json.loads(full.dataset.source) == {"uri": pool, "selection": None}
    assert json.loads(reduced.dataset.source) == {"uri": pool, "selection": sel}
    assert full.dataset.source_type == "local"
    assert json.loads(full.dataset.profile)["rows"] == 16
    profile = json.loads(reduced.dataset.profile)
    assert (profile["rows"], profile["base_rows"], profile["selection"]) == (10, 16, {"strategy": "hash",
                                                                                      "threshold": 6})
    assert {t.key: t.value for t in full.tags} == {tracking.DATASET_CONTEXT_TAG: "train"}
    # the same data digests the same (a changed pool would not): the input identifies the data
    assert tracking.dataset_input("tinyct", pool).dataset.digest == full.dataset.digest
    for d in (full.dataset, reduced.dataset):  # metadata only: no patient or slice identifiers
        assert "patient" not in (d.source + (d.profile or "")) and "tinyct-p0" not in (d.source + d.profile)


# ------------------------------------------------------------------------------------ pre-training run
def _pretrain_cfg(pool: str, tmp_path: Path, uri: str, experiment: str, **kw) -> PretrainConfig:
    return PretrainConfig(method="byol", data=pool, storage=str(tmp_path / "runs"), experiment=experiment,
                          backbone="test_resnet", tracking_uri=uri, batch_size=8, epochs=1, **kw)


def test_pre_training_runs_land_in_the_named_experiment_with_their_tags_and_a_rerun_resumes_the_same_run(
        uri, pool, tmp_path):
    sel = _selection(pool, str(tmp_path / "sel"), keep=8)
    tags = {"ctssl.stage": "pretrain", "ctssl.study": "demo", "encoder": "byol-hash6", "reduction": "hash6"}
    cfg = _pretrain_cfg(pool, tmp_path, uri, "demo-byol-hash6-0f3a", selection=sel, mlflow_experiment="demo",
                        tags=tags)
    cfg.validate()
    info = inspect_data(cfg.data, cfg.selection)
    run_id = open_run(cfg, info, uri, 32, 1, {})
    cl = tracking.client(uri)
    assert cl.get_experiment_by_name("demo-byol-hash6-0f3a") is None  # the Ray run name is no MLflow experiment
    exp_id = cl.get_experiment_by_name("demo").experiment_id
    run = cl.get_run(run_id)
    assert run.info.experiment_id == exp_id
    assert {k: run.data.tags[k] for k in tags} == tags
    assert run.data.tags[tracking.TAG_KIND] == "pretrain" and run.data.tags["method"] == "byol"
    assert run.data.tags[tracking.TAG_RUN_KEY] == f"{tmp_path / 'runs'}/demo-byol-hash6-0f3a"
    assert run.data.params["rows"] == "8" and run.data.params["mlflow_experiment"] == "demo"
    (inp,) = run.inputs.dataset_inputs
    assert json.loads(inp.dataset.source)["selection"] == sel

    # a restarted driver: the same run, no duplicate, tags added since are set
    again = open_run(PretrainConfig(**{**cfg.to_dict(), "tags": {**tags, "note": "restarted"}}), info, uri,
                        32, 1, {})
    assert again == run_id and cl.get_run(run_id).data.tags["note"] == "restarted"
    # another method x level of the study: its own run in the same experiment
    other_cfg = _pretrain_cfg(pool, tmp_path, uri, "demo-byol-all-0f3a", mlflow_experiment="demo",
                              tags={**tags, "encoder": "byol-all", "reduction": "all"})
    other = open_run(other_cfg, inspect_data(pool, None), uri, 32, 2, {})
    runs = cl.search_runs([exp_id])
    assert other != run_id and sorted(r.info.run_id for r in runs) == sorted([run_id, other])
    assert len(cl.get_run(run_id).inputs.dataset_inputs) == 1


def test_without_the_new_settings_a_run_is_logged_as_before(uri, pool, tmp_path):
    cfg = _pretrain_cfg(pool, tmp_path, uri, "plain")
    run_id = open_run(cfg, inspect_data(pool, None), uri, 32, 2, {})
    cl = tracking.client(uri)
    run = cl.get_run(run_id)
    assert run.info.experiment_id == cl.get_experiment_by_name("plain").experiment_id
    assert run.data.tags[tracking.TAG_STAGE] == "pretrain" and "encoder" not in run.data.tags


@pytest.mark.parametrize(("kw", "message"), [
    ({"tags": {tracking.TAG_KIND: "study"}}, "set by ctssl itself"),
    ({"tags": {tracking.TAG_RUN_KEY: "x"}}, "set by ctssl itself"),
    ({"tags": {"encoder": ["a"]}}, "needs a text or number value"),
    ({"tags": ["encoder"]}, "must be a mapping"),
    ({"register_as": "a/b"}, "without '/' or ':'"),
    ({"mlflow_experiment": " "}, "mlflow_experiment must be a non-empty name"),
])
def test_bad_study_settings_of_a_pre_training_run_are_refused_before_ray(kw, message):
    with pytest.raises(UserError, match=message):
        PretrainConfig(method="byol", data="/d", storage="/s", experiment="e", **kw).validate()


# ------------------------------------------------------------------------------------------ fine-tuning
def test_trials_carry_their_encoders_tags_and_the_studys_own_tags_win():
    tags = trial_tags("byol-hash6", "byol", SizeSpec("per_class", 5), 2, 0, "parent123",
                      extra={"method": "byol", "reduction": "hash6", "ctssl.kind": "oops"})
    assert tags["reduction"] == "hash6" and tags[tracking.TAG_STAGE] == "finetune"
    assert (tags["method"], tags["encoder"], tags["pretrain_method"]) == ("byol-hash6", "byol-hash6", "byol")
    assert (tags["size"], tags["fold"], tags[tracking.TAG_KIND], tags[tracking.PARENT_TAG]) == (
        "n5", "2", "trial", "parent123")
    plain = trial_tags("random", "random", SizeSpec("per_class", -1), 0, 0, "p")
    assert "reduction" not in plain and plain["encoder"] == "random"


def test_encoder_tags_are_checked_and_unknown_encoders_are_refused_before_ray(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"encoder_tags\['byol'\]"):
        FinetuneConfig(data="/d", storage="/s", experiment="e", encoder_tags={"byol": {"encoder": {"x": 1}}}
                       ).validate()
    from ctssl_base import ray_connect
    from ray_jobs.finetune.study import run_study

    monkeypatch.setattr(ray_connect, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    data = str(tmp_path / "labelled")
    write_tiny_dataset(data, patients=6, slices=2, size=32)
    cfg = FinetuneConfig(data=data, storage=str(tmp_path / "s"), experiment="e", encoders=["random"], folds=2,
                         tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", encoder_tags={"byol-hash6": {"r": "6"}})
    with pytest.raises(UserError, match=r"encoder_tags name \['byol-hash6'\], which are not encoders of the study"):
        run_study(cfg)


# ------------------------------------------------------------------------------------------------ report
STUDY = "demo"
AUC = {  # encoder -> size -> AUC of fold 0 (fold 1: + 0.02)
    "random": {"n2": 0.60, "all": 0.70},
    "byol-all": {"n2": 0.70, "all": 0.80},
    "byol-hash6": {"n2": 0.68, "all": 0.79},
}


def _pretrain_run(cl, exp: str, encoder: str, reduction: str | None, rows: int, steps: int, seconds: float,
                  study: str = STUDY, status: str = "FINISHED") -> str:
    tags = {tracking.TAG_KIND: "pretrain", tracking.TAG_STAGE: "pretrain", tracking.TAG_STUDY: study,
            "encoder": encoder, "method": "byol", "final_step": str(steps), "train_time_s": f"{seconds:.1f}",
            "checkpoint": f"/runs/{encoder}/checkpoint_000001"}
    if reduction is not None:
        tags["reduction"] = reduction
    run = cl.create_run(exp, tags=tags).info.run_id
    cl.log_param(run, "rows", str(rows))
    cl.set_terminated(run, status=status)
    return run


def _study_experiment(uri: str) -> tuple[str, str]:
    """The experiment of a study as ``ctssl study run`` leaves it: two pre-training runs of one method (all
    data, hash-reduced), a fine-tuning study of them and the baseline, and a pre-training run started
    after the study (the newest run of the experiment)."""
    cl = tracking.client(uri)
    exp = cl.create_experiment(STUDY)
    _pretrain_run(cl, exp, "byol-all", None, 16, 40, 120.0)
    _pretrain_run(cl, exp, "byol-hash6", "hash6", 10, 25, 75.0)
    _pretrain_run(cl, exp, "byol-hash6", "hash6", 10, 999, 9999.0, status="FAILED")  # not a finished run
    _pretrain_run(cl, exp, "byol-all", None, 16, 7, 7.0, study="another-study")  # another study's
    parent = cl.create_run(exp, tags={tracking.TAG_KIND: "study", tracking.TAG_STAGE: "finetune",
                                      tracking.TAG_STUDY: STUDY, "dataset": "tiny"}).info.run_id
    cl.log_param(parent, "classes", "a,b")
    cl.log_param(parent, "encoders", json.dumps(["random", "byol-all=/runs/byol-all/checkpoint_000001",
                                                  "byol-hash6=/runs/byol-hash6/checkpoint_000001"]))
    for enc, by_size in AUC.items():
        for label, auc in by_size.items():
            for fold in range(2):
                run = cl.create_run(exp, tags=trial_tags(enc, "byol", SizeSpec.from_label(label), fold, 0, parent,
                                                         extra={"reduction": "hash6"} if "hash" in enc else None)
                                    ).info.run_id
                for k, v in {"test_auc": auc + 0.02 * fold, "test_f1_macro": 0.5, "test_accuracy": 0.5,
                             "best_val_auc": 0.6, "best_epoch": 1, "n_train": 4,
                             "train_per_class_min": 2 if label == "n2" else 8}.items():
                    cl.log_metric(run, k, v)
                cl.set_terminated(run, status="FINISHED")
    cl.set_terminated(parent, status="FINISHED")
    _pretrain_run(cl, exp, "byol-late", "hash3", 5, 5, 5.0)  # newest run: not the study's, not its encoder
    return exp, parent


def _artifacts(cl, run_id: str, path: str | None = None) -> list[str]:
    return sorted(f.path for f in cl.list_artifacts(run_id, path))


def test_report_adds_the_pre_training_table_and_plot_and_logs_its_files_to_the_study_run(uri, tmp_path):
    _, parent = _study_experiment(uri)
    study = load_study(uri, STUDY)  # the study run, though pre-training runs share (and end) the experiment
    assert study.parent_run_id == parent and len(study.trials) == 12
    assert set(study.trials["encoder"]) == set(AUC)

    paths = build_report(ReportConfig(experiment=STUDY, out=str(tmp_path / "report"), tracking_uri=uri,
                                      log_to_run=True))
    md = Path(paths.markdown).read_text()
    section = md.split("## Pre-training")[1].split("\n## ")[0]
    assert ("| encoder | method | reduction | pool slices | optimiser steps | pre-training time | AUC n2 | AUC all |"
            in section)
    assert "| byol-all | byol | all | 16 | 40 | 120 s | 0.710 | 0.810 |" in section
    assert "| byol-hash6 | byol | hash6 | 10 | 25 | 75 s | 0.690 | 0.800 |" in section
    assert "| random | none (baseline) | - | - | - | - | 0.610 | 0.710 |" in section
    assert section.index("| byol-all |") < section.index("| byol-hash6 |")  # all data, then the reduction
    assert "byol-late" not in md and "9999" not in md and "| 7 |" not in section
    assert "![AUC vs pre-training time](auc_vs_pretrain_time.png)" in section
    assert Path(paths.pretrain_plot).name == "auc_vs_pretrain_time.png"
    assert Path(paths.pretrain_plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(paths.html).read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "<h2>Pre-training</h2>" in page
    assert "pre-training time (s)" in page and "hash6" in page

    cl = tracking.client(uri)
    assert _artifacts(cl, parent, "report") == sorted(f"report/{n}" for n in (
        "report.md", "report.html", "auc_vs_size.png", "auc_vs_pretrain_time.png", "summary.csv", "report.json"))
    logged = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="report/report.md",
                                                 dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    assert Path(logged).read_text() == md
    report_json = json.loads((Path(paths.markdown).parent / "report.json").read_text())
    assert {r["encoder"] for r in report_json["pretraining"]} == {"byol-all", "byol-hash6", "random"}


def test_report_logs_nothing_unless_asked_and_refuses_a_pre_training_run_as_the_study_run(uri, tmp_path):
    exp, parent = _study_experiment(uri)
    build_report(ReportConfig(experiment=STUDY, out=str(tmp_path / "report"), tracking_uri=uri))
    cl = tracking.client(uri)
    assert "report" not in _artifacts(cl, parent)
    pre = cl.search_runs([exp], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pretrain'", max_results=1)[0]
    with pytest.raises(UserError, match="is a pretrain run, not a fine-tuning study run"):
        build_report(ReportConfig(experiment=STUDY, out=str(tmp_path / "r2"), tracking_uri=uri,
                                  study_run=pre.info.run_id))


def test_a_study_without_pre_training_runs_has_no_pre_training_section(uri, tmp_path):
    cl = tracking.client(uri)
    exp = cl.create_experiment(STUDY)
    parent = cl.create_run(exp, tags={tracking.TAG_KIND: "study"}).info.run_id
    run = cl.create_run(exp, tags=trial_tags("random", "random", SizeSpec("per_class", -1), 0, 0, parent)).info.run_id
    cl.log_metric(run, "test_auc", 0.5)
    cl.set_terminated(run, status="FINISHED")
    paths = build_report(ReportConfig(experiment=STUDY, out=str(tmp_path / "r"), tracking_uri=uri))
    assert paths.pretrain_plot is None and "Pre-training" not in Path(paths.markdown).read_text()
    assert not (tmp_path / "r" / "auc_vs_pretrain_time.png").exists()

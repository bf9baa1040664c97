"""Trials that did not finish (stopped by ASHA, failed) are named in the report, not silently averaged;
the report can be written to object storage.

The study is written straight into a SQLite MLflow store with the tags the study driver uses, so
each trial's status is chosen exactly (a real ASHA run decides which trials to stop by itself).
"""

from __future__ import annotations

import os
from pathlib import Path

from ray_jobs import tracking
from ray_jobs.finetune.config import FinetuneConfig
from ray_jobs.finetune.study import asha_scheduler
from ray_jobs.finetune.trial import trial_tags
from ray_jobs.report.build import ReportConfig, build_report
from ray_jobs.report.collect import load_study
from ray_jobs.trial_record import SizeSpec

EXPERIMENT = "unfinished-study"


def _study(uri: str) -> str:
    cl = tracking.client(uri)
    exp = cl.create_experiment(EXPERIMENT)
    parent = cl.create_run(exp, tags={tracking.TAG_KIND: "study", "dataset": "tiny"}).info.run_id
    cl.log_param(parent, "classes", "a,b")
    status = {("random", "n2", 1): "KILLED", ("ssl", "n2", 2): "FAILED"}
    for enc in ("random", "ssl"):
        for size in (SizeSpec("per_class", 2), SizeSpec("per_class", -1)):
            for fold in range(3):
                run = cl.create_run(exp, tags=trial_tags(enc, enc, size, fold, 0, parent)).info.run_id
                st = status.get((enc, size.label, fold), "FINISHED")
                cl.log_metric(run, "val_auc", 0.6, step=0)
                if st == "FINISHED":  # only a finished trial has its test metrics
                    auc = 0.6 + 0.1 * (enc == "ssl") + 0.01 * fold
                    for k, v in {"test_auc": auc, "test_f1_macro": 0.5, "test_accuracy": 0.5, "best_val_auc": 0.6,
                                 "best_epoch": 1, "n_train": 4, "train_per_class_min": 2}.items():
                        cl.log_metric(run, k, v)
                cl.set_terminated(run, status=st)
    cl.set_terminated(parent, status="FINISHED")
    return parent


def test_report_names_stopped_and_failed_trials_and_leaves_them_out_of_the_means(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _study(uri)
    study = load_study(uri, EXPERIMENT)
    assert study.parent_run_id == parent and len(study.trials) == 10
    assert study.unfinished[["encoder", "size", "fold", "status"]].values.tolist() == [
        ["random", "n2", 1, "KILLED"], ["ssl", "n2", 2, "FAILED"]]

    paths = build_report(ReportConfig(experiment=EXPERIMENT, out=str(tmp_path / "report"), tracking_uri=uri))
    md = Path(paths.markdown).read_text()
    head = md.split("## Verdict")[0]
    assert "2 trial(s) did not finish" in head
    assert "1 stopped early (ASHA's `--asha`, or a user) (random/n2/fold1/seed0)" in head
    assert "1 failed (ssl/n2/fold2/seed0)" in head and "lean high" in head
    assert "10 finished trials" in head
    # the n2 cells (samples/class 2, trials 2) average the folds that finished: (0.60 + 0.62) / 2, (0.70 + 0.71) / 2
    assert "| random | n2 | 2 | 2 | 0.610 ± 0.014 |" in md and "| ssl | n2 | 2 | 2 | 0.705 ± 0.007 |" in md
    assert "did not finish" in Path(paths.html).read_text()


def test_a_study_where_every_trial_finished_says_nothing_about_unfinished_ones(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = tracking.client(uri)
    exp = cl.create_experiment(EXPERIMENT)
    parent = cl.create_run(exp, tags={tracking.TAG_KIND: "study"}).info.run_id
    run = cl.create_run(exp, tags=trial_tags("random", "random", SizeSpec("per_class", -1), 0, 0, parent)).info.run_id
    cl.log_metric(run, "test_auc", 0.5)
    cl.set_terminated(run, status="FINISHED")
    study = load_study(uri, EXPERIMENT)
    assert study.unfinished.empty
    paths = build_report(ReportConfig(experiment=EXPERIMENT, out=str(tmp_path / "r"), tracking_uri=uri))
    assert "did not finish" not in Path(paths.markdown).read_text()


def test_asha_judges_trials_only_after_the_backbone_unfroze():
    base = dict(data="x", storage="y", experiment="e", encoders=["random"], epochs=10, frozen_epochs=3)
    assert asha_scheduler(FinetuneConfig(**base)) is None
    sched = asha_scheduler(FinetuneConfig(**base, asha=True))
    assert sched._max_t == 11 and sched._reduction_factor == 2 and _rungs(sched) == [4, 8]  # epochs + final
    assert _rungs(asha_scheduler(FinetuneConfig(**{**base, "epochs": 3, "frozen_epochs": 3}, asha=True))) == [3]


def _rungs(sched) -> list[int]:  # noqa: ANN001 - the training iterations at which ASHA compares trials
    return sorted(milestone for milestone, _ in sched._brackets[0]._rungs)


def test_report_out_may_be_an_s3_url_and_a_cli_run_writes_every_file_there(tmp_path, s3_bucket, capsys):
    """On Kubernetes the report's RayJob pod goes away with its cluster, so the chart points --out at
    the bucket: the files must land there (and nothing in a local folder named 's3:')."""
    import fsspec

    from ray_jobs.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _study(uri)
    out = f"s3://{s3_bucket}/study/report"
    assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", out]) == 0
    assert f"{out}/report.html" in capsys.readouterr().out
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": os.environ["CTSSL_S3_ENDPOINT_URL"]})
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/study/report")}
    assert names == {"report.md", "report.html", "auc_vs_size.png", "summary.csv", "report.json"}
    assert "did not finish" in fs.cat(f"{s3_bucket}/study/report/report.md").decode()
    assert fs.cat(f"{s3_bucket}/study/report/auc_vs_size.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (Path.cwd() / "s3:").exists()

    bad = f"s3://no-such-bucket-{s3_bucket}/report"
    assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", bad]) != 0
    assert f"{bad}: destination is not writable" in capsys.readouterr().err

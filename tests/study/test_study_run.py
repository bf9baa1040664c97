"""``ctssl study run -f`` as a user runs it: a study that pre-trains on all slices and on the dHash
selection, killed in the middle of pre-training, run again (it resumes that run, redoes nothing
finished and makes no second MLflow run), and run a third time (everything reused). The report
compares the two pre-training levels by AUC and pre-training time, the encoders are registered in
MLflow and the report files are logged to the study's run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(900)

MAX_STEPS = 24


def tiny_study(root: Path, name: str = "tiny", storage: str | None = None, tracking: str | None = None) -> str:
    """A study small enough for CI: a 6-patient phantom, byol at two levels, two sizes, two folds."""
    return textwrap.dedent(f"""\
        apiVersion: ctssl/v1
        kind: Study
        metadata:
          name: {name}
        spec:
          storage: {storage or root / 'store'}
          workdir: {root / 'work'}
          tracking:
            uri: {tracking or f"sqlite:///{root / 'mlflow.db'}"}
          data:
            pretrain: {{type: phantom, patients: 6, slices: 8, renderSize: 64, size: 32}}
            labelled: {{type: phantom, patients: 6, slices: 8, renderSize: 64, size: 32, task: region}}
          reduction:
            levels: [null, 6]
          pretrain:
            backbone: test_resnet
            maxSteps: {MAX_STEPS}
            batch: 8
            checkpointEvery: 4
            methods:
              byol: {{options: {{hidden_dim: 64, out_dim: 32}}}}
          finetune:
            samplesPerClass: [2, all]
            folds: 2
            epochs: 2
            batch: 8
            valFraction: 0.25
            recipes: ["1e-3:0"]
        """)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CTSSL_DEID_KEY")}


def _run(spec: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", "study", "run", "-f", str(spec)], cwd=REPO,
                          capture_output=True, text=True, env=_env(), timeout=timeout)


def stage_lines(text: str) -> dict[str, str]:
    """stage -> "reused" | "ran", from the runner's stage headers."""
    out = {}
    for m in re.finditer(r"^\[\d+/\d+\] ([\w-]+): .*?(reusing the finished stage|done in)", text, re.M):
        out[m.group(1)] = "reused" if m.group(2).startswith("reusing") else "ran"
    return out


def _checkpoints(runs: Path, prefix: str) -> list[Path]:
    return [p for p in runs.glob(f"{prefix}-*/checkpoint_*") if (p / "progress.json").exists()]


def test_killed_mid_pretraining_resumes_then_reuses_and_compares_the_levels(tmp_path):
    from ray_jobs import tracking

    spec = tmp_path / "study.yaml"
    spec.write_text(tiny_study(tmp_path))

    # 1. killed once the first pre-training run has written a checkpoint
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.cli", "study", "run", "-f", str(spec)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True)
    try:
        t0 = time.time()
        while not _checkpoints(tmp_path / "store" / "runs", "tiny-byol-all"):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() - t0 < 400, "no pre-training checkpoint appeared"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    first = stage_lines((tmp_path / "first.log").read_text())
    assert first == {"phantom-pretrain": "ran", "prep-pretrain": "ran", "phantom-labelled": "ran",
                     "prep-labelled": "ran", "reduce-hash6": "ran"}, first

    # 2. run again: finished stages reused, the killed pre-training resumes from its checkpoint
    second = _run(spec)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    stages = stage_lines(second.stdout)
    assert stages == {"phantom-pretrain": "reused", "prep-pretrain": "reused", "phantom-labelled": "reused",
                      "prep-labelled": "reused", "reduce-hash6": "reused", "pretrain-byol-all": "ran",
                      "pretrain-byol-hash6": "ran", "finetune": "ran", "linear": "ran", "report": "ran"}, stages
    assert re.search(r"resumed from step [1-9]", second.stdout + second.stderr)

    # one MLflow experiment for the study; one pre-training run per encoder (none from the kill)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = tracking.client(db)
    assert [e.name for e in cl.search_experiments() if e.name != "Default"] == ["tiny"]
    exp = cl.get_experiment_by_name("tiny").experiment_id
    pre = cl.search_runs([exp], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pretrain'")
    assert sorted(r.data.tags["encoder"] for r in pre) == ["byol-all", "byol-hash6"]
    assert {r.data.tags["reduction"] for r in pre} == {"all", "hash6"}
    assert all(r.info.status == "FINISHED" and r.data.tags["final_step"] == str(MAX_STEPS) for r in pre)
    assert {(r.data.tags["device"], r.data.tags["precision"]) for r in pre} == {("cpu", "fp32")}  # no CUDA here
    # the online probe's curves (pretrain.monitor is on by default): the end point on every run, and the
    # random-initialisation point on the run that was not killed before its first checkpoint
    curves = {r.data.tags["encoder"]: {m.step for m in cl.get_metric_history(r.info.run_id, "probe.knn_auc")}
              for r in pre}
    assert all(MAX_STEPS in steps for steps in curves.values()) and {0, MAX_STEPS} <= curves["byol-hash6"], curves
    for enc in ("byol-all", "byol-hash6"):
        versions = cl.search_model_versions(f"name = 'tiny-{enc}'")
        assert len(versions) == 1, enc
    trials = cl.search_runs([exp], filter_string=f"tags.`{tracking.TAG_KIND}` = 'trial'")
    assert {r.data.tags.get("reduction") for r in trials if r.data.tags.get("encoder") != "random"} == {"all", "hash6"}
    parent = cl.search_runs([exp], filter_string=f"tags.`{tracking.TAG_KIND}` = 'study'")
    assert len(parent) == 1
    logged = {a.path for a in cl.list_artifacts(parent[0].info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= logged, logged

    # the report compares the levels: AUC and pre-training time for both, in a table and a plot
    report = (tmp_path / "work" / "report" / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith(("| byol-all", "| byol-hash6"))]
    assert len(rows) >= 2 and any("hash6" in r for r in rows), report
    assert re.search(r"pre-?training", report, re.I)
    assert len(list((tmp_path / "work" / "report").glob("*.png"))) >= 2
    assert "## Online probe during pre-training" in report and "- `byol-hash6`: k-NN AUC" in report
    assert (tmp_path / "work" / "report" / "probe_curves.png").exists()
    # the linear probe (finetune.linearProbe is on by default) beside fine-tuning at every size, every encoder
    linear = report.split("## Linear probe beside fine-tuning", 1)[1].split("\n## ", 1)[0]
    cells = [tuple(c.strip() for c in ln.split("|")[1:3]) for ln in linear.splitlines() if ln.startswith("| ")]
    assert [c for c in cells if c[0] != "encoder" and not c[0].startswith("-")] == [
        (e, n) for e in ("random", "byol-all", "byol-hash6") for n in ("n2", "all")], linear
    assert "linear_probe.csv" in {a.path for a in cl.list_artifacts(parent[0].info.run_id)}

    # 3. a third run reuses every stage
    third = _run(spec)
    assert third.returncode == 0, third.stderr[-4000:]
    again = stage_lines(third.stdout)
    assert list(again) == list(stages) and set(again.values()) == {"reused"}, again
    assert len(cl.search_runs([exp], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pretrain'")) == 2

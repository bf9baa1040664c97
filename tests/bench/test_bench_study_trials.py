"""Benchmark (``make bench-trials``; not part of CI): what ``ctssl report`` costs on a paper-sized study.

A study of 5 encoders x 7 sizes x 5 folds x 3 seeds (525 trials) is written to a real ``mlflow server``
(SQLite backend, artifacts proxied to a local folder, 127.0.0.1) exactly as the fine-tuning trials log it:
one parent run tagged ``ctssl.kind=study``, one child run per trial with the trial's tags, its final
metrics and its test predictions (``predictions/test.npz``). The trials' numbers are drawn at random, so
what is timed is the tracking machinery, not training. Printed: the time to log the study, the MLflow
run count, the wall time of the report (collection + tables + bootstrap + plots), the number of tracking
calls it made, the report's size, and whether every encoder x size cell is in the summary table.

Knobs (environment): ``BENCH_TRIALS_GRID`` ``encoders x sizes x folds x seeds`` (default ``5x7x5x3``).
Target: the report in < 60 s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.ray_jobs.servers import VENV_BIN, _stop_group, _wait_http

GRID = tuple(int(x) for x in os.environ.get("BENCH_TRIALS_GRID", "5x7x5x3").split("x"))
TARGET_S = 60.0
SLICES_PER_FOLD = 40  # test slices per fold (8 patients of 5 slices)

pytestmark = pytest.mark.timeout(7200)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    port = _free_port()
    log = tmp_path / "mlflow.log"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url, proc, log)
        yield url
    finally:
        _stop_group(proc)


def log_study(uri: str, experiment: str, grid: tuple[int, int, int, int], tmp: Path) -> int:
    """Log a synthetic study (parent + one finished child run per trial); returns the trial count."""
    from mlflow.entities import Metric, Param, RunTag

    from ray_jobs import tracking

    n_enc, n_size, n_fold, n_seed = grid
    cl = tracking.client(uri)
    exp = cl.create_experiment(experiment)
    parent = cl.create_run(exp, tags={tracking.TAG_KIND: "study", "mlflow.runName": "study"}).info.run_id
    cl.log_batch(parent, params=[Param("epochs", "1"), Param("folds", str(n_fold))])
    rng = np.random.default_rng(0)
    encoders = ["random"] + [f"enc{i}" for i in range(1, n_enc)]
    sizes = [f"{2 ** (i + 1)}pc" for i in range(n_size - 1)] + ["full"][: n_size > 0]
    n = 0
    for enc in encoders:
        for si, size in enumerate(sizes):
            for fold in range(n_fold):
                for seed in range(n_seed):
                    tags = {tracking.PARENT_TAG: parent, tracking.TAG_KIND: "trial", "method": enc, "size": size,
                            "size_kind": "full" if size == "full" else "per_class",
                            "size_value": "0" if size == "full" else size[:-2], "fold": str(fold),
                            "seed": str(seed), "ctssl.phase": "grid", "recipe_label": "lr 0.001, 0 frozen"}
                    rid = cl.create_run(exp, tags=tags).info.run_id
                    auc = float(np.clip(0.6 + 0.03 * si + rng.normal(0, 0.05), 0, 1))
                    ms = {"test_auc": auc, "test_f1_macro": auc - 0.1, "test_accuracy": auc - 0.05,
                          "best_val_auc": auc, "best_epoch": 1, "trial_time_s": 1.0, "n_train": 10 * (si + 1),
                          "train_per_class_min": 5 * (si + 1), "late_best": 0, "epochs_run": 1, "max_epochs": 1,
                          "stopped_early": 0, "extended": 0, "converged": 1}
                    now = int(time.time() * 1000)
                    cl.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in ms.items()],
                                 tags=[RunTag("mlflow.runName", f"{enc}-{size}-{fold}-{seed}")])
                    rows = np.arange(fold * SLICES_PER_FOLD, (fold + 1) * SLICES_PER_FOLD)
                    y = (rows // 5) % 2
                    p1 = np.clip(y * (auc - 0.5) + 0.5 + rng.normal(0, 0.3, len(rows)), 0, 1)
                    path = tmp / "test.npz"
                    np.savez(path, y=y, p=np.stack([1 - p1, p1], 1), rows=rows, patients=rows // 5)
                    cl.log_artifact(rid, str(path), "predictions")
                    cl.set_terminated(rid, "FINISHED")
                    n += 1
    cl.set_terminated(parent, "FINISHED")
    return n


def test_report_of_a_paper_sized_study(server, tmp_path, monkeypatch) -> None:
    from ray_jobs import tracking
    from ray_jobs.report.build import ReportConfig, build_report
    from tests.ray_jobs.tracking_calls import count_tracking_calls

    t0 = time.perf_counter()
    n = log_study(server, "paper", GRID, tmp_path)
    t_log = time.perf_counter() - t0
    n_runs = len(tracking.client(server).search_runs(
        [tracking.client(server).get_experiment_by_name("paper").experiment_id], max_results=5000))
    calls = count_tracking_calls(monkeypatch)
    t0 = time.perf_counter()
    paths = build_report(ReportConfig(experiment="paper", out=str(tmp_path / "report"), tracking_uri=server))
    t_report = time.perf_counter() - t0
    md = Path(paths.markdown).read_text()
    size = sum(f.stat().st_size for f in (tmp_path / "report").rglob("*") if f.is_file())
    load = os.getloadavg()[0]
    print(f"\ngrid {'x'.join(map(str, GRID))}: {n} trials, {n_runs} MLflow runs, logged in {t_log:.1f} s; "
          f"report {t_report:.1f} s, {sum(calls.values())} tracking calls {dict(calls)}, "
          f"report folder {size / 1024:.0f} KiB, load {load:.1f}")
    assert n_runs == n + 1
    for enc in ["random"] + [f"enc{i}" for i in range(1, GRID[0])]:
        assert f"`{enc}`" in md or f"| {enc} " in md, f"encoder {enc} missing from the report"
    assert t_report < TARGET_S, f"report took {t_report:.1f} s for {n} trials (target {TARGET_S:.0f} s)"

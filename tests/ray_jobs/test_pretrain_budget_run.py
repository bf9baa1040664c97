"""``ctssl pretrain --time-budget 20s`` as a user runs it: a local Ray, a tiny pool, the default (auto)
batch. The run must stop when 20 s of training loop are spent (not when Ray has started), write its
final checkpoint with the encoder, end its schedules with the budget and log the budget to MLflow."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_jobs.pretrain.budget import SCHEDULE_STEPS
from ssl_core.schedules import warmup_cosine
from tests.ray_jobs.tiny_data import write_tiny_dataset

pytestmark = pytest.mark.timeout(300)

BUDGET_S = 20.0


def test_a_time_budget_stops_training_when_spent_and_writes_the_final_checkpoint(tmp_path):
    from ray_jobs import tracking

    write_tiny_dataset(str(tmp_path / "data"), patients=8, slices=8, size=32)  # 64 slices
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "ray_jobs.cli", "pretrain", "--method", "byol", "--data", str(tmp_path / "data"),
           "--backbone", "test_resnet", "--time-budget", f"{BUDGET_S:g}s", "--storage", str(tmp_path / "runs"),
           "--experiment", "budget", "--address", "local", "--tracking-uri", db, "--log-every", "1",
           "--method-option", "hidden_dim=64", "--method-option", "out_dim=32"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "pre-training finished" in r.stdout
    assert "64 slices / 32 -> a power of two in 32..256: 32 (2 steps per epoch)" in out  # the auto batch, logged

    finals = [p for p in (tmp_path / "runs" / "budget").glob("checkpoint_*") if (p / "encoder.pt").exists()]
    assert len(finals) == 1
    progress = json.loads((finals[0] / "progress.json").read_text())
    assert progress["finished"] and progress["step"] > 2

    cl = tracking.client(db)
    run = cl.search_runs([cl.get_experiment_by_name("budget").experiment_id])[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["time_budget_s"] == "20.0" and params["budget"] == "20s time budget"
    assert params["batch_size"] == "32" and params["batch_size_auto"].startswith("64 slices / 32")
    assert params["epochs"] == "None"  # no epoch limit: the budget ends the run
    history = {k: tracking.metric_history(cl, run.info.run_id, k) for k in ("images_per_s", "lr", "budget_progress")}
    steps = [s for s, _ in history["lr"]]
    assert steps == list(range(1, progress["step"] + 1))
    # stopped once the budget was spent: the loop time is past it by at most one step (its slowest step,
    # batch included, from images/s) plus scheduling noise
    slowest_step = max(32 / v for _, v in history["images_per_s"])
    assert BUDGET_S <= progress["train_time_s"] <= BUDGET_S + slowest_step + 2.0, (progress, slowest_step)
    progress_after = [v for _, v in history["budget_progress"]]
    assert progress_after[-1] == 1.0 and progress_after[-2] < 1.0
    # the schedules followed the budget: each step's lr is BYOL's warm-up + cosine at the share of the
    # budget spent before it (on the fixed scale), whatever the machine's speed; the last step ran past 85 %
    peak = 0.2 * (32 / 256) ** 0.5  # LARS: square-root scaling below the recipe batch
    for (step, lr), spent in zip(history["lr"][1:], progress_after, strict=False):
        at = math.floor(spent * SCHEDULE_STEPS)
        assert lr == pytest.approx(peak * warmup_cosine(at, SCHEDULE_STEPS, 1.0, SCHEDULE_STEPS // 10), rel=1e-6,
                                   abs=1e-12), step
    assert progress_after[-2] > 1.0 - (slowest_step + 2.0) / BUDGET_S
    encoder_config = json.loads((finals[0] / "encoder_config.json").read_text())
    assert encoder_config["steps"] == progress["step"]
    assert Path(finals[0] / "encoder.pt").stat().st_size > 0

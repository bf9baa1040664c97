"""``ray start --head`` on 127.0.0.1 + ``ray job submit -- ctssl pretrain ...``: the way a user (and the
chart's RayJob) runs pre-training. The cluster is this test's own and is stopped by process group."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.ray_jobs.servers import start_ray_head
from tests.ray_jobs.tiny_data import write_tiny_dataset

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """A head node started with ``ray start --head --block`` in its own process group and temp dir."""
    with start_ray_head() as (address, env, _gcs):
        yield address, env


def test_ray_job_submit_runs_ctssl_pretrain_to_completion(ray_head, tmp_path):
    address, env = ray_head
    write_tiny_dataset(str(tmp_path / "data"), patients=4, slices=4, size=32)  # 16 slices
    sub_id = f"ctssl-test-{uuid.uuid4().hex[:8]}"
    runtime_env = '{"excludes": [".venv", ".git", "*.egg-info", "ctssl-demo", "mlruns", "*.db", "tests/bench"]}'
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sub_id,
           "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--",
           "ctssl", "pretrain", "--method", "mocov2", "--data", str(tmp_path / "data"), "--backbone", "resnet18",
           "--workers", "1", "--epochs", "1", "--batch-size", "8", "--storage", str(tmp_path / "runs"),
           "--experiment", "job-mocov2", "--checkpoint-every", "1", "--method-option", "queue_size=16"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, sub_id], capture_output=True,
                          text=True, env=env, timeout=60).stdout
    assert "pre-training finished: 2 steps, 1 epochs, 0 restart(s)" in logs  # 16 slices / batch 8
    assert "step 2/2 epoch" in logs  # the worker's progress line reached the job log
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, sub_id],
                            capture_output=True, text=True, env=env, timeout=60).stdout
    assert f"Job '{sub_id}' succeeded" in status
    assert (tmp_path / "runs" / "mlflow.db").exists()  # default tracking store under the local storage
    assert any(p.name.startswith("checkpoint_2") for p in (tmp_path / "runs" / "job-mocov2").iterdir())

"""``ray start --head`` on 127.0.0.1 + ``ray job submit -- ctssl pretrain ...``: the way a user (and the
chart's RayJob) runs pre-training. The cluster is this test's own and is stopped by process group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.ray_jobs.tiny_data import write_tiny_dataset

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """A head node started with ``ray start --head --block`` in its own process group and temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="ctssl-rj-", dir="/tmp")  # short: Ray's socket paths are length-limited
    dash = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "true",
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    for k, v in ports.items():
        cmd += [k, str(v)]
    # Ray 2.60 clusters require a token by default; this cluster gets its own, given to the CLI too
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # the job must use its default store under --storage
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.time()
        while True:
            r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], capture_output=True,
                               env=env, text=True)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.time() - t0 > 120:
                raise RuntimeError(f"ray head did not answer `ray job list`: {r.stderr[-1500:]}\n"
                                   f"{log.read_text()[-1500:]}")
            time.sleep(1)
        yield address, env
    finally:
        # `ray start --block` and its GCS, raylet, dashboard share this process group: stop them all
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what ignored SIGTERM (GCS, monitor)
        proc.wait(timeout=10)


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

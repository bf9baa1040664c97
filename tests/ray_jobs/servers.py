"""Real servers for the Ray job tests, all on 127.0.0.1 and all stopped afterwards.

* ``ray_s3``: a bucket on the lead's moto S3 server (``s3_server`` in tests/conftest.py) with the
  endpoint and credentials exported for the whole session (module-scoped Ray clusters outlive a
  function-scoped monkeypatch).
* ``ray_cluster``: a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and
  one more node), connected with an explicit address and the S3 settings forwarded to every worker.
* ``mlflow_server``: a real ``mlflow server`` process, SQLite backend, artifacts proxied to the S3
  bucket.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


@dataclass
class S3Env:
    endpoint: str
    bucket: str

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])


@pytest.fixture(scope="session")
def ray_s3(s3_server: str) -> Iterator[S3Env]:
    import boto3

    bucket = f"ctssl-ray-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTSSL_S3_ENDPOINT_URL", s3_server)
        mp.setenv("AWS_ENDPOINT_URL", s3_server)
        mp.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield S3Env(endpoint=s3_server, bucket=bucket)


def list_keys(s3: S3Env, prefix: str) -> list[str]:
    import boto3

    cl = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    keys, token = [], None
    while True:
        kw = {"Bucket": s3.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = cl.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


@pytest.fixture(scope="session")
def ray_cluster(ray_s3: S3Env, tmp_path_factory) -> Iterator[object]:
    """Head (2 CPUs) + a second node (2 CPUs) on this machine; the session's driver is connected."""
    import ray
    from ray.cluster_utils import Cluster

    from ray_jobs.ray_cluster import forwarded_env

    if ray.is_initialized():
        ray.shutdown()
    from tests.conftest import free_port

    # the dashboard (state API: used to find worker processes) on a free port, not the default 8265
    # that another Ray on this machine may hold
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_port": free_port()})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": forwarded_env()}, log_to_driver=True)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    log: Path


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(ray_s3: S3Env, tmp_path_factory) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1: SQLite backend store, artifacts proxied to ``s3://BUCKET/mlflow``."""
    from tests.conftest import free_port

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": ray_s3.endpoint}
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", ray_s3.url("mlflow"), "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", proc, log)
        yield MlflowServer(uri=uri, process=proc, log=log)
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (gunicorn/uvicorn workers)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)

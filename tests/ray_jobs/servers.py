"""Real servers for the Ray job tests, all on 127.0.0.1 and all stopped afterwards.

* ``ray_s3``: a bucket on the lead's moto S3 server (``s3_server`` in tests/conftest.py) with the
  endpoint and credentials exported for the whole session (module-scoped Ray clusters outlive a
  function-scoped monkeypatch).
* ``ray_cluster``: a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and
  one more node), connected with an explicit address and the S3 settings forwarded to every worker.
* :func:`start_ray_head` / :func:`start_ray_node`: ``ray start`` processes, as a user starts a cluster
  for ``ray job submit`` (token auth, loopback only, every port chosen free).
* ``mlflow_server``: a real ``mlflow server`` process, SQLite backend, artifacts proxied to the S3
  bucket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
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

    from ctssl_base.ray_connect import forwarded_env

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


def _stop_group(proc: subprocess.Popen) -> None:
    # `ray start --block` and its GCS, raylet, dashboard share this process group: stop them all
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what ignored SIGTERM (GCS, monitor)
    proc.wait(timeout=10)


@contextlib.contextmanager
def start_ray_head(num_cpus: int = 2) -> Iterator[tuple[str, dict[str, str], str]]:
    """``ray start --head --block`` on 127.0.0.1 in its own process group and temp dir; yields the job
    API address, the environment the ``ray`` CLI needs (its token) and the GCS address."""
    from tests.conftest import free_port

    temp_dir = tempfile.mkdtemp(prefix="ctssl-rj-", dir="/tmp")  # short: Ray's socket paths are length-limited
    dash, gcs = free_port(), free_port()
    ports = {"--port": gcs, "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus), "--include-dashboard", "true",
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    for k, v in ports.items():
        cmd += [k, str(v)]
    # Ray 2.60 clusters require a token by default; this cluster gets its own, given to the CLI too
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # a job uses what its command line says
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.time()
        while True:
            r = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], capture_output=True,
                               env=env, text=True)
            if r.returncode == 0:
                break
            if proc.poll() is not None or time.time() - t0 > 120:
                raise RuntimeError(f"ray head did not answer `ray job list`: {r.stderr[-1500:]}\n"
                                   f"{log.read_text()[-1500:]}")
            time.sleep(1)
        yield address, env, f"127.0.0.1:{gcs}"
    finally:
        _stop_group(proc)


@contextlib.contextmanager
def start_ray_node(gcs: str, env: dict[str, str], num_cpus: int = 1) -> Iterator[None]:
    """A second node (``ray start --address``) joined to the head at ``gcs``; returns once the cluster
    lists it."""
    from tests.conftest import free_port

    cmd = [str(VENV_BIN / "ray"), "start", "--address", gcs, "--block", "--node-ip-address", "127.0.0.1",
           "--num-cpus", str(num_cpus), "--disable-usage-stats"]
    for k in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"):
        cmd += [k, str(free_port())]
    log = Path(tempfile.mkdtemp(prefix="ctssl-rn-", dir="/tmp")) / "ray-node.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    try:
        t0 = time.time()
        while True:
            r = subprocess.run([sys.executable, "-c", probe, gcs], capture_output=True, text=True, env=env)
            if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == ["2"]:
                break
            if proc.poll() is not None or time.time() - t0 > 120:
                raise RuntimeError(f"the second Ray node did not join: {r.stderr[-1500:]}\n{log.read_text()[-1500:]}")
            time.sleep(2)
        yield
    finally:
        _stop_group(proc)


# ------------------------------------------------------------------ PostgreSQL and MLflow on it
# The Helm chart's MLflow runs on PostgreSQL; these run the same on this machine: a throwaway
# PostgreSQL cluster (the machine's initdb / pg_ctl) and an `mlflow server` command line as the chart
# renders it. Their imports are their own, so that they stand apart from the rest of this module.
from contextlib import contextmanager, suppress  # noqa: E402


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


def postgres_bin_dir() -> Path | None:
    """The folder of PostgreSQL's initdb and pg_ctl: found on PATH, else Debian's /usr/lib/postgresql/*/bin."""
    import shutil

    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb).resolve().parent
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def postgres_skip_reason() -> str | None:
    """Why a PostgreSQL test cannot run here (None: it can)."""
    import importlib.util

    if postgres_bin_dir() is None:
        return "PostgreSQL's initdb and pg_ctl are not installed (PATH or /usr/lib/postgresql/*/bin)"
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 (MLflow's PostgreSQL driver, psycopg2-binary) is not installed"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as (it refuses root)"
    return None


@contextmanager
def start_postgres(user: str = "mlflow", password: str | None = None,
                   database: str = "mlflow") -> Iterator[Postgres]:
    """A throwaway PostgreSQL on 127.0.0.1 (own data folder, free port, password login), with
    ``database`` created and owned by ``user``; stopped and deleted afterwards. Skips the test, with
    the reason, where PostgreSQL or psycopg2 is missing. PostgreSQL refuses to run as root, so as root
    it runs as the system's ``postgres`` user."""
    import shutil
    import tempfile as _tempfile

    reason = postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    import psycopg2

    from tests.conftest import free_port

    bindir = postgres_bin_dir()
    password = password or uuid.uuid4().hex
    run_as: dict[str, object] = {}
    root = Path(_tempfile.mkdtemp(prefix="ctssl-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    data, pwfile, log = root / "data", root / "pwfile", root / "postgres.log"
    pwfile.write_text(password + "\n")
    if run_as:
        os.chown(pwfile, int(run_as["user"]), int(run_as["group"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")

    def pg(*args: str, timeout: float = 120) -> None:
        r = subprocess.run([str(bindir / args[0]), *args[1:]], capture_output=True, text=True, env=env,
                           cwd=root, timeout=timeout, **run_as)
        if r.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr[-2000:]}\n{tail}")

    port = free_port()
    started = False
    try:
        pg("initdb", "-D", str(data), "-U", user, "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8")
        # TCP on 127.0.0.1 only; the Unix socket in the data folder, not the system's /var/run/postgresql
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data} -c fsync=off"
        pg("pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        started = True
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}" OWNER "{user}"')
        conn.close()
        yield Postgres(host="127.0.0.1", port=port, user=user, password=password, database=database)
    finally:
        if started:
            with suppress(RuntimeError, subprocess.TimeoutExpired):
                pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def start_mlflow_server(argv: list[str], env: dict[str, str], timeout: float = 300) -> Iterator[MlflowServer]:
    """``mlflow server`` as ``argv`` says (e.g. the chart's container command), but on 127.0.0.1 and a
    free port; ``env`` is its whole environment (the backend store URI may come from
    MLFLOW_BACKEND_STORE_URI, as in the chart). Stopped with its worker processes afterwards."""
    import signal as _signal
    import tempfile as _tempfile

    from tests.conftest import free_port

    args = list(argv)
    port = free_port()
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if args[0] == "mlflow":
        args[0] = str(VENV_BIN / "mlflow")
    log = Path(_tempfile.mkdtemp(prefix="ctssl-mlflow-", dir="/tmp")) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", proc, log, timeout=timeout)
        yield MlflowServer(uri=uri, process=proc, log=log)
    finally:
        try:
            os.killpg(proc.pid, _signal.SIGTERM)  # the server's process group (gunicorn/uvicorn workers)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, _signal.SIGKILL)

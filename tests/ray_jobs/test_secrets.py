"""Secrets stay where they were put: a fine-tuning study on Ray Tune with its storage on the S3 server,
run as a user runs ``ctssl finetune``, with distinctive S3 credentials, an MLflow tracking URI holding a
password, MLflow's password variable and a de-identification key in its environment. Afterwards none
of those values is in Tune's ``tuner.pkl``, in any object under the storage root or the study's MLflow
artifacts, in any MLflow param or tag, on stdout/stderr, or anywhere in the temp folder of the Ray
instance the command started (its session logs, the runtime-env agent's log, the dashboard's)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ctssl_base import ray_connect
from ray_jobs import tracking
from tests.conftest import REPO
from tests.ray_jobs.servers import list_keys
from tests.ray_jobs.tiny_data import write_tiny_dataset

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------ unit: the allow-list, redact_uri
def test_only_listed_non_secret_variables_are_forwarded(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("CTSSL_", "AWS_", "MLFLOW_")):
            monkeypatch.delenv(k)
    keep = {"CTSSL_S3_ENDPOINT_URL": "http://s3:9000", "AWS_ENDPOINT_URL": "http://s3:9000",
            "AWS_DEFAULT_REGION": "eu-west-1", "MLFLOW_S3_ENDPOINT_URL": "http://s3:9000",
            "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    drop = {"CTSSL_DEID_KEY": "k" * 40, "AWS_ACCESS_KEY_ID": "AKIAX", "AWS_SECRET_ACCESS_KEY": "sek",
            "AWS_SESSION_TOKEN": "tok", "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_TOKEN": "t",
            "CTSSL_SOMETHING_NEW": "unlisted", "AWS_SECRET_OTHER": "x"}
    for k, v in {**keep, **drop}.items():
        monkeypatch.setenv(k, v)
    assert ray_connect.forwarded_env() == keep
    # a tracking URI with a password is not forwarded at all (a runtime env's value would replace the
    # full URI a local worker inherits; workers are handed the URI without it)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:pw123@mlflow:5000/x")
    assert "MLFLOW_TRACKING_URI" not in ray_connect.forwarded_env()


def test_a_worker_gets_the_password_back_from_its_own_environment(monkeypatch):
    full = "postgresql://mlflow:s3cr3t@db:5432/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", full)
    handed = tracking.worker_uri(full)
    assert handed == "postgresql://mlflow@db:5432/mlflow"
    assert tracking._with_password(handed) == full
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:other@elsewhere/mlflow")
    assert tracking._with_password(handed) == handed  # another server's password is not borrowed


def test_an_http_login_goes_to_mlflows_basic_auth_variables(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert tracking._http_login_to_env("https://al%40ice:p%3Ass@mlflow:443/x") == "https://mlflow:443/x"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "al@ice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "p:ss"


@pytest.mark.parametrize(("uri", "shown"), [
    ("postgresql://mlflow:s3cr3t@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("https://alice:p%40ss@mlflow.example:443/x?y=1", "https://alice:***@mlflow.example:443/x?y=1"),
    ("https://:tok@host/", "https://:***@host/"),
    ("https://alice@host/", "https://alice@host/"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/a:b@c/mlflow.db", "sqlite:////tmp/a:b@c/mlflow.db"),
    ("databricks", "databricks"),
    ("s3://bucket/key", "s3://bucket/key"),
])
def test_redact_uri_hides_only_the_password(uri, shown):
    assert tracking.redact_uri(uri) == shown


def test_strip_uri_password_keeps_the_user():
    assert tracking.redact_uri("mysql+pymysql://u:p@h/db", keep_password_mark=False) == "mysql+pymysql://u@h/db"


def test_the_s3_filesystem_pickles_without_keys(monkeypatch):
    import pickle

    from ray_jobs.ray_cluster import arrow_filesystem

    key, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_hex(20)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("CTSSL_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = arrow_filesystem("s3://bkt/x")
    blob = pickle.dumps(fs)
    assert path == "bkt/x" and key.encode() not in blob and secret.encode() not in blob
    assert isinstance(pickle.loads(blob), type(fs))


# ------------------------------------------------------------------ the study, end to end
def _objects(s3, prefix: str) -> dict[str, bytes]:
    import boto3

    cl = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    return {k: cl.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in list_keys(s3, prefix)}


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                out[str(p)] = p.read_bytes()
            except OSError:  # a socket, a file removed while walking
                continue
    return out


def _leaks(where: dict[str, bytes], values: dict[str, str]) -> list[str]:
    return [f"{name} in {loc}" for loc, data in where.items() for name, v in values.items() if v.encode() in data]


def test_a_study_on_s3_leaves_no_secret_in_storage_mlflow_output_or_ray_logs(ray_s3, mlflow_server, tmp_path):
    data = ray_s3.url("secrets-labelled")
    write_tiny_dataset(data, patients=6, slices=2, size=16, source="seclab", seed=3)
    host = mlflow_server.uri.split("://", 1)[1]
    values = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
              "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20), "AWS_SESSION_TOKEN": secrets.token_hex(24),
              "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(12), "CTSSL_DEID_KEY": secrets.token_hex(24),
              "uri password": secrets.token_hex(12)}
    uri = f"http://ctssl:{values['uri password']}@{host}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ctssl-sec-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({k: v for k, v in values.items() if k.isupper()})
    env.update(MLFLOW_TRACKING_USERNAME="ctssl", RAY_TMPDIR=str(ray_tmp), CTSSL_SKIP_CAPACITY_CHECK="1")
    storage = ray_s3.url("secrets-tune")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "ray_jobs.cli", "finetune", "--data", data, "--encoder", "random",
             "--backbone", "test_resnet", "--samples-per-class", "all", "--folds", "2", "--epochs", "1",
             "--protocol", "fixed", "--frozen-epochs", "0", "--batch-size", "8", "--val-fraction", "0.25",
             "--max-concurrent", "2", "--storage", storage, "--experiment", "secrets", "--tracking-uri", uri],
            cwd=REPO, env=env, capture_output=True, timeout=280)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:].decode(errors="replace")
        ray_files = _files(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert any("/logs/" in p for p in ray_files), "the Ray instance wrote no logs where expected"
    # the study ran on the S3 storage: Tune's experiment state is there
    stored = _objects(ray_s3, "secrets-tune/")
    assert any(k.endswith("/tuner.pkl") for k in stored), sorted(stored)[:20]
    cl = tracking.client(mlflow_server.uri)
    exp = cl.get_experiment_by_name("secrets")
    runs = cl.search_runs([exp.experiment_id])
    assert len(runs) == 3  # the study's parent run and one per fold
    artifacts = _objects(ray_s3, f"mlflow/{exp.experiment_id}/")
    recorded = {f"params/tags of run {x.info.run_id}": repr((x.data.params, x.data.tags)).encode() for x in runs}
    leaks = (_leaks({"stdout": r.stdout, "stderr": r.stderr}, values) + _leaks(stored, values)
             + _leaks(artifacts, values) + _leaks(recorded, values) + _leaks(ray_files, values))
    assert not leaks, leaks[:20]
    # the URI is still shown and recorded, with its password masked
    assert f"ctssl:***@{host}".encode() in r.stdout

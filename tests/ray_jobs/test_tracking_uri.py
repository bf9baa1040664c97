"""A tracking URI MLflow cannot open fails in one line, at once, naming the schemes that work.

MLflow 3 refuses its file store (``file://`` or a folder): it used to surface as a 46-line traceback
once Ray had started and the first run was created. Every command that takes ``--tracking-uri``
checks it before Ray or any data work starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ctssl_base.errors import UserError
from ray_jobs import tracking
from tests.ray_jobs.tiny_data import write_tiny_dataset

HINT = "use one of sqlite:///PATH/mlflow.db, http(s)://HOST:PORT"


@pytest.mark.parametrize("uri", ["sqlite:////tmp/x/mlflow.db", "sqlite:///mlflow.db", "http://mlflow:5000",
                                 "https://mlflow.example.com", "postgresql+psycopg2://u:p@db/mlflow",
                                 "mysql://u@db/m", "databricks", "databricks://profile"])
def test_uris_mlflow_opens_are_accepted(uri):
    assert tracking.check_tracking_uri(uri) == uri


@pytest.mark.parametrize(("uri", "why"), [
    ("file:///tmp/mlruns", "MLflow no longer opens a file store"),
    ("/tmp/mlruns", "MLflow no longer opens a file store"),
    ("./mlruns", "MLflow no longer opens a file store"),
    ("mlflow:5000", "unknown tracking URI scheme 'mlflow'"),
    ("s3://bucket/mlruns", "unknown tracking URI scheme 's3'"),
    ("http://", "no host in the URI"),
])
def test_uris_mlflow_cannot_open_are_one_clear_error(uri, why, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError) as e:
        tracking.resolve_tracking_uri(uri, None)
    assert str(e.value).startswith(f"--tracking-uri {uri}: {why}")
    if "host" not in why:
        assert HINT in str(e.value)


def test_the_environment_variable_is_checked_and_named(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError, match=r"^MLFLOW_TRACKING_URI file:///tmp/mlruns: MLflow no longer opens"):
        tracking.resolve_tracking_uri(None, "/tmp/storage")


def test_the_file_store_is_accepted_when_mlflow_is_told_to_allow_it(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert tracking.resolve_tracking_uri("file:///tmp/mlruns", None) == "file:///tmp/mlruns"


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE",
                                                           "RAY_ADDRESS")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", *args], env=env, capture_output=True, text=True,
                       timeout=120)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("command", ["pretrain", "finetune", "report", "reduce"])
def test_every_command_refuses_a_file_store_in_one_line_before_ray_starts(tmp_path, command):
    data = str(tmp_path / "data")
    write_tiny_dataset(data, patients=4, slices=2, size=32)
    uri = f"file://{tmp_path / 'mlruns'}"
    args = {
        "pretrain": ["pretrain", "--method", "byol", "--data", data, "--backbone", "resnet18", "--epochs", "1",
                     "--batch-size", "4", "--storage", str(tmp_path / "runs"), "--experiment", "e1",
                     "--address", "local"],
        "finetune": ["finetune", "--data", data, "--folds", "2", "--epochs", "1", "--frozen-epochs", "0",
                     "--storage", str(tmp_path / "runs"), "--experiment", "s1", "--address", "local"],
        "report": ["report", "--experiment", "s1", "--out", str(tmp_path / "runs" / "report")],
        "reduce": ["reduce", data, str(tmp_path / "runs" / "reduced"), "--strategy", "hash"],
    }[command]
    r, seconds = _cli(*args, "--tracking-uri", uri)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"ctssl {command}: error: --tracking-uri {uri}: MLflow no longer opens a file store "
                     f"(file:// or a folder) unless MLFLOW_ALLOW_FILE_STORE=true; {HINT} (an MLflow server), "
                     "postgresql://, mysql://, mssql://, databricks"], r.stderr
    assert not (tmp_path / "runs").exists(), "nothing may start before the URI is checked"
    assert not (tmp_path / "mlruns").exists()
    assert seconds < 25, f"took {seconds:.0f}s: the check must come before Ray starts"

"""A misconfigured S3 endpoint or missing credentials fail in seconds, in one line that says what is
wrong, instead of retrying for about a minute."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctssl_base import storage
from ray_jobs.cli import main
from tests.conftest import TEST_DEID_KEY


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(root: Path) -> Path:
    root.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(root / "a.png")
    return root


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups from a test
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_closed_endpoint_fails_within_seconds_naming_the_endpoint(tmp_path, capsys, monkeypatch, s3_env):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("CTSSL_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    src = _images(tmp_path / "src")
    t0 = time.monotonic()
    rc = main(["prep", str(src), "s3://ctssl-bucket/out", "--executor", "local", "--no-progress"])
    seconds = time.monotonic() - t0
    line = _one_line(capsys.readouterr().err)
    assert rc == 2
    assert line == (f"ctssl prep: error: s3://ctssl-bucket/out: destination is not writable (cannot reach the "
                    f"S3 endpoint {endpoint} (no connection); check the endpoint URL and the network)")
    assert seconds < 10, f"took {seconds:.1f} s"


def test_missing_credentials_fail_at_once_saying_so(tmp_path, capsys, monkeypatch, s3_env):
    monkeypatch.setenv("CTSSL_S3_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    src = _images(tmp_path / "src")
    t0 = time.monotonic()
    rc = main(["prep", str(src), "s3://ctssl-bucket/out2", "--executor", "local", "--no-progress"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and time.monotonic() - t0 < 10
    assert line == ("ctssl prep: error: s3://ctssl-bucket/out2: destination is not writable (no S3 credentials "
                    "found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an IAM role))")


def test_every_s3_client_has_short_timeouts_and_a_bounded_retry_budget(monkeypatch):
    monkeypatch.setenv("CTSSL_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    opts = storage.storage_options("s3://bkt/x")
    assert opts["config_kwargs"]["connect_timeout"] <= 5
    assert opts["config_kwargs"]["retries"] == {"max_attempts": 3, "mode": "standard"}
    fs, _ = storage.open_fs("s3://bkt/x")
    assert fs.retries == storage.S3FS_RETRIES <= 2
    assert fs._prepare_config_kwargs()["connect_timeout"] <= 5
    from ray_jobs.ray_cluster import arrow_filesystem

    afs, _ = arrow_filesystem("s3://bkt/x")
    assert afs.__reduce__()[1][0]["connect_timeout"] == 5.0

"""Shared fixtures: a real S3 API server on 127.0.0.1, a de-identification key, the real CT data.

The S3 server is moto's ThreadedMotoServer (the approach s3fs's own tests use): real HTTP on a free
loopback port, so s3fs, pyarrow's S3FileSystem, Ray Data and MLflow all talk to it as to AWS.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"  # vendored test data (see the README in each folder)
REAL_CT = TEST_DATA / "real_ct" / "totalsegmentator_example_ct"
REAL_CT_ORGANS_CSV = TEST_DATA / "real_ct" / "totalsegmentator_example_ct_slice_organs.csv"

TEST_DEID_KEY = "ctssl-test-key-0123456789abcdef-v2"  # passes data_prep.deid.key_weakness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A running S3-compatible server; yields its endpoint URL (http://127.0.0.1:PORT)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the test S3 server, with the endpoint exported the way ctssl reads it."""
    import boto3
    import fsspec

    monkeypatch.setenv("CTSSL_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    name = f"ctssl-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    fsspec.filesystem("s3").invalidate_cache() if "s3" in fsspec.available_protocols() else None
    return name


@pytest.fixture
def deid_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    return TEST_DEID_KEY


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    assert REAL_CT.is_dir(), f"the real CT test data is expected at {REAL_CT} (vendored in tests/data/real_ct)"
    return REAL_CT


@pytest.fixture(scope="session")
def phantom_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom DICOM cohort (3 patients x 8 slices, 64 px) with fake PHI and label CSVs."""
    from tests.data_prep.phantom_fixtures import make_phantom_cohort

    return make_phantom_cohort(tmp_path_factory.mktemp("phantom-cohort"), patients=3, slices=8, size=64)

"""Object storage through fsspec: one place that turns a URL into a filesystem.

Every stage reads and writes through here so that a local folder (the embedded default) and an S3
bucket behave the same. S3-compatible servers (MinIO, moto in tests) are reached with an endpoint
URL from ``CTSSL_S3_ENDPOINT_URL`` (or the AWS SDK's ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).

S3 clients get short connect timeouts and a bounded retry budget (:data:`S3_CLIENT_CONFIG`): with the
SDK defaults a wrong or unreachable endpoint took about ten seconds per request and close to a minute
per command before anything was said; now the first request fails within a few seconds and the
error names the endpoint.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from ctssl_base import failpoints
from ctssl_base.errors import UserError

_ENDPOINT_VARS = ("CTSSL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

#: botocore settings for every s3fs client. Connecting takes milliseconds on a working network, so 5 s
#: only ever cuts off a dead endpoint; reads may stall longer behind a busy store (60 s). "standard"
#: retries back off on throttling and transient errors, and 3 attempts (2 retries) bound a request
#: that cannot succeed to a few seconds instead of the legacy mode's 5 attempts per request, which
#: s3fs multiplies by its own retries.
S3_CLIENT_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 3, "mode": "standard"},
}
#: s3fs's own retry loop around each call (its default is 5, on top of botocore's)
S3FS_RETRIES = 2


def s3_endpoint() -> str | None:
    for var in _ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the S3 endpoint when one is configured, timeouts and retries."""
    if url.startswith(("s3://", "s3a://")):
        opts: dict[str, Any] = {"config_kwargs": {**S3_CLIENT_CONFIG,
                                                  "retries": dict(S3_CLIENT_CONFIG["retries"])}}
        ep = s3_endpoint()
        if ep:
            opts["client_kwargs"] = {"endpoint_url": ep}
        return opts
    return {}


def describe_error(url: str, e: BaseException) -> str:
    """``e`` in words for a message about ``url``: an endpoint that cannot be reached is named as such
    (botocore's own text names a request URL with the object key, not what is misconfigured)."""
    try:
        from botocore.exceptions import (
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )
    except ImportError:  # no S3 support installed: nothing botocore-specific to say
        return f"{type(e).__name__}: {e}"
    if isinstance(e, NoCredentialsError):
        return ("no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "or run with an IAM role)")
    if not is_local(url) and isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        endpoint = s3_endpoint() or "AWS S3 (no CTSSL_S3_ENDPOINT_URL / AWS_ENDPOINT_URL set)"
        what = "timed out" if isinstance(e, (ConnectTimeoutError, ReadTimeoutError)) else "no connection"
        return f"cannot reach the S3 endpoint {endpoint} ({what}); check the endpoint URL and the network"
    return f"{type(e).__name__}: {e}"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def open_fs(url: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://`` or ``s3://`` URL."""
    if is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    protocol = url.split("://", 1)[0]
    try:
        fs = fsspec.filesystem(protocol, **storage_options(url))
    except (ImportError, ValueError) as e:
        raise UserError(f"{url}: unsupported storage URL ({e})") from e
    if hasattr(fs, "retries"):
        fs.retries = S3FS_RETRIES
    return fs, url.split("://", 1)[1].rstrip("/")


def join(base: str, *parts: str) -> str:
    """Join path parts the way the filesystem of ``base`` expects (always forward slashes)."""
    return posixpath.join(base, *parts)


def full_url(url: str, path: str) -> str:
    """A path returned by :func:`open_fs`'s filesystem, as a URL again (for messages, manifests)."""
    if is_local(url):
        return path
    return f"{url.split('://', 1)[0]}://{path}"


def _is_local_fs(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def ensure_dir(fs: AbstractFileSystem, path: str) -> None:
    """Create a local folder. Object stores have no folders, and s3fs's ``makedirs`` would create a
    missing *bucket* instead of failing, which hides a misspelt bucket name."""
    if _is_local_fs(fs):
        fs.makedirs(path, exist_ok=True)


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old content or the whole new one.

    Local files: write a temp file beside it, fsync, rename (atomic on POSIX). Object stores: a
    single PUT is already all-or-nothing, so a plain write is atomic there.
    """
    if _is_local_fs(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            failpoints.hit("write.half")  # a crash mid-write leaves only a temp file behind
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def write_json_atomic(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json.dumps(obj, indent=1, sort_keys=False).encode())


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def check_writable(url: str) -> None:
    """Fail early, with the URL in the message, when the destination cannot be written."""
    fs, path = open_fs(url)
    probe = join(path, f".ctssl-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        ensure_dir(fs, path)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001 - any backend error means "not writable", said with its reason
        raise UserError(f"{url}: destination is not writable ({describe_error(url, e)})") from e

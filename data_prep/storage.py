"""Object storage through fsspec: one place that turns a URL into a filesystem.

Every stage reads and writes through here so that a local folder (the embedded default) and an S3
bucket behave the same. S3-compatible servers (MinIO, moto in tests) are reached with an endpoint
URL from ``CTSSL_S3_ENDPOINT_URL`` (or the AWS SDK's ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from data_prep import failpoints
from data_prep.errors import UserError

_ENDPOINT_VARS = ("CTSSL_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    for var in _ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: the S3 endpoint when one is configured."""
    if url.startswith(("s3://", "s3a://")):
        opts: dict[str, Any] = {}
        ep = s3_endpoint()
        if ep:
            opts["client_kwargs"] = {"endpoint_url": ep}
        return opts
    return {}


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
        raise UserError(f"{url}: destination is not writable ({type(e).__name__}: {e})") from e

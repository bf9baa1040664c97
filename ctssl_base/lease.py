"""A lease on an output folder: one driver at a time writes (and prunes) it.

Two drivers on one folder would delete each other's checkpoints and orphans and overwrite each other's
stage markers, shards or selections. The lease is ``<root>/.ctssl-lease.json`` (owner host/pid, what,
since, expiry), created atomically: ``O_CREAT | O_EXCL`` on a local disk, a conditional put
(``If-None-Match: *``) on S3. A heartbeat thread renews the expiry; the lease is removed on release.
A lease whose expiry has passed (its driver died), or one held by a process of this host that no
longer exists, is taken over: its file is deleted only when it still holds the expired content seen
(``If-Match`` on its ETag on S3; locally a re-read just before the delete, a small documented race
between that read and the delete), and then created again under the same atomic rule, so of two
drivers taking over at once only one wins. The lease names no secret.

Which driver leases which folder (the rule that keeps them from waiting on each other):

- a lease covers the one folder it lies in, not the folders below it: each driver leases the folder
  it writes and prunes. ``ctssl study run`` leases its storage root; ``ctssl prep`` its DST (one
  lease per ``--shard-index``, ``.ctssl-lease.i003.json``, because the indexes of a split prep write
  one output side by side and each removes only its own orphans); ``ctssl reduce`` its DST;
  ``ctssl pretrain`` its run folder ``STORAGE/EXPERIMENT``, where its checkpoints are pruned;
- the stages of a study write below its root (``shards/<role>``, ``shards/pretrain-<level>``,
  ``runs/<experiment>``), so a stage run by ``study run`` takes its own lease file next to nothing
  the study holds, and a second driver of that stage output (say a manual ``ctssl prep`` into the
  study's shards) is refused while the stage runs. No stage writes into the study root itself, so
  ``study run`` never waits on its own lease; nothing is passed down and no lease is re-entrant (a
  second ``Lease`` on a held folder is refused even in the same process, as a second driver is).

A refused driver raises :class:`LeaseHeld` (one line naming the holder's host, pid and since) before
it has written anything. With ``tidy=True`` (the stage drivers) a local folder that the lease had to
create, and that is still empty when the lease ends, is removed again, so a driver stopped by a
check under its lease leaves no empty output folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any

from ctssl_base import storage
from ctssl_base.errors import UserError

LEASE_FILE = ".ctssl-lease.json"


def lease_file(part: str | None = None) -> str:
    """The lease file's name: ``.ctssl-lease.json``, or ``.ctssl-lease.<part>.json`` for a lease on a
    part of a folder (one ``--shard-index`` of a split prep)."""
    return LEASE_FILE if part is None else f".ctssl-lease.{part}.json"


class LeaseHeld(UserError):
    """The folder is leased by another live driver."""


class Lease:
    """Hold ``<root>/.ctssl-lease.json`` while the block runs (``with Lease(url, "study run"):``).

    ``what`` names the driver in a refusal; ``part`` leases one part of the folder under its own file
    (:func:`lease_file`); ``tidy`` removes the empty local folders the lease had to create."""

    def __init__(self, url: str, what: str, ttl_s: float = 120.0, part: str | None = None, tidy: bool = False):
        self.url, self.what, self.ttl_s, self.tidy = url, what, ttl_s, tidy
        self.local = storage.is_local(url)
        self.fs, root = storage.open_fs(url)
        self.root = root
        self.file = lease_file(part)
        self.path = storage.join(root, self.file)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_dir: str | None = None  # the topmost local folder the lease created
        self._client: Any = None
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    # ------------------------------------------------------------------ primitives per backend
    def _body(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.ttl_s}).encode()

    def _s3(self):  # noqa: ANN202 - a boto3 client
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(**{**storage.S3_CLIENT_CONFIG, "retries": dict(storage.S3_CLIENT_CONFIG["retries"])})
            self._client = boto3.client("s3", endpoint_url=storage.s3_endpoint(), config=cfg)
        return self._client

    def _bucket_key(self) -> tuple[str, str]:
        bucket, _, key = self.path.partition("/")
        return bucket, key

    def _create(self) -> bool:
        """Create the lease file if absent; False when it exists."""
        if self.local:
            if self.tidy and self._made_dir is None:
                self._made_dir = _missing_top(self.root)
            os.makedirs(self.root, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            return True
        from botocore.exceptions import ClientError

        bucket, key = self._bucket_key()
        try:
            self._s3().put_object(Bucket=bucket, Key=key, Body=self._body(), IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The current lease (None when absent) and its version (ETag on S3, content locally)."""
        if self.local:
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None, None
            return _parse(raw), raw.decode(errors="replace")
        from botocore.exceptions import ClientError

        bucket, key = self._bucket_key()
        try:
            obj = self._s3().get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return _parse(obj["Body"].read()), obj["ETag"]

    def _delete_if(self, version: str) -> None:
        """Delete the lease file when it is still ``version``."""
        if self.local:
            _, now = self._read()
            if now == version:  # the race between this read and the unlink is documented above
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            return
        from botocore.exceptions import ClientError

        bucket, key = self._bucket_key()
        try:
            self._s3().delete_object(Bucket=bucket, Key=key, IfMatch=version)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "NoSuchKey", "404"):
                raise

    def _write(self) -> None:
        """Renew the expiry of the lease this process holds."""
        if self.local:
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(self._body())
            os.replace(tmp, self.path)
        else:
            bucket, key = self._bucket_key()
            self._s3().put_object(Bucket=bucket, Key=key, Body=self._body())

    # ------------------------------------------------------------------ the lease
    def acquire(self) -> Lease:
        try:
            self._take()
        except UserError:
            self._remove_made_dir()
            raise
        except Exception as e:  # noqa: BLE001 - a backend error, said in one line with the folder
            self._remove_made_dir()
            raise UserError(f"{self.url}: cannot take the lease {self.file} "
                            f"({storage.describe_error(self.url, e)})") from e
        self._thread = threading.Thread(target=self._beat, name="ctssl-lease", daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        for _ in range(3):
            if self._create():
                break
            held, version = self._read()
            if held is None:
                continue  # released in between: try again
            if float(held.get("expires", 0)) > time.time() and not self._dead_here(held):
                raise LeaseHeld(f"{self.url} is in use by {held.get('what', 'a driver')} on host "
                                f"{held.get('host', '?')} pid {held.get('pid', '?')} since {held.get('since', '?')} "
                                f"(lease {self.file}; it expires unless renewed): wait for it or stop it first")
            self._delete_if(version)  # expired: its driver is gone
        else:
            raise LeaseHeld(f"{self.url}: could not take the lease {self.file} (another driver is taking it)")

    def _dead_here(self, held: dict[str, Any]) -> bool:
        """The holder ran on this host and its process is gone (killed): no need to wait for the expiry."""
        if held.get("host") != self.owner["host"] or not isinstance(held.get("pid"), int):
            return False
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with contextlib.suppress(Exception):  # a failed renewal is retried at the next beat
                self._write()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held, version = self._read()
        if held and held.get("pid") == self.owner["pid"] and held.get("host") == self.owner["host"]:
            self._delete_if(version)
        self._remove_made_dir()

    def _remove_made_dir(self) -> None:
        """Remove the local folders the lease created, from the root up, while they are empty."""
        if not self._made_dir:
            return
        path = self.root
        while True:
            try:
                os.rmdir(path)
            except OSError:  # not empty (the driver wrote its output) or gone
                return
            if path == self._made_dir:
                return
            path = os.path.dirname(path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _missing_top(path: str) -> str | None:
    """The topmost folder of ``path`` that does not exist yet (None when ``path`` exists)."""
    top = None
    while not os.path.isdir(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        out = json.loads(raw)
        return out if isinstance(out, dict) else {}
    except ValueError:
        return {}  # unreadable: treated as expired

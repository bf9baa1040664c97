"""One driver at a time on a storage root: a second is refused naming the holder; an expired lease is taken."""

from __future__ import annotations

import json
import time

import pytest

from ctssl_base import storage
from ctssl_base.lease import LEASE_FILE, Lease, LeaseHeld


def _roundtrip(url: str) -> None:
    fs, root = storage.open_fs(url)
    with Lease(url, "study run"):
        path = storage.join(root, LEASE_FILE)
        before = fs.cat_file(path)
        with pytest.raises(LeaseHeld, match=r"is in use by study run on host .* pid \d+ since "):
            Lease(url, "study run").acquire()
        assert fs.cat_file(path) == before  # the refused driver changed nothing
    assert not fs.exists(storage.join(root, LEASE_FILE))  # released at exit
    # an expired lease (its driver died) is taken over
    storage.ensure_dir(fs, root)
    dead = {"host": "gone", "pid": 1, "expires": time.time() - 1}
    fs.pipe_file(storage.join(root, LEASE_FILE), json.dumps(dead).encode())
    fs.invalidate_cache()
    with Lease(url, "study run") as lease:
        assert json.loads(fs.cat_file(storage.join(root, LEASE_FILE)))["pid"] == lease.owner["pid"]


def test_a_local_root_has_one_driver(tmp_path):
    _roundtrip(str(tmp_path / "store"))


def test_an_s3_root_has_one_driver(s3_bucket):
    _roundtrip(f"s3://{s3_bucket}/store")


def test_a_lease_of_a_killed_process_on_this_host_is_taken_at_once(tmp_path):
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    url = str(tmp_path / "store")
    (tmp_path / "store").mkdir()
    held = {"host": socket.gethostname(), "pid": gone.pid, "expires": time.time() + 600}
    (tmp_path / "store" / LEASE_FILE).write_text(json.dumps(held))
    with Lease(url, "study run") as lease:
        assert json.loads((tmp_path / "store" / LEASE_FILE).read_text())["pid"] == lease.owner["pid"]
    (tmp_path / "store" / LEASE_FILE).write_text(json.dumps({**held, "host": "elsewhere"}))
    with pytest.raises(LeaseHeld, match="on host elsewhere"):  # another host's: its expiry is waited for
        Lease(url, "study run").acquire()

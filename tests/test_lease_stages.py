"""prep, reduce and pretrain hold the lease of the folder they write and prune while they run.

A second driver on a held output (here a real other process holding the lease) is refused in one
line naming the holder's host, pid and since, and changes nothing: no orphan removed, no settings
written. The stages a study runs in its own process lease their own subfolders of the study root,
so they never wait on the study's lease; the indexes of a split prep lease their index each.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctssl_base.lease import LEASE_FILE, Lease, lease_file
from data_prep import shards
from data_prep.prep import PrepConfig, run_prep
from ray_jobs.cli import main
from tests.conftest import REPO, TEST_DEID_KEY
from tests.ray_jobs.tiny_data import write_tiny_dataset

HOLDER = """\
import sys
from ctssl_base.lease import Lease
lease = Lease(sys.argv[1], sys.argv[2], part=sys.argv[3] or None).acquire()
print("held", flush=True)
sys.stdin.read()
lease.release()
"""


@pytest.fixture
def hold() -> Iterator[Callable[..., int]]:
    """Start another process that holds a lease until the test ends; returns its pid."""
    procs: list[subprocess.Popen[str]] = []

    def start(url: str, what: str, part: str | None = None) -> int:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, url, what, part or ""], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        return p.pid

    yield start
    for p in procs:
        p.communicate(timeout=30)  # closing stdin releases the lease
        assert p.returncode == 0


def _refusal(url: str, what: str, pid: int, file: str) -> str:
    return (rf"{re.escape(url)} is in use by {re.escape(what)} on host {re.escape(socket.gethostname())} "
            rf"pid {pid} since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{{4}} \(lease {re.escape(file)}; it expires "
            r"unless renewed\): wait for it or stop it first")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    """Three PNG slices: the smallest input prep takes."""
    src = tmp_path / "ct"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * (i + 1), np.uint8)).save(src / f"slice{i}.png")
    return src


def _prep(src: Path, dst: Path, **kw) -> object:
    return run_prep(PrepConfig(src=str(src), dst=str(dst), size=8, executor="local", progress=False, **kw),
                    TEST_DEID_KEY.encode())


# ------------------------------------------------------------------------------------------- prep
def test_prep_holds_the_lease_of_its_index_while_it_runs_and_leaves_none(ct, tmp_path, monkeypatch):
    dst = tmp_path / "shards"
    seen = []
    remove = shards.remove_orphans

    def watched(url, *a, **k):  # the orphan removal runs under the lease
        seen.append(json.loads((dst / lease_file("i000")).read_text()))
        return remove(url, *a, **k)

    monkeypatch.setattr(shards, "remove_orphans", watched)
    assert _prep(ct, dst).committed
    assert [(s["pid"], s["what"]) for s in seen] == [(os.getpid(), "prep (index 0 of 1)")]
    assert not list(dst.glob(".ctssl-lease*"))


def test_a_second_prep_on_a_held_output_is_refused_in_one_line_and_changes_nothing(ct, tmp_path, hold, capsys,
                                                                                  monkeypatch):
    dst = tmp_path / "shards"
    assert _prep(ct, dst).committed
    (dst / "part-i000-left-by-the-holder.parquet").write_bytes(b"in flight")  # what a rerun removes as orphan
    pid = hold(str(dst), "prep (index 0 of 1)", "i000")
    before = _files(dst)
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    assert main(["prep", str(ct), str(dst), "--size", "8", "--executor", "local", "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(err) == 1 and re.fullmatch("ctssl prep: error: " + _refusal(str(dst), "prep (index 0 of 1)", pid,
                                                                          ".ctssl-lease.i000.json"), err[0]), err
    assert _files(dst) == before


def test_the_indexes_of_a_split_prep_do_not_wait_on_each_other(ct, tmp_path, hold):
    dst = tmp_path / "shards"
    hold(str(dst), "prep (index 1 of 2)", "i001")
    assert _prep(ct, dst, shard_index=0, num_shards=2).slices_written == 3  # not refused
    with pytest.raises(Exception, match=r"is in use by prep \(index 1 of 2\)"):
        _prep(ct, dst, shard_index=1, num_shards=2)


def test_the_stages_of_a_study_do_not_wait_on_the_study_lease(ct, tmp_path):
    """study run holds its root and calls the stages in its own process: they lease subfolders."""
    from data_prep.reduce import reduce_dataset

    root = tmp_path / "store"
    with Lease(str(root), "study tiny"):
        assert _prep(ct, root / "shards" / "pretrain").committed
        summary = reduce_dataset(str(root / "shards" / "pretrain"), str(root / "shards" / "pretrain-2"),
                                 "every_n", threshold=2, progress=False)
        assert summary["total"] == 3
        assert shards.read_manifest(str(root / "shards" / "pretrain-2"))["kind"] == "selection"
        assert (root / LEASE_FILE).exists()
    assert not list(root.rglob(".ctssl-lease*"))


# ----------------------------------------------------------------------------------------- reduce
def test_a_second_reduction_into_a_held_folder_is_refused_and_writes_nothing(tmp_path, hold):
    from ctssl_base.lease import LeaseHeld
    from data_prep.reduce import reduce_dataset

    src, dst = tmp_path / "data", tmp_path / "sel"
    write_tiny_dataset(str(src), patients=2, slices=4, size=16)
    pid = hold(str(dst), "reduce")
    with pytest.raises(LeaseHeld, match=_refusal(str(dst), "reduce", pid, LEASE_FILE)):
        reduce_dataset(str(src), str(dst), "every_n", threshold=2, progress=False)
    assert list(_files(dst)) == [LEASE_FILE]  # the holder's lease, nothing else


# --------------------------------------------------------------------------------------- pretrain
def _pretrain_args(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        write_tiny_dataset(str(data), patients=4, slices=8, size=32)
    return ["pretrain", "--method", "byol", "--data", str(data), "--backbone", "test_resnet", "--batch-size", "8",
            "--max-steps", "2", "--storage", str(tmp_path / "runs"), "--experiment", "held",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--method-option", "hidden_dim=64",
            "--method-option", "out_dim=32", *extra]


def test_a_second_pretrain_of_a_held_experiment_is_refused_in_one_line_and_writes_nothing(tmp_path, hold,
                                                                                          capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = _pretrain_args(tmp_path)
    run_dir = tmp_path / "runs" / "held"
    pid = hold(str(run_dir), "pretrain held")
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(err) == 1 and re.fullmatch("ctssl pretrain: error: " + _refusal(str(run_dir), "pretrain held", pid,
                                                                              LEASE_FILE), err[0]), err
    assert list(_files(run_dir)) == [LEASE_FILE]  # no run settings, no checkpoint
    assert not (tmp_path / "mlflow.db").exists()


def test_a_pretrain_stopped_by_a_check_under_the_lease_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_pretrain_args(tmp_path, "--gpus-per-worker", "1")) == 2
    assert "this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # made for the lease only, removed with it


# ------------------------------------------------------------------------------------------ lease
def test_a_lease_removes_the_empty_folders_it_made_and_keeps_written_ones(tmp_path):
    with Lease(str(tmp_path / "a" / "b"), "x", tidy=True):
        assert (tmp_path / "a" / "b" / LEASE_FILE).exists()
    assert list(tmp_path.iterdir()) == []
    with Lease(str(tmp_path / "a" / "b"), "x"):  # without tidy the folder stays
        pass
    assert list(tmp_path.rglob("*")) == [tmp_path / "a", tmp_path / "a" / "b"]
    with Lease(str(tmp_path / "c" / "d"), "x", tidy=True):
        (tmp_path / "c" / "d" / "out.txt").write_text("kept")
    assert _files(tmp_path / "c") == {"d/out.txt": b"kept"}
    with Lease(str(tmp_path / "a" / "b"), "x", tidy=True):  # there before the lease: kept, though empty
        pass
    assert (tmp_path / "a" / "b").is_dir()

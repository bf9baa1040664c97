"""`ctssl wait-for`: the stage chaining primitive. It returns once the commit marker exists, logs a
line per poll while it waits, and fails naming what is still missing when the timeout passes."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from data_prep import shards
from ray_jobs.cli import main
from ray_jobs.commands.wait_for import wait_for
from ray_jobs.errors import CLIError


def _commit(url: str, delay: float) -> threading.Thread:
    def later() -> None:
        time.sleep(delay)
        shards.write_manifest(url, {"kind": "prep", "intensity": "hu", "shards": [
            {"path": "part-a.parquet", "rows": 7, "sha256": "0" * 64, "bytes": 1}], "counts": {}, "rejects": [],
            "config": {}})
    t = threading.Thread(target=later)
    t.start()
    return t


def test_returns_once_the_manifest_is_committed_and_logs_while_waiting(tmp_path: Path, caplog) -> None:
    out = str(tmp_path / "shards")
    t = _commit(out, 0.5)
    caplog.set_level(logging.INFO, logger="ctssl.wait_for")
    start = time.monotonic()
    wait_for([out], "manifest", timeout=30, poll=0.1)
    t.join()
    assert 0.4 < time.monotonic() - start < 10
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(waiting) >= 3  # one line per poll, each saying what and for how long
    assert out in waiting[0] and "elapsed" in waiting[0] and "timeout in" in waiting[0]
    assert "no committed output here" in waiting[0]
    assert any(r.getMessage() == f"ready: {out} (prep manifest, 1 shards, 7 rows)" for r in caplog.records)


def test_times_out_naming_every_missing_input(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shards.write_manifest(a, {"kind": "prep", "shards": []})
    with pytest.raises(CLIError) as err:
        wait_for([a, b], "manifest", timeout=0.3, poll=0.1)
    msg = str(err.value)
    assert msg.startswith("timed out after 0m00s waiting for manifest: ")
    assert b in msg and f"{a} (" not in msg


def test_cli_exit_code_is_2_on_timeout_and_0_when_ready(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "never.txt"
    assert main(["wait-for", str(missing), "--what", "file", "--timeout", "0.2", "--poll", "0.1"]) == 2
    assert f"timed out after 0m00s waiting for file: {missing} (does not exist yet)" in capsys.readouterr().err
    missing.write_text("x")
    assert main(["wait-for", str(missing), "--what", "file", "--timeout", "5", "--poll", "0.1"]) == 0


def test_checkpoint_waits_for_the_final_encoder_not_an_intermediate_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "study-byol"
    with pytest.raises(CLIError, match="no run folder yet"):
        wait_for([str(run)], "checkpoint", timeout=0.2, poll=0.1)
    early = run / "checkpoint_2026-11-22_00-10-00.000001"
    early.mkdir(parents=True)
    (early / "state.pt").write_bytes(b"s")
    (early / "progress.json").write_text("{}")
    with pytest.raises(CLIError, match=r"1 checkpoint\(s\), none final yet \(no encoder.pt\)"):
        wait_for([str(run)], "checkpoint", timeout=0.2, poll=0.1)
    final = run / "checkpoint_2026-11-22_00-20-00.000002"
    final.mkdir()
    for name in ("state.pt", "progress.json", "encoder.pt"):
        (final / name).write_bytes(b"x")
    with pytest.raises(CLIError):  # encoder config not uploaded yet: not final
        wait_for([str(run)], "checkpoint", timeout=0.2, poll=0.1)
    (final / "encoder_config.json").write_text("{}")
    wait_for([str(run)], "checkpoint", timeout=2, poll=0.1)


def test_waits_for_a_manifest_on_s3(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/study/shards"
    with pytest.raises(CLIError, match="no committed output here"):
        wait_for([url], "manifest", timeout=0.3, poll=0.1)
    t = _commit(url, 0.3)
    wait_for([url], "manifest", timeout=30, poll=0.2)
    t.join()


def test_sees_a_final_checkpoint_appear_on_s3_after_listing_the_run(s3_bucket: str) -> None:
    """Polls must not be answered from fsspec's listing cache: the run folder is listed while only an
    intermediate checkpoint exists, then the final one is uploaded."""
    from data_prep import storage

    run = f"s3://{s3_bucket}/study/pretrain/study-byol"
    fs, path = storage.open_fs(run)
    fs.pipe(f"{path}/checkpoint_000001/state.pt", b"s")
    with pytest.raises(CLIError, match="none final yet"):
        wait_for([run], "checkpoint", timeout=0.3, poll=0.1)

    def upload() -> None:
        time.sleep(0.4)
        for name in ("state.pt", "progress.json", "encoder_config.json", "encoder.pt"):
            fs.pipe(f"{path}/checkpoint_000002/{name}", b"x")

    t = threading.Thread(target=upload)
    t.start()
    wait_for([run], "checkpoint", timeout=30, poll=0.2)
    t.join()


def test_rejects_a_non_positive_timeout(tmp_path: Path) -> None:
    with pytest.raises(CLIError, match="must be positive"):
        wait_for([str(tmp_path)], "file", timeout=0, poll=1)

"""Crash and resume, de-identification (a byte scan of every output), S3, and the Ray executor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from ctssl_base.errors import UserError
from data_prep import shards
from data_prep.prep import PrepConfig, run_prep
from tests.conftest import TEST_DEID_KEY
from tests.data_prep.dicom_factory import FAKE_PHI, write_series

KEY = TEST_DEID_KEY.encode()


def _cohort(root: Path, patients: int = 6, slices: int = 4) -> None:
    for p in range(patients):
        phi = {**FAKE_PHI, "PatientID": f"PID-{p:04d}-XYZ", "PatientName": f"Patient^Number{p}"}
        write_series(root / f"PID-{p:04d}-XYZ" / "series", slices, seed=p, phi=phi)


def _run_cli(src: Path, dst: Path, *extra: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY}
    if failpoint:
        env["CTSSL_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", "prep", str(src), str(dst), "--no-progress",
                           "--executor", "local", "--rows-per-shard", "4", "--size", "0", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("failpoint", ["shard.after_write:3", "write.half:3", "shard.before_write:2"])
def test_kill_9_mid_run_then_rerun_resumes_without_duplicates_or_orphans(tmp_path, failpoint):
    src, dst = tmp_path / "src", tmp_path / "out"
    _cohort(src)
    r = _run_cli(src, dst, failpoint=failpoint)
    assert r.returncode == -9, r.stderr  # died by SIGKILL, like kill -9
    assert not (dst / "_manifest.json").exists()
    with pytest.raises(UserError):
        shards.read_table(str(dst))
    done_before = len(list((dst / "_commits").glob("*.json"))) if (dst / "_commits").exists() else 0

    r = _run_cli(src, dst)
    assert r.returncode == 0, r.stderr
    t = shards.read_table(str(dst))
    assert t.num_rows == 6 * 4
    assert len(set(t["slice_id"].to_pylist())) == 24, "no slice may be written twice"
    m = shards.read_manifest(str(dst))
    listed = {s["path"] for s in m["shards"]}
    on_disk = {p.name for p in dst.iterdir() if p.name.startswith("part-") or ".tmp-" in p.name}
    assert on_disk == listed, "orphan shards or temp files left in the listing"
    if done_before:
        assert "series already committed" in r.stderr


def test_rerun_of_a_finished_output_does_nothing_and_new_series_are_added(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _cohort(src, patients=2)
    assert _run_cli(src, dst).returncode == 0
    first = shards.read_manifest(str(dst))
    r = _run_cli(src, dst)
    assert r.returncode == 0 and "2 series resumed" in r.stdout
    assert {s["path"] for s in shards.read_manifest(str(dst))["shards"]} == {s["path"] for s in first["shards"]}
    write_series(src / "PID-new" / "s", 3, seed=9)
    assert _run_cli(src, dst).returncode == 0
    assert shards.read_table(str(dst)).num_rows == 2 * 4 + 3


def test_no_phi_value_appears_in_any_output_byte_or_log(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _cohort(src, patients=3)
    (src / "PID-0000-XYZ" / "broken.dcm").write_bytes(b"not dicom")  # a reject whose path holds a PatientID
    r = _run_cli(src, dst)
    assert r.returncode == 0
    phi = set(FAKE_PHI.values()) | {f"PID-{p:04d}-XYZ" for p in range(3)} | {f"Number{p}" for p in range(3)}
    import pydicom

    for f in src.rglob("IM*"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        phi |= {str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)}
    blobs = [p.read_bytes() for p in dst.rglob("*") if p.is_file()]
    # Parquet pages are zstd-compressed: scan the decoded rows as well as the raw bytes.
    t = shards.read_table(str(dst))
    blobs.append(str(t.drop_columns(["image"]).to_pylist()).encode())
    blobs += [r.stdout.encode(), r.stderr.encode()]
    for value in phi:
        for b in blobs:
            assert value.encode() not in b, f"PHI value {value!r} leaked into the output"
    m = shards.read_manifest(str(dst))
    assert [x["input"] for x in m["rejects"]] == ["[redacted]/broken.dcm"]
    assert len(set(t["patient_id"].to_pylist())) == 3


def test_pseudonyms_are_stable_across_runs_and_change_with_the_key(tmp_path):
    src = tmp_path / "src"
    _cohort(src, patients=2)
    a = run_prep(PrepConfig(str(src), str(tmp_path / "a"), executor="local", progress=False), KEY)
    b = run_prep(PrepConfig(str(src), str(tmp_path / "b"), executor="local", progress=False), KEY)
    c = run_prep(PrepConfig(str(src), str(tmp_path / "c"), executor="local", progress=False),
                 b"another-key-4f9a1c7e2b8d6053e1a9")
    assert a.committed and b.committed and c.committed
    ids = {k: sorted(set(shards.read_table(str(tmp_path / k))["patient_id"].to_pylist())) for k in "abc"}
    assert ids["a"] == ids["b"] and set(ids["a"]).isdisjoint(ids["c"])


def test_prep_into_s3_and_read_back_through_the_reader(tmp_path, s3_bucket):
    src = tmp_path / "src"
    _cohort(src, patients=3, slices=5)
    url = f"s3://{s3_bucket}/prep/run1"
    s = run_prep(PrepConfig(str(src), url, executor="local", progress=False, rows_per_shard=6, size=None), KEY)
    assert s.committed and s.slices_written == 15
    t = shards.read_table(url)
    assert t.num_rows == 15
    local = run_prep(PrepConfig(str(src), str(tmp_path / "local"), executor="local", progress=False,
                                rows_per_shard=6, size=None), KEY)
    assert local.committed
    tl = shards.read_table(str(tmp_path / "local"))
    key = "slice_id"
    a = t.sort_by(key)
    b = tl.sort_by(key)
    assert a["slice_id"].equals(b["slice_id"]) and a["image"].equals(b["image"])
    n = sum(len(bt["image"]) for bt in shards.iter_slices(url, batch_rows=4))
    assert n == 15
    fs, files = shards.committed_files(url)
    assert len(files) == len(shards.read_manifest(url)["shards"]) and fs.type_name == "s3"


def test_unreachable_or_missing_bucket_is_a_clear_error(tmp_path, s3_server, monkeypatch):
    src = tmp_path / "src"
    _cohort(src, patients=1)
    monkeypatch.setenv("CTSSL_S3_ENDPOINT_URL", s3_server)
    with pytest.raises(UserError, match=r"s3://no-such-bucket-ctssl/x: destination is not writable"):
        run_prep(PrepConfig(str(src), "s3://no-such-bucket-ctssl/x", executor="local", progress=False), KEY)
    from tests.conftest import free_port

    monkeypatch.setenv("CTSSL_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(UserError, match="not writable"):
        run_prep(PrepConfig(str(src), "s3://bucket/x", executor="local", progress=False), KEY)


def test_two_ray_workers_and_two_shard_indexes_give_the_same_rows_as_one_process(tmp_path):
    src = tmp_path / "src"
    _cohort(src, patients=6, slices=3)
    one = tmp_path / "one"
    run_prep(PrepConfig(str(src), str(one), executor="local", progress=False, size=None), KEY)
    ray_out = tmp_path / "ray"
    s = run_prep(PrepConfig(str(src), str(ray_out), executor="ray", workers=2, progress=False, size=None), KEY)
    assert s.committed
    idx = tmp_path / "idx"
    s0 = run_prep(PrepConfig(str(src), str(idx), executor="local", progress=False, size=None,
                             shard_index=0, num_shards=2), KEY)
    assert not s0.committed and not (idx / "_manifest.json").exists()
    s1 = run_prep(PrepConfig(str(src), str(idx), executor="local", progress=False, size=None,
                             shard_index=1, num_shards=2), KEY)
    assert s1.committed
    ref = shards.read_table(str(one)).sort_by("slice_id")
    for out in (ray_out, idx):
        t = shards.read_table(str(out)).sort_by("slice_id")
        assert t["slice_id"].equals(ref["slice_id"]) and t["image"].equals(ref["image"])
        assert t["dhash"].equals(ref["dhash"])
    assert int(pc.sum(pc.equal(ref["slice_index"], 0)).as_py()) == 6
    assert np.all(np.asarray(ref["dhash"]) > 0)

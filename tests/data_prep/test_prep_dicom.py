"""ctssl prep on DICOM: real files, ordering, HU fidelity, bad inputs, the reader's guarantees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ctssl_base.errors import ManifestError, UserError
from data_prep import shards
from data_prep.prep import PrepConfig, RejectThresholdExceeded, run_prep
from tests.conftest import TEST_DEID_KEY
from tests.data_prep.dicom_factory import write_ct, write_series

KEY = TEST_DEID_KEY.encode()


def prep(src, dst, **kw) -> object:
    kw.setdefault("executor", "local")
    kw.setdefault("progress", False)
    return run_prep(PrepConfig(src=str(src), dst=str(dst), **kw), KEY)


def test_real_jpeg2000_series_gives_20_rows_of_one_patient_ordered_by_z_with_pydicom_hu(real_ct_dir, tmp_path):
    s = prep(real_ct_dir, tmp_path / "out", size=None)
    assert s.committed and s.slices_written == 20 and s.rejected == 0
    t = shards.read_table(str(tmp_path / "out"))
    assert t.num_rows == 20
    assert len(set(t["patient_id"].to_pylist())) == 1
    assert len(set(t["series_id"].to_pylist())) == 1
    z = np.array(t["z_mm"].to_pylist())
    idx = np.array(t["slice_index"].to_pylist())
    assert list(idx) == list(range(20))
    assert np.all(np.diff(z) > 0), "slices must be ordered along the slice normal"

    images = shards.decode_images(t)
    assert images.shape == (20, 512, 512)
    # Air at -1024; the brightest bone voxel pydicom decodes in these 20 slices is 1839 HU (the data
    # README's "about 1436" is a typical slice's maximum).
    assert images.min() == -1024 and 1400 <= images.max() <= 1900
    # Same HU as pydicom's own decode of the same files, slice by slice (matched by position).
    ref = {}
    for f in real_ct_dir.iterdir():
        ds = pydicom.dcmread(f)
        zf = float(ds.ImagePositionPatient[2])
        ref[round(zf, 3)] = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    for i in range(20):
        assert np.array_equal(images[i], ref[round(z[i], 3)])


def test_real_series_resized_to_256_keeps_hu_range_and_scales_spacing(real_ct_dir, tmp_path):
    prep(real_ct_dir, tmp_path / "out")
    t = shards.read_table(str(tmp_path / "out"))
    img = shards.decode_images(t)
    assert img.shape == (20, 256, 256)
    assert img.min() >= -1024 and img.max() <= 1436
    spacing = np.array(t["spacing_mm"].to_pylist())
    ds = pydicom.dcmread(next(real_ct_dir.iterdir()), stop_before_pixels=True)
    assert np.allclose(spacing, float(ds.PixelSpacing[0]) * 2, rtol=1e-5)


def test_pydicom_ct_small_without_uids_problems_is_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = Path(get_testdata_file("CT_small.dcm"))
    (src / "ct_small.dcm").write_bytes(f.read_bytes())
    s = prep(src, tmp_path / "out", size=None)
    assert s.slices_written == 1 and s.rejected == 0
    ds = pydicom.dcmread(f)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got = shards.decode_images(shards.read_table(str(tmp_path / "out")))[0]
    assert np.array_equal(got, np.clip(np.rint(expected), -1024, 3071).astype(np.int16))


def test_slices_are_ordered_by_position_not_by_file_name(tmp_path):
    write_series(tmp_path / "src" / "p1", 7, shuffle_names=True, seed=3)
    prep(tmp_path / "src", tmp_path / "out", size=None)
    img = shards.decode_images(shards.read_table(str(tmp_path / "out")))
    centre = img[:, 16, 16]
    assert list(centre) == [10 * i for i in range(7)]


def test_every_bad_input_is_listed_with_its_reason_and_good_inputs_are_still_written(tmp_path):
    src = tmp_path / "src"
    write_series(src / "good", 5)
    (src / "junk").mkdir()
    (src / "junk" / "notes.bin").write_bytes(b"this is not a DICOM file at all" * 10)
    good = write_series(src / "trunc", 1)[0]
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated inside the pixel data
    hu = np.zeros((32, 32), np.int16)
    write_ct(src / "mr" / "mr1", hu, z=0, series_uid="1.2.3.1", study_uid="1.2.3", modality="MR")
    write_ct(src / "nopix" / "np1", hu, z=0, series_uid="1.2.3.2", study_uid="1.2.3", pixels=False)
    write_ct(src / "mixed" / "a", hu, z=0, series_uid="1.2.3.3", study_uid="1.2.3")
    write_ct(src / "mixed" / "b", hu, z=2, series_uid="1.2.3.3", study_uid="1.2.3")
    write_ct(src / "mixed" / "c", np.zeros((16, 16), np.int16), z=4, series_uid="1.2.3.3", study_uid="1.2.3")
    labels = src / "labels.csv"
    labels.write_text("file,label\ngood,healthy\nmissing/IM0000,sick\n")

    s = prep(src, tmp_path / "out", size=None, labels_csv=str(labels))
    reasons = {r["input"]: r["reason"] for r in s.rejects}
    assert "not a DICOM" in reasons["junk/notes.bin"]
    assert any("decoded" in v or "unreadable" in v for k, v in reasons.items() if k.startswith("trunc/"))
    assert reasons["mr/mr1"] == "modality MR, not CT"
    assert reasons["nopix/np1"] == "DICOM object without pixel data"
    assert "16x16 differs" in reasons["mixed/c"]
    assert "labels CSV" in reasons["labels.csv: missing/IM0000"]
    assert s.rejected == 6 and s.ignored == 1  # labels.csv itself is listed as ignored, not rejected
    t = shards.read_table(str(tmp_path / "out"))
    assert t.num_rows == 5 + 2  # the good series and the two same-size slices of the mixed series
    assert t.filter(pyarrow_eq(t, "label", "healthy")).num_rows == 5
    m = shards.read_manifest(str(tmp_path / "out"))
    assert m["counts"]["rejected"] == 6 and len(m["rejects"]) == 6


def pyarrow_eq(t, col, value):
    import pyarrow.compute as pc

    return pc.equal(t[col], value)


def test_max_reject_fraction_fails_the_run_but_keeps_the_good_output(tmp_path):
    src = tmp_path / "src"
    write_series(src / "good", 3)
    for i in range(3):
        (src / f"bad{i}").write_bytes(b"garbage")
    with pytest.raises(RejectThresholdExceeded,
                       match=r"3 of 6 inputs rejected \(50.0% > --max-reject-fraction 10.0%\)"):
        prep(src, tmp_path / "out", max_reject_fraction=0.1)
    assert shards.read_table(str(tmp_path / "out")).num_rows == 3


def test_cli_exit_codes_and_summary(tmp_path):
    src = tmp_path / "src"
    write_series(src / "good", 2)
    (src / "bad").write_bytes(b"garbage")
    env = {**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY}
    cmd = [sys.executable, "-m", "ray_jobs.cli", "prep", str(src), str(tmp_path / "out"), "--no-progress"]
    r = subprocess.run([*cmd, "--max-reject-fraction", "0.2"], env=env, capture_output=True, text=True)
    assert r.returncode == 3
    assert "1 of 3 inputs rejected" in r.stdout and "rejected bad: not a DICOM" in r.stdout
    env.pop("CTSSL_DEID_KEY")
    cmd[5] = str(tmp_path / "out2")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no de-identification key" in r.stderr and "Traceback" not in r.stderr


def test_missing_input_and_unknown_source_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prep(tmp_path / "nope", tmp_path / "out", source="dicom")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"1")
    with pytest.raises(UserError, match="could not tell the layout"):
        prep(tmp_path / "empty", tmp_path / "out")


def test_reader_refuses_uncommitted_and_tampered_outputs(tmp_path):
    write_series(tmp_path / "src" / "a", 4)
    out = tmp_path / "out"
    prep(tmp_path / "src", out)
    m = json.loads((out / "_manifest.json").read_text())
    shard = out / m["shards"][0]["path"]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="checksum"):
        shards.read_table(str(out))
    (out / "_manifest.json").unlink()
    with pytest.raises(ManifestError, match="no committed output"):
        shards.read_table(str(out))


def test_rerun_with_other_settings_into_same_destination_is_refused(tmp_path):
    write_series(tmp_path / "src" / "a", 2)
    prep(tmp_path / "src", tmp_path / "out", size=None)
    with pytest.raises(UserError, match="other settings"):
        prep(tmp_path / "src", tmp_path / "out", size=16)


def test_iter_slices_streams_exactly_the_committed_rows(tmp_path):
    for p in range(3):
        write_series(tmp_path / "src" / f"p{p}", 5, seed=p)
    prep(tmp_path / "src", tmp_path / "out", size=None, rows_per_shard=4)
    m = shards.read_manifest(str(tmp_path / "out"))
    assert len(m["shards"]) >= 2
    batches = list(shards.iter_slices(str(tmp_path / "out"), batch_rows=3))
    assert sum(len(b["image"]) for b in batches) == 15
    assert all(b["image"].dtype == np.int16 and b["image"].shape[1:] == (32, 32) for b in batches)
    ids = np.concatenate([b["slice_id"] for b in batches])
    assert len(set(ids)) == 15


def test_malformed_header_numbers_reject_the_file_with_the_element_named(tmp_path):
    src = tmp_path / "src"
    write_series(src / "good", 3)
    bad = write_ct(src / "bad" / "b1", np.zeros((32, 32), np.int16), z=0, series_uid="1.2.3.9", study_uid="1.2.3")
    raw = bytearray(bad.read_bytes())
    at = raw.index(b"\x28\x00\x53\x10DS") + 6  # (0028,1053) RescaleSlope, explicit VR LE
    n = int.from_bytes(raw[at:at + 2], "little")
    raw[at + 2:at + 2 + n] = b"x" * n  # what a broken exporter leaves in a DS element
    bad.write_bytes(bytes(raw))
    s = prep(src, tmp_path / "out", size=None)
    reasons = {r["input"]: r["reason"] for r in s.rejects}
    assert reasons == {"bad/b1": f"malformed header: RescaleSlope holds {'x' * n!r}, not numbers"}
    assert shards.read_table(str(tmp_path / "out")).num_rows == 3


def test_non_ascii_patient_names_are_read_with_their_character_set_and_redacted(tmp_path):
    """Header values are read from raw bytes only when ASCII; a UTF-8 name takes pydicom's decoding,
    so the redaction still finds it in a folder name."""
    name, pid = "Müller^Jürgen", "PID-ÄÖ-4711"
    src = tmp_path / "src"
    files = write_series(src / "Müller Jürgen", 3)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName, ds.PatientID = name, pid
        ds.save_as(f)
    truncated = files[0].parent / "IM_trunc"
    truncated.write_bytes(files[1].read_bytes()[:2000])
    s = prep(src, tmp_path / "out", size=None)
    assert s.slices_written == 3 and s.rejected == 1
    blob = json.dumps(shards.read_manifest(str(tmp_path / "out")), ensure_ascii=False)
    for value in ("Müller", "Jürgen", pid):
        assert value not in blob
    assert "[redacted]" in s.rejects[0]["input"]

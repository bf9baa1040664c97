"""DICOM series identity over the whole input: split and copied series, repeated instances, Enhanced
(multi-frame) CT, repeated slice ids in readers, resume without duplicates, PHI-named folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ctssl_base.errors import UserError
from data_prep import shards
from data_prep.prep import PrepConfig, run_prep
from data_prep.reduce.load import load_slice_set
from tests.conftest import TEST_DEID_KEY
from tests.data_prep.dicom_factory import FAKE_PHI, write_series

KEY = TEST_DEID_KEY.encode()
ROOT = Path(__file__).resolve().parents[2]


def prep(src, dst, **kw):
    kw.setdefault("executor", "local")
    kw.setdefault("progress", False)
    return run_prep(PrepConfig(src=str(src), dst=str(dst), **kw), KEY)


def rows(dst) -> dict[str, list]:
    t = shards.read_table(str(dst))
    order = np.lexsort((np.array(t["slice_index"].to_pylist()), np.array(t["series_id"].to_pylist())))
    out = {c: [t[c].to_pylist()[i] for i in order] for c in ("slice_id", "series_id", "slice_index", "z_mm",
                                                               "spacing_mm")}
    out["image"] = shards.decode_images(t)[order]
    return out


def manifest(dst) -> dict:
    return shards.read_manifest(str(dst))


def test_series_split_over_two_top_level_folders_is_one_series_in_z_order(tmp_path):
    paths = write_series(tmp_path / "tmp_series", 8, size=16)
    for i, p in enumerate(sorted(paths)):  # interleave the files over two top-level folders
        dest = tmp_path / "src" / ("a" if i % 2 else "b") / "sub" / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, dest)
    s = prep(tmp_path / "src", tmp_path / "out", size=None)
    r = rows(tmp_path / "out")
    assert s.series == 1 and s.slices_written == 8 and s.rejected == 0
    assert len(set(r["series_id"])) == 1 and len(set(r["slice_id"])) == 8
    assert r["slice_index"] == list(range(8))
    assert r["z_mm"] == [2.0 * i for i in range(8)]
    # slice i of the factory holds HU 10*i inside: z order and content agree
    assert [int(img[8, 8]) for img in r["image"]] == [10 * i for i in range(8)]


def test_two_copies_of_a_series_give_one_set_of_rows_and_duplicate_rejects(tmp_path):
    write_series(tmp_path / "src" / "copy1", 5, size=16)
    shutil.copytree(tmp_path / "src" / "copy1", tmp_path / "src" / "copy2")
    s = prep(tmp_path / "src", tmp_path / "out", size=None)
    assert s.slices_written == 5 and s.series == 1
    assert len(s.rejects) == 5
    for r in s.rejects:
        assert r["input"].startswith("copy2/")
        assert r["reason"].startswith("duplicate of copy1/" + os.path.basename(r["input"]))
    assert manifest(tmp_path / "out")["counts"]["inputs"] == 10


def test_byte_identical_copies_without_instance_uids_are_duplicates(real_ct_dir, tmp_path):
    files = sorted(real_ct_dir.iterdir())[:3]  # the real files have empty SOP/Series UIDs
    for sub in ("x", "y"):
        (tmp_path / "src" / sub).mkdir(parents=True)
        for f in files:
            shutil.copy(f, tmp_path / "src" / sub / f.name)
    s = prep(tmp_path / "src", tmp_path / "out", size=64)
    assert s.slices_written == 3
    assert sorted(r["input"] for r in s.rejects) == sorted(f"y/{f.name}" for f in files)
    assert all("duplicate of x/" in r["reason"] and "byte-identical" in r["reason"] for r in s.rejects)


def test_same_sop_instance_uid_twice_in_one_folder_is_one_row_and_a_reject(tmp_path):
    paths = write_series(tmp_path / "src", 4, size=16)
    ds = pydicom.dcmread(paths[0])
    ds.ImagePositionPatient = [-100.0, -100.0, 99.0]  # other content, same instance UID
    ds.save_as(tmp_path / "src" / "ZZ_again")
    s = prep(tmp_path / "src", tmp_path / "out", size=None)
    assert s.slices_written == 4
    assert s.rejects == [{"input": "ZZ_again", "reason": f"duplicate of {paths[0].name} (same SOPInstanceUID)"}]


def _hand_made_output(url: str, slice_index: list[int], slice_ids: list[str]) -> None:
    n = len(slice_index)
    w = shards.ShardWriter()
    w.write(shards.table_from_arrays(
        np.zeros((n, 8, 8), np.int16), slice_id=slice_ids, patient_id=["p"] * n, study_id=["st"] * n,
        series_id=["ser"] * n, slice_index=slice_index, z_mm=[float(i) for i in slice_index],
        spacing_mm=[[1.0, 1.0]] * n, source=["x"] * n, label=[None] * n, dhash=[0] * n))
    rec = w.finish(url, "part-0.parquet").as_dict()
    shards.write_manifest(url, {"kind": "prep", "intensity": "hu", "shards": [rec], "counts": {"slices": n},
                                "rejects": [], "config": {}})


def _reduce_cli(src: str, dst: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", "reduce", src, dst, "--strategy", "every_n",
                           "--threshold", "2", "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("index, ids", [
    ([0, 1, 2, 0, 1, 2], [f"ser-{i:05d}" for i in (0, 1, 2, 0, 1, 2)]),  # the split-folder output of old
    ([0, 1, 1, 2], ["a", "b", "c", "d"]),  # unique ids, repeated index
])
def test_reduce_every_n_on_repeated_slices_is_one_line_not_a_key_error(tmp_path, index, ids):
    src = str(tmp_path / "prep")
    _hand_made_output(src, index, ids)
    with pytest.raises(UserError, match="repeated slices"):
        load_slice_set(src)
    p = _reduce_cli(src, str(tmp_path / "sel"))
    assert p.returncode != 0
    assert "KeyError" not in p.stderr and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("ctssl reduce: error:")]
    assert len(errors) == 1 and "repeated slices" in errors[0]


def test_reduce_every_n_copes_with_gaps_in_slice_index(tmp_path):
    src = str(tmp_path / "prep")
    _hand_made_output(src, [3, 5, 9, 10], ["a", "b", "c", "d"])
    p = _reduce_cli(src, str(tmp_path / "sel"))
    assert p.returncode == 0, p.stderr[-2000:]
    kept = shards.read_table(str(tmp_path / "sel"), columns=["slice_id"])["slice_id"].to_pylist()
    assert sorted(kept) == ["a", "c"]


def test_commit_refuses_a_series_whose_slice_index_repeats(tmp_path, monkeypatch):
    from data_prep.sources.dicom import DicomSource

    write_series(tmp_path / "src", 3, size=16)
    real = DicomSource.load_many

    def broken(self, task, opts):
        out = real(self, task, opts)
        for s in out[0].slices:
            s.slice_index = 0
        return out

    monkeypatch.setattr(DicomSource, "load_many", broken)
    with pytest.raises(UserError, match="slice_index is not 0..2 once each"):
        prep(tmp_path / "src", tmp_path / "out", size=None)


# --------------------------------------------------------------------------------- Enhanced CT
def _enhanced_from(files: list[Path], path: Path, *, mixed_orientation: bool = False,
                   drop_position: int | None = None, per_frame_rescale: bool = True) -> Path:
    """An Enhanced CT file holding the decoded frames of classic slices, in reverse file order (the
    reader must order by position), uncompressed; geometry in the functional groups."""
    dss = [pydicom.dcmread(f) for f in files][::-1]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    out.SOPClassUID, out.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    out.Modality = "CT"
    out.SeriesInstanceUID, out.StudyInstanceUID = generate_uid(), generate_uid()
    for k, v in FAKE_PHI.items():
        setattr(out, k, v)
    first = dss[0]
    out.Rows, out.Columns = first.Rows, first.Columns
    out.NumberOfFrames = len(dss)
    out.SamplesPerPixel, out.PhotometricInterpretation = 1, "MONOCHROME2"
    out.BitsAllocated, out.BitsStored, out.HighBit = 16, 16, 15
    out.PixelRepresentation = first.PixelRepresentation
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(first.PixelSpacing)
    measures.SliceThickness = first.get("SliceThickness", 1.0)
    shared.PixelMeasuresSequence = Sequence([measures])
    if not mixed_orientation:
        orient = Dataset()
        orient.ImageOrientationPatient = list(first.ImageOrientationPatient)
        shared.PlaneOrientationSequence = Sequence([orient])
    if not per_frame_rescale:
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = first.RescaleSlope, first.RescaleIntercept, "HU"
        shared.PixelValueTransformationSequence = Sequence([pvt])
    out.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for i, ds in enumerate(dss):
        g = Dataset()
        if drop_position != i:
            pos = Dataset()
            pos.ImagePositionPatient = list(ds.ImagePositionPatient)
            g.PlanePositionSequence = Sequence([pos])
        if mixed_orientation:
            o = Dataset()
            o.ImageOrientationPatient = [1, 0, 0, 0, 1, 0] if i % 2 else [0, 1, 0, 0, 0, -1]
            g.PlaneOrientationSequence = Sequence([o])
        if per_frame_rescale:
            pvt = Dataset()
            pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = ds.RescaleSlope, ds.RescaleIntercept, "HU"
            g.PixelValueTransformationSequence = Sequence([pvt])
        per_frame.append(g)
    out.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    dtype = "<i2" if first.PixelRepresentation else "<u2"
    out.PixelData = np.stack([ds.pixel_array.astype(dtype) for ds in dss]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("per_frame_rescale", [True, False])
def test_enhanced_ct_gives_the_same_rows_as_the_classic_slices(real_ct_dir, tmp_path, per_frame_rescale):
    files = sorted(real_ct_dir.iterdir())[4:10]
    classic = tmp_path / "classic"
    classic.mkdir()
    for f in files:
        shutil.copy(f, classic / f.name)
    _enhanced_from(files, tmp_path / "enh" / "series.dcm", per_frame_rescale=per_frame_rescale)
    a = prep(classic, tmp_path / "out_a", size=128)
    b = prep(tmp_path / "enh", tmp_path / "out_b", size=128)
    assert a.slices_written == b.slices_written == 6 and a.rejected == b.rejected == 0
    ra, rb = rows(tmp_path / "out_a"), rows(tmp_path / "out_b")
    assert rb["slice_index"] == list(range(6))
    assert rb["z_mm"] == ra["z_mm"] and np.all(np.diff(rb["z_mm"]) > 0)
    assert rb["spacing_mm"] == ra["spacing_mm"]
    assert np.array_equal(ra["image"], rb["image"])


def test_enhanced_frames_fill_position_orientation_and_native_size(real_ct_dir, tmp_path):
    from data_prep.sources.base import PrepOptions
    from data_prep.sources.dicom import DicomSource

    files = sorted(real_ct_dir.iterdir())[:3]
    _enhanced_from(files, tmp_path / "enh" / "series.dcm")
    src = DicomSource()
    tasks, _ = src.discover(str(tmp_path / "enh"), PrepOptions(size=64))
    assert len(tasks) == 1 and src.count_slices(tasks[0]) == 3
    data = src.load(tasks[0], PrepOptions(size=64))
    zs = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files)
    assert [s.position_mm[2] for s in data.slices] == zs
    assert all(s.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0) and s.native_size == (512, 512) for s in data.slices)
    # frame k holds files[::-1][k - 1]: the rows follow z, not the frame order
    z_of_frame = {k + 1: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
                  for k, f in enumerate(files[::-1])}
    assert [s.input for s in data.slices] == [f"series.dcm#{k}" for k in sorted(z_of_frame, key=z_of_frame.get)]


def test_classic_slices_fill_position_orientation_and_native_size(tmp_path):
    from data_prep.sources.base import PrepOptions
    from data_prep.sources.dicom import DicomSource

    write_series(tmp_path / "src", 3, size=16)
    src = DicomSource()
    tasks, _ = src.discover(str(tmp_path / "src"), PrepOptions(size=None))
    data = src.load(tasks[0], PrepOptions(size=None))
    assert [s.position_mm for s in data.slices] == [(-100.0, -100.0, 2.0 * i) for i in range(3)]
    assert {s.orientation for s in data.slices} == {(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)}
    assert {s.native_size for s in data.slices} == {(16, 16)}


def test_single_frame_enhanced_ct_takes_its_geometry_from_the_functional_groups(real_ct_dir, tmp_path):
    f = sorted(real_ct_dir.iterdir())[7]
    _enhanced_from([f], tmp_path / "enh" / "one.dcm")
    s = prep(tmp_path / "enh", tmp_path / "out", size=64)
    assert s.slices_written == 1 and s.rejected == 0
    z = float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    assert rows(tmp_path / "out")["z_mm"] == [z]


@pytest.mark.parametrize("kind, reason", [
    ({"mixed_orientation": True}, "frames have different orientations"),
    ({"drop_position": 2}, "frame 3 has no position"),
])
def test_enhanced_with_mixed_orientation_or_missing_position_is_one_clear_reject(real_ct_dir, tmp_path, kind,
                                                                                 reason):
    files = sorted(real_ct_dir.iterdir())[:4]
    _enhanced_from(files, tmp_path / "src" / "bad.dcm", **kind)
    write_series(tmp_path / "src" / "good", 2, size=16)
    s = prep(tmp_path / "src", tmp_path / "out", size=64)
    assert s.slices_written == 2
    assert len(s.rejects) == 1 and s.rejects[0]["input"] == "bad.dcm"
    assert reason in s.rejects[0]["reason"] and "Traceback" not in s.rejects[0]["reason"]


# --------------------------------------------------------------------------- resume and PHI names
def _prep_cli(src: Path, dst: Path, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY}
    env.pop("CTSSL_FAILPOINT", None)
    if failpoint:
        env["CTSSL_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", "prep", str(src), str(dst), "--executor", "local",
                           "--size", "16", "--rows-per-shard", "4", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)


def _split_cohort(src: Path) -> None:
    """Three series, each split over two PHI-named top-level folders, plus a copy and an unreadable file."""
    for k in range(3):
        phi = {**FAKE_PHI, "PatientName": f"Quirke^Philomena{k}", "PatientID": f"MRN-55{k}1234"}
        paths = write_series(src / "tmp" / str(k), 4, size=16, seed=k, phi=phi)
        for i, p in enumerate(sorted(paths)):
            folder = src / (phi["PatientName"] if i % 2 else phi["PatientID"]) / f"s{k}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.move(p, folder / p.name)
    shutil.rmtree(src / "tmp")
    shutil.copytree(src / "Quirke^Philomena0", src / "Quirke^Philomena0_copy")
    (src / "MRN-5501234" / "broken").write_bytes(b"not dicom at all")


def test_resume_after_a_crash_has_no_duplicates_and_phi_folder_names_never_appear(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _split_cohort(src)
    crashed = _prep_cli(src, dst, failpoint="shard.after_write:2")
    assert crashed.returncode != 0 and not (dst / shards.MANIFEST).exists()
    done = _prep_cli(src, dst)
    assert done.returncode == 0, done.stderr[-2000:]
    r = rows(dst)
    assert len(r["slice_id"]) == len(set(r["slice_id"])) == 12
    assert len(set(r["series_id"])) == 3
    m = manifest(dst)
    assert m["counts"]["series"] == 3 and m["counts"]["slices_written"] == 12
    reasons = [x["reason"] for x in m["rejects"]]
    assert sum(x.startswith("duplicate of ") for x in reasons) == 2 and sum("not a DICOM" in x for x in reasons) == 1
    text = (dst / shards.MANIFEST).read_text() + crashed.stdout + crashed.stderr + done.stdout + done.stderr
    text += "".join(p.read_text() for p in (dst / shards.COMMITS_DIR).iterdir())
    for k in range(3):
        for value in (f"Quirke^Philomena{k}", f"Philomena{k}", f"MRN-55{k}1234", "Quirke"):
            assert value not in text
    assert json.loads((dst / shards.MANIFEST).read_text())["rejects"]


def test_fast_header_reads_the_same_values_as_pydicom(real_ct_dir, tmp_path):
    from data_prep.sources.dicom import HEADER_TAGS, fast_header, header_text

    files = [*write_series(tmp_path / "syn", 2, size=16), *sorted(real_ct_dir.iterdir())[:2],
             _enhanced_from(sorted(real_ct_dir.iterdir())[:2], tmp_path / "enh.dcm")]
    for f in files:
        fast = fast_header(str(f))
        assert fast is not None, f
        ref = pydicom.dcmread(f, stop_before_pixels=True)
        for k in HEADER_TAGS:
            assert header_text(fast, k) == header_text(ref, k), (f, k)
    (tmp_path / "short").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0")
    assert fast_header(str(tmp_path / "short")) is None  # too short: pydicom decides


def test_discovery_shows_no_reader_warning(tmp_path):
    """pydicom's warnings can quote header values: discovery (which prints nothing) keeps them quiet;
    loading reads the file again, where prep records them redacted."""
    import warnings

    from data_prep.sources.base import PrepOptions
    from data_prep.sources.dicom import DicomSource

    p = write_series(tmp_path / "src", 1, size=8)[0]
    ds = pydicom.dcmread(p)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.add_new(0x00100010, "PN", b"Doe\xff\xfeJanet")  # not UTF-8: pydicom warns when it decodes it
    ds.save_as(p)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        tasks, rejects = DicomSource().discover(str(tmp_path / "src"), PrepOptions())
    assert len(tasks) == 1 and not rejects
    assert [str(w.message) for w in got] == []

"""NIfTI source: axial slices in viewer orientation, z order and spacing from the affine, bad volumes."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from data_prep import shards
from data_prep.prep import PrepConfig, run_prep
from data_prep.sources import get_source
from data_prep.sources.base import PrepOptions, detect_source
from data_prep.sources.nifti import patient_of
from tests.conftest import TEST_DEID_KEY


def _las_volume(shape=(20, 16, 5)) -> tuple[np.ndarray, np.ndarray]:
    """An int16 volume stored the way dcm2niix often does: x flipped (LAS) and z stored top-down.

    Voxel (0, last, 0) is the patient's right-anterior-superior corner and holds 1000 HU; slice k
    holds background -1000 + 10 * k so the slice order is visible in the values.
    """
    data = np.zeros(shape, dtype=np.int16)
    for k in range(shape[2]):
        data[..., k] = -1000 + 10 * k
    data[0, shape[1] - 1, 0] = 1000
    affine = np.diag([-0.8, 0.9, -2.5, 1.0])
    affine[:3, 3] = [100.0, -50.0, 300.0]
    return data, affine


def _opts(size=None, labels=None) -> PrepOptions:
    return PrepOptions(size=size, dataset="ni", labels_csv=labels)


def test_volume_becomes_axial_slices_ordered_by_z_in_viewer_orientation(tmp_path):
    data, affine = _las_volume()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "case1.nii.gz")
    src = get_source("nifti")
    tasks, rejects = src.discover(str(tmp_path), _opts())
    assert rejects == [] and len(tasks) == 1 and src.count_slices(tasks[0]) == 5
    series = src.load(tasks[0], _opts())
    assert [s.slice_index for s in series.slices] == [0, 1, 2, 3, 4]
    z = [s.z_mm for s in series.slices]
    assert z == pytest.approx([290.0, 292.5, 295.0, 297.5, 300.0])  # ascending z: feet -> head
    # stored slice k=4 (value -960) is the most inferior, so it comes first; k=0 comes last
    assert [int(np.median(s.hu)) for s in series.slices] == [-960, -970, -980, -990, -1000]
    top = series.slices[-1].hu
    assert top.shape == (16, 20)  # rows along y (16 voxels), columns along x (20 voxels)
    # right-anterior corner is drawn top-left, as DICOM viewers show axial CT
    assert top[0, 0] == 1000 and np.count_nonzero(top == 1000) == 1
    assert series.slices[0].spacing_mm == pytest.approx((0.9, 0.8))
    assert series.patient == "case1" and series.slices[0].input == "case1.nii.gz#z0"


def test_resizing_pads_the_short_side_with_air_and_scales_the_spacing(tmp_path):
    data, affine = _las_volume((20, 10, 2))
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii")
    src = get_source("nifti")
    tasks, _ = src.discover(str(tmp_path), _opts(size=40))
    s = src.load(tasks[0], _opts(size=40)).slices[0]
    assert s.hu.shape == (40, 40)
    assert s.spacing_mm == pytest.approx((0.45, 0.4))
    assert np.all(s.hu[:10] == -1024) and np.all(s.hu[-10:] == -1024)  # 10 rows -> 20, centred


def test_patient_is_the_folder_for_generic_file_names():
    assert patient_of("s0001/ct.nii.gz") == "s0001"
    assert patient_of("lung_004.nii.gz") == "lung_004"
    assert patient_of("site/lung_004.nii") == "site/lung_004"


def test_nan_volume_is_rejected_by_name_while_good_volumes_are_written(tmp_path):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    good, affine = _las_volume((12, 12, 3))
    nib.save(nib.Nifti1Image(good, affine), src_dir / "good.nii.gz")
    bad = good.astype(np.float32)
    bad[3, 4, 1] = np.nan
    bad[5, 5, 2] = np.inf
    nib.save(nib.Nifti1Image(bad, affine), src_dir / "broken.nii.gz")
    (src_dir / "truncated.nii.gz").write_bytes(gzip.compress(b"\x5c\x01" + b"\0" * 100)[:60])
    assert detect_source(str(src_dir)).name == "nifti"
    s = run_prep(PrepConfig(src=str(src_dir), dst=str(tmp_path / "out"), size=None, executor="local",
                            progress=False), TEST_DEID_KEY.encode())
    assert s.slices_written == 3 and s.rejected == 2
    reasons = {r["input"]: r["reason"] for r in s.rejects}
    assert "2 of 432 voxels are NaN or infinite" in reasons["broken.nii.gz"]
    assert "unreadable NIfTI" in reasons["truncated.nii.gz"]
    t = shards.read_table(str(tmp_path / "out"))
    assert t.num_rows == 3 and set(t["source"].to_pylist()) == {"nifti"}


def test_four_d_volume_is_rejected_with_its_shape(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), tmp_path / "fmri.nii")
    src = get_source("nifti")
    tasks, _ = src.discover(str(tmp_path), _opts())
    series = src.load(tasks[0], _opts())
    assert series.slices == []
    assert series.rejects[0].input == "fmri.nii" and "(4, 4, 3, 2)" in series.rejects[0].reason


def test_labels_csv_labels_every_slice_of_a_volume_and_a_missing_file_is_rejected(tmp_path):
    data, affine = _las_volume((8, 8, 2))
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "p1.nii.gz")
    (tmp_path / "labels.csv").write_text("file,label\np1.nii.gz,covid\np2.nii.gz,normal\n")
    src = get_source("nifti")
    tasks, rejects = src.discover(str(tmp_path), _opts(labels=str(tmp_path / "labels.csv")))
    assert len(rejects) == 1 and "p2.nii.gz" in rejects[0].input and "no such file" in rejects[0].reason
    series = src.load(tasks[0], _opts())
    assert [s.label for s in series.slices] == ["covid", "covid"]


def test_header_scaling_is_applied_so_stored_values_become_hu(tmp_path):
    stored = np.full((6, 6, 2), 300, np.int16)
    stored[2, 2, 1] = 1000
    img = nib.Nifti1Image(stored, np.diag([1.0, 1.0, 3.0, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    src = get_source("nifti")
    tasks, _ = src.discover(str(tmp_path), _opts())
    series = src.load(tasks[0], _opts())
    assert int(np.median(series.slices[0].hu)) == 300 * 2 - 1024
    assert series.slices[1].hu.max() == 1000 * 2 - 1024 and series.slices[1].hu.dtype == np.int16
    assert [s.z_mm for s in series.slices] == [0.0, 3.0]


def test_every_nifti_kind_that_is_no_scalar_volume_is_one_reject_and_the_run_goes_on(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    data, affine = _las_volume((8, 8, 3))
    nib.save(nib.Nifti1Image(data, affine), src / "a_good.nii.gz")  # sorts first: its chunk commits first
    rgb = np.zeros((8, 8, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, affine), src / "rgb.nii.gz")
    rgba = np.zeros((8, 8, 3), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])
    nib.save(nib.Nifti1Image(rgba, affine), src / "rgba.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.complex64), affine), src / "complex.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 2), np.int16), affine), src / "two_volumes.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 1, 4), np.int16), affine), src / "five_d.nii.gz")
    summary = run_prep(PrepConfig(src=str(src), dst=str(dst), size=None, executor="local", progress=False,
                                  rows_per_shard=1), TEST_DEID_KEY.encode())
    assert summary.committed
    reasons = {r["input"]: r["reason"] for r in summary.rejects}
    assert set(reasons) == {"rgb.nii.gz", "rgba.nii.gz", "complex.nii.gz", "two_volumes.nii.gz", "five_d.nii.gz"}
    assert reasons["rgb.nii.gz"].startswith("RGB colour voxels")
    assert reasons["rgba.nii.gz"].startswith("RGBA colour voxels")
    assert reasons["complex.nii.gz"].startswith("complex voxels")
    assert "(8, 8, 3, 2)" in reasons["two_volumes.nii.gz"] and "2 volumes" in reasons["two_volumes.nii.gz"]
    assert "4 volumes" in reasons["five_d.nii.gz"]
    assert all("expected one" in r for r in reasons.values())
    assert shards.read_table(str(dst)).num_rows == 3


@pytest.mark.parametrize("trailing", [(1,), (1, 1)])  # a time axis of one volume (4-D or 5-D)
@pytest.mark.parametrize("size", [None, 4, 6])  # native, an integer factor (8 -> 4), a non-integer one (8 -> 6)
def test_big_endian_volume_with_trailing_axes_of_one_is_read_as_3d(tmp_path, size, trailing):
    data, affine = _las_volume((8, 8, 3))
    (tmp_path / "be").mkdir()
    (tmp_path / "le").mkdir()
    stored = data.reshape(data.shape + trailing).astype(">i2")
    nib.save(nib.Nifti1Image(stored, affine, nib.Nifti1Header(endianness=">")), tmp_path / "be" / "vol.nii")
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "le" / "vol.nii")
    assert nib.load(tmp_path / "be" / "vol.nii").dataobj.get_unscaled().dtype.byteorder == ">"
    src = get_source("nifti")
    got = []
    for folder in ("be", "le"):
        tasks, _ = src.discover(str(tmp_path / folder), _opts())
        got.append(src.load(tasks[0], _opts(size=size)))
    be, le = got
    assert be.rejects == [] and len(be.slices) == len(le.slices) == 3
    for a, b in zip(be.slices, le.slices, strict=True):
        assert a.hu.dtype == np.int16 and a.hu.dtype.isnative
        assert a.hu.shape == ((8, 8) if size is None else (size, size))
        np.testing.assert_array_equal(a.hu, b.hu)
        assert a.spacing_mm == b.spacing_mm

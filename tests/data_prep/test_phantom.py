"""The synthetic CT phantom: determinism, HU per tissue, labels that follow anatomy, valid DICOM."""

from __future__ import annotations

import csv
import json

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from scipy.ndimage import binary_erosion

from data_prep.phantom import REGION_CLASSES, render_slices, render_volume
from data_prep.phantom.cohort import write_cohort
from data_prep.phantom.dicom_writer import PADDING_STORED, fake_phi, outside_fov
from data_prep.phantom.synth import TISSUE_HU, Tissue, patient_seed
from ray_jobs.cli import main as ctssl
from tests.data_prep.phantom_fixtures import make_phantom_cohort


def test_same_seed_renders_the_same_volume_and_another_seed_does_not():
    a = render_volume(11, 10, size=64)
    b = render_volume(11, 10, size=64)
    c = render_volume(12, 10, size=64)
    assert a.hu.dtype == np.int16 and a.hu.shape == (10, 64, 64)
    assert np.array_equal(a.hu, b.hu)
    assert list(a.region) == list(b.region) and np.array_equal(a.lesion, b.lesion)
    assert np.abs(a.hu.astype(int) - c.hu.astype(int)).mean() > 20


@pytest.fixture(scope="module")
def volume():
    return render_volume(7, 40, size=128, with_tissue=True)


def _interior_median(vol, tissue: Tissue) -> float:
    vals = [vol.hu[i][binary_erosion(vol.tissue[i] == tissue)] for i in range(vol.n_slices)]
    return float(np.median(np.concatenate(vals)))


@pytest.mark.parametrize("tissue", [Tissue.FAT, Tissue.MUSCLE, Tissue.LUNG, Tissue.BLOOD, Tissue.LIVER,
                                    Tissue.KIDNEY, Tissue.MARROW, Tissue.BLADDER, Tissue.SOFT],
                         ids=lambda t: t.name)
def test_tissue_interiors_have_the_hu_of_their_tissue_range(volume, tissue):
    lo, hi = TISSUE_HU[tissue]
    med = _interior_median(volume, tissue)
    assert lo - 8 <= med <= hi + 8, f"{tissue.name}: median {med} HU, range {lo}..{hi}"
    assert abs(med - volume.anatomy.hu[tissue]) <= 8


def test_known_hu_landmarks_air_lung_fat_bone(volume):
    assert _interior_median(volume, Tissue.AIR) == pytest.approx(-1000, abs=5)
    assert -880 - 8 <= _interior_median(volume, Tissue.LUNG) <= -820 + 8
    bone = volume.hu[(volume.tissue == Tissue.CORTICAL) | (volume.tissue == Tissue.MARROW)]
    assert 300 <= np.median(bone) <= 1200 and bone.max() >= 600
    # noise: 10-20 HU standard deviation inside air, away from the body
    air = volume.hu[0, :6, :6].astype(float)
    assert 5 <= air.std() <= 25


def test_noise_is_present_so_no_two_slices_share_pixels(volume):
    flat = volume.hu[:, :8, :8].reshape(volume.n_slices, -1)
    assert len({row.tobytes() for row in flat}) == volume.n_slices


def test_regions_run_head_to_feet_in_class_order_and_match_the_organs(volume):
    idx = [REGION_CLASSES.index(r) for r in volume.region]
    assert idx == sorted(idx) and set(idx) == set(range(len(REGION_CLASSES)))
    assert np.all(np.diff(volume.z_mm) < 0), "slice 0 is the most superior (DICOM +z = head)"
    frac = {t: (volume.tissue == t).mean(axis=(1, 2)) for t in (Tissue.LUNG, Tissue.LIVER, Tissue.KIDNEY)}
    region = volume.region
    assert frac[Tissue.LUNG][region == "lung"].min() > 0.01
    assert frac[Tissue.LUNG][region == "pelvis"].max() == 0
    assert frac[Tissue.LIVER][region == "liver"].min() > 0.02
    assert frac[Tissue.KIDNEY][region == "kidney"].mean() > 0.003
    assert frac[Tissue.KIDNEY][np.isin(region, ["lung", "heart", "pelvis"])].max() == 0


def test_lesion_flags_mark_slices_that_show_a_lesion_and_rate_zero_has_none(volume):
    lesion_px = (volume.tissue == Tissue.LESION).sum(axis=(1, 2))
    assert volume.lesion.any()
    assert np.all(lesion_px[volume.lesion] >= 1)
    # lesions are small: a few to a few hundred pixels at 128 px, never a large part of the slice
    assert lesion_px.max() < 0.03 * 128 * 128
    none = render_volume(7, 40, size=64, lesion_rate=0.0, with_tissue=True)
    assert not none.lesion.any() and not (none.tissue == Tissue.LESION).any()


def test_lesion_rate_sets_the_approximate_fraction_of_lesion_slices():
    fr = [render_volume(patient_seed(3, p), 30, size=32, lesion_rate=0.3).lesion.mean() for p in range(6)]
    assert 0.15 <= np.mean(fr) <= 0.5, fr


def test_render_slices_gives_labelled_slices_from_several_patients():
    s = render_slices(40, size=48, seed=1, slices_per_patient=10)
    assert s.hu.shape == (40, 48, 48) and s.hu.dtype == np.int16
    assert set(s.region) <= set(REGION_CLASSES) and len(set(s.region)) >= 4
    assert list(np.unique(s.patient)) == [0, 1, 2, 3]
    assert 0 < s.lesion.sum() < 40
    again = render_slices(40, size=48, seed=1, slices_per_patient=10)
    assert np.array_equal(s.hu, again.hu)


# --------------------------------------------------------------------------------------- DICOM cohort
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_phantom_cohort(tmp_path_factory.mktemp("cohort"), patients=2, slices=6, size=48, seed=5)


def _files(root):
    return sorted(p for p in root.rglob("*.dcm"))


def test_cohort_layout_labels_and_json(cohort):
    files = _files(cohort)
    assert len(files) == 12
    assert {p.relative_to(cohort).parts[1:3] for p in files} == {("study1", "series1")}
    for name in ("labels_region.csv", "labels_lesion.csv"):
        rows = list(csv.DictReader((cohort / name).open()))
        assert sorted(r["file"] for r in rows) == sorted(str(p.relative_to(cohort)) for p in files)
    region = {r["file"]: r["label"] for r in csv.DictReader((cohort / "labels_region.csv").open())}
    lesion = {r["file"]: r["label"] for r in csv.DictReader((cohort / "labels_lesion.csv").open())}
    assert set(region.values()) <= set(REGION_CLASSES) and set(lesion.values()) <= {"0", "1"}
    info = json.loads((cohort / "phantom.json").read_text())
    assert info["patients"] == 2 and info["slices"] == 6 and info["totals"]["slices"] == 12
    assert [s["slices"] for s in info["series"]] == [6, 6]
    assert sum(s["lesion_slices"] for s in info["series"]) == sum(v == "1" for v in lesion.values())


def test_cohort_dicom_reads_back_to_the_rendered_hu_with_consistent_geometry(cohort):
    by_patient: dict[str, list] = {}
    for f in _files(cohort):
        ds = pydicom.dcmread(f)
        by_patient.setdefault(str(ds.PatientID), []).append((f, ds))
    assert len(by_patient) == 2
    for index in range(2):
        pid = fake_phi(5, index).patient_id
        vol = render_volume(patient_seed(5, index), 6, size=48)
        items = by_patient[pid]
        storages = set()
        for _f, ds in items:
            assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
            assert [float(x) for x in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(x) for x in ds.PixelSpacing] == pytest.approx(vol.spacing_mm, rel=1e-5)
            assert float(ds.SliceThickness) == pytest.approx(vol.slice_thickness_mm, rel=1e-3)
            i = int(ds.InstanceNumber) - 1
            assert float(ds.ImagePositionPatient[2]) == pytest.approx(vol.z_mm[i], abs=1e-3)
            hu = apply_modality_lut(ds.pixel_array, ds)
            storages.add(int(ds.PixelRepresentation))
            if ds.PixelRepresentation == 1:
                out = outside_fov(48, 48)
                assert np.all(ds.pixel_array[out] == PADDING_STORED) and ds.PixelPaddingValue == PADDING_STORED
                assert np.array_equal(hu[~out], vol.hu[i][~out])
            else:
                assert np.array_equal(hu, vol.hu[i])
        assert len(storages) == 1
        z_by_name = [float(ds.ImagePositionPatient[2]) for _, ds in sorted(items, key=lambda t: t[0].name)]
        assert z_by_name != sorted(z_by_name) and z_by_name != sorted(z_by_name, reverse=True), \
            "file names must not give the slice order"
        assert sorted(int(ds.InstanceNumber) for _, ds in items) == list(range(1, 7))
    reps = {int(pydicom.dcmread(_files(cohort)[0]).PixelRepresentation),
            int(pydicom.dcmread(_files(cohort)[-1]).PixelRepresentation)}
    assert reps == {0, 1}, "both unsigned and signed storage occur"


def test_cohort_headers_carry_fake_phi_and_phantom_json_does_not(cohort):
    info_text = (cohort / "phantom.json").read_text()
    uids = set()
    for f in _files(cohort):
        ds = pydicom.dcmread(f)
        phi = next(fake_phi(5, i) for i in range(2) if fake_phi(5, i).patient_id == ds.PatientID)
        assert str(ds.PatientName) == phi.patient_name and "^" in phi.patient_name
        assert ds.PatientBirthDate == phi.birth_date and len(phi.birth_date) == 8
        assert ds.InstitutionName == phi.institution and ds.AccessionNumber == phi.accession
        assert ds.OtherPatientIDs == phi.other_patient_id and ds.ReferringPhysicianName == phi.referring_physician
        assert ds.StudyInstanceUID == phi.study_uid and ds.SeriesInstanceUID == phi.series_uid
        uids.add(ds.SOPInstanceUID)
        for value in phi.searchable().values():
            assert value not in info_text
    assert len(uids) == 12
    assert fake_phi(5, 0).patient_id != fake_phi(5, 1).patient_id


@pytest.mark.parametrize("compress", ["rle", "jpeg2000"])
def test_compressed_cohort_decodes_to_the_same_hu_as_uncompressed(tmp_path, compress):
    plain = write_cohort(tmp_path / "plain", patients=2, slices=2, size=32, seed=9)
    packed = write_cohort(tmp_path / compress, patients=2, slices=2, size=32, seed=9, compress=compress)
    assert packed["totals"] == plain["totals"]
    for f in _files(tmp_path / "plain"):
        g = tmp_path / compress / f.relative_to(tmp_path / "plain")
        a, b = pydicom.dcmread(f), pydicom.dcmread(g)
        assert b.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(apply_modality_lut(a.pixel_array, a), apply_modality_lut(b.pixel_array, b))


def test_ctssl_phantom_writes_a_cohort_and_refuses_to_overwrite_it(tmp_path, capsys):
    dst = tmp_path / "ph"
    assert ctssl(["phantom", str(dst), "--patients", "2", "--slices", "3", "--size", "32", "--workers", "2",
                  "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "6 slices in 2 series" in out and str(dst) in out
    assert len(_files(dst)) == 6
    assert ctssl(["phantom", str(dst), "--patients", "1", "--slices", "1", "--no-progress"]) == 2
    assert "already holds a phantom cohort" in capsys.readouterr().err
    assert ctssl(["phantom", str(tmp_path / "x"), "--lesion-rate", "1.5", "--no-progress"]) == 2
    assert "--lesion-rate" in capsys.readouterr().err


def test_prep_of_a_phantom_cohort_keeps_every_slice_its_label_and_its_hu(cohort, tmp_path):
    from data_prep import shards
    from data_prep.prep import PrepConfig, run_prep
    from tests.conftest import TEST_DEID_KEY

    s = run_prep(PrepConfig(src=str(cohort), dst=str(tmp_path / "out"), size=None, executor="local",
                            progress=False, labels_csv=str(cohort / "labels_region.csv")), TEST_DEID_KEY.encode())
    assert s.committed and s.slices_written == 12 and s.rejected == 0
    t = shards.read_table(str(tmp_path / "out"))
    images = shards.decode_images(t)
    for index in range(2):
        vol = render_volume(patient_seed(5, index), 6, size=48)
        # the slice whose pixels match this volume's top slice inside the FOV is slice_index 5 (most superior)
        inside = ~outside_fov(48, 48)
        hits = [i for i in range(12) if np.array_equal(images[i][inside], vol.hu[0][inside])]
        assert len(hits) == 1
        row = hits[0]
        assert t["slice_index"][row].as_py() == 5 and t["label"][row].as_py() == vol.region[0]
        assert images[row].min() >= -1024, "padding outside the FOV becomes air"


@pytest.mark.parametrize("storage", ["unsigned", "signed"])
def test_pre_encoded_writer_writes_the_same_bytes_as_pydicom_save_as(tmp_path, storage):
    from data_prep.phantom.dicom_writer import SeriesGeometry, SeriesWriter, stored_pixels

    writer = SeriesWriter(fake_phi(0, 1), SeriesGeometry(32, 32, (0.7, 0.7), 2.5, (-10.0, -10.0)), storage, None,
                          seed=0, index=1)
    hu = np.random.default_rng(0).integers(-1024, 2000, (32, 32)).astype(np.int16)
    writer.write(tmp_path / "a.dcm", hu, slice_no=1, instance=2, z_mm=-40.0)  # primes the template
    writer.write(tmp_path / "fast.dcm", hu, slice_no=3, instance=4, z_mm=-12.5)
    ds = writer._dataset(3, 4, -12.5)
    ds.PixelData = stored_pixels(hu, storage).tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(tmp_path / "ref.dcm", enforce_file_format=True)
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "ref.dcm").read_bytes()
    assert pydicom.dcmread(tmp_path / "fast.dcm").InstanceNumber == 4

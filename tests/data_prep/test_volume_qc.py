"""Per-series volume checks: the flags of data_prep.volume_qc, and --volume-check warn|skip|strict of
`ctssl prep` on synthetic DICOM series (one regular volume, one "series" of slices at one position, one
with a missing slice, one with gantry tilt)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from data_prep import shards
from data_prep.records import SliceData
from data_prep.volume_qc import TILT_TOLERANCE_DEG, check_volume
from ray_jobs.cli import main
from tests.conftest import TEST_DEID_KEY
from tests.data_prep.dicom_factory import FAKE_PHI, write_ct


def _slices(z: list[float], *, tilt_deg: float = 0.0, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            sizes: list[tuple[int, int]] | None = None, positions: bool = True) -> list[SliceData]:
    """Axial slices at ``z`` (mm), shifted along y by z * tan(tilt) as a tilted gantry stacks them."""
    shift = math.tan(math.radians(tilt_deg))
    return [SliceData(hu=np.zeros((4, 4), np.int16), slice_index=i, z_mm=float(zi), spacing_mm=(0.8, 0.8),
                      input=f"{FAKE_PHI['PatientName']}/IM{i:04d}",
                      position_mm=(-100.0, -100.0 + zi * shift, float(zi)) if positions else None,
                      orientation=orientation if positions else None,
                      native_size=sizes[i] if sizes else (512, 512))
            for i, zi in enumerate(z)]


def _flags(slices: list[SliceData]) -> dict[str, str]:
    flags = check_volume(slices)
    for f in flags:  # reasons give millimetres and indices, never the file a slice came from
        assert FAKE_PHI["PatientName"] not in f.reason and "IM0" not in f.reason
    return {f.flag: f.reason for f in flags}


# ------------------------------------------------------------------------------------------ unit tests
def test_regular_reversed_and_rounded_volumes_are_not_flagged():
    assert _flags(_slices([2.5 * i for i in range(40)])) == {}
    assert _flags(_slices([2.5 * i for i in reversed(range(40))])) == {}  # stored head to feet
    rng = np.random.default_rng(0)  # positions written with a few decimals: +-0.05 mm of jitter
    assert _flags(_slices([0.625 * i + rng.uniform(-0.05, 0.05) for i in range(60)])) == {}
    # a volume oblique as a whole (tilted orientation) stacked along its own normal
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    oblique = _slices([0.0] * 10, orientation=(1.0, 0.0, 0.0, 0.0, c, -s))
    for i, sl in enumerate(oblique):  # normal = row x col = (0, s, c)
        sl.position_mm = (-100.0, 3.0 * i * s, 3.0 * i * c)
        sl.z_mm = 3.0 * i
    assert _flags(oblique) == {}


def test_2d_images_a_single_slice_and_volumes_without_positions_are_not_flagged():
    images = _slices([0.0] * 5, positions=False)
    for s in images:  # image folders and MedMNIST: no position at all
        s.z_mm = float("nan")
    assert _flags(images) == {}
    assert _flags(_slices([7.0])) == {}
    assert _flags(_slices([1.5 * i for i in range(20)], positions=False)) == {}  # NIfTI: z from one affine


def test_slices_at_one_position_are_not_a_volume():
    assert _flags(_slices([12.0] * 6)) == {"not_a_volume": "all 6 slices at one position (z 12.00 mm)"}
    repeated = _flags(_slices([0.0, 2.0, 2.0, 4.0, 6.0, 6.0]))
    assert repeated == {"not_a_volume": "6 slices at only 4 positions: 2 positions hold more than one slice "
                                        "(the first at z 2.00 mm: slices 1, 2)"}


def test_a_missing_slice_is_named_by_its_place_in_mm_and_slice_indices():
    got = _flags(_slices([0.0, 5.0, 10.0, 20.0]))  # steps 5, 5, 10 mm
    assert got == {"missing_slices": "1 step wider than the typical 5.00 mm (tolerance 0.20 mm), about 1 slice "
                                     "missing: 10.00 mm between slices 2 and 3 (z 10.00 to 20.00 mm)"}
    z = [1.0 * i for i in range(30) if i not in (7, 8, 20)]  # two slices lost at 7-8 mm, one at 20 mm
    reason = _flags(_slices(z))["missing_slices"]
    assert reason.startswith("2 steps wider than the typical 1.00 mm (tolerance 0.20 mm), about 3 slices missing")
    assert "3.00 mm between slices 6 and 7 (z 6.00 to 9.00 mm)" in reason
    assert "2.00 mm between slices 17 and 18 (z 19.00 to 21.00 mm)" in reason
    # sub-millimetre spacing: the tolerance is half the step, so one lost 0.3 mm slice is seen
    thin = [0.3 * i for i in range(20) if i != 10]
    assert "about 1 slice missing" in _flags(_slices(thin))["missing_slices"]


def test_gantry_tilt_is_flagged_with_its_angle_beyond_the_tolerance():
    assert _flags(_slices([2.0 * i for i in range(20)], tilt_deg=15.0)) == {
        "gantry_tilt": "slices stack 15.0 degrees off the slice normal (tolerance 0.8 degrees)"}
    assert round(TILT_TOLERANCE_DEG, 2) == 0.81  # 1 - cos = 1e-4
    assert _flags(_slices([2.0 * i for i in range(20)], tilt_deg=0.5)) == {}


def test_mixed_orientation_and_mixed_native_size_are_flagged():
    sl = _slices([2.0 * i for i in range(10)])
    sl[3].orientation = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # a coronal image in an axial series
    assert _flags(sl) == {"mixed_orientation": "1 of 10 slices have another orientation than the rest (row or "
                                               "column direction up to 90.0 degrees apart; tolerance 0.1 degrees)"}
    sized = _slices([2.0 * i for i in range(4)], sizes=[(512, 512)] * 3 + [(256, 256)])
    assert _flags(sized) == {"mixed_size": "slices of 2 native sizes: 512x512 (3 slices), 256x256 (1 slice)"}


# ------------------------------------------------------------------------------------------ ctssl prep
SERIES = {  # folder -> z of its slices (mm), gantry tilt (degrees)
    "p1": ([2.0 * i for i in range(4)], 0.0),  # a regular volume
    "p2": ([5.0] * 4, 0.0),  # every slice at one position
    "p3": ([0.0, 5.0, 10.0, 20.0], 0.0),  # steps 5, 5, 10 mm: a missing slice
    "p4": ([2.0 * i for i in range(4)], 15.0),  # stacked 15 degrees off the normal
}
FLAGGED = {"p2": "not_a_volume", "p3": "missing_slices", "p4": "gantry_tilt"}


def write_qc_tree(root: Path) -> dict[str, str]:
    """The four series of SERIES as DICOM files under root/<folder>/; returns folder -> SeriesInstanceUID."""
    uids = {}
    for folder, (z, tilt) in SERIES.items():
        uid = generate_uid(entropy_srcs=["ctssl-volume-qc", folder])
        uids[folder] = uid
        study = generate_uid(entropy_srcs=["ctssl-volume-qc-study", folder])
        for i, zi in enumerate(z):
            hu = np.full((16, 16), -1000, np.int16)
            hu[4:12, 4:12] = 10 * i
            p = write_ct(root / folder / f"IM{i:04d}", hu, z=zi, series_uid=uid, study_uid=study, instance=i + 1)
            if tilt:
                ds = pydicom.dcmread(p)
                ds.ImagePositionPatient = [-100.0, -100.0 + zi * math.tan(math.radians(tilt)), zi]
                ds.save_as(p, enforce_file_format=True)
    return uids


@pytest.fixture
def qc_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)
    write_qc_tree(tmp_path / "src")
    return tmp_path / "src"


def _prep(src: Path, dst: Path, policy: str | None) -> list[str]:
    return ["prep", str(src), str(dst), "--executor", "local", "--no-progress", "--size", "0",
            *(["--volume-check", policy] if policy else [])]


def _no_phi(text: str) -> None:
    for v in FAKE_PHI.values():
        assert v not in text


def test_warn_writes_every_series_and_lists_the_flags_in_the_manifest_and_summary(qc_tree, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(_prep(qc_tree, dst, None)) == 0  # warn is the default
    out = capsys.readouterr().out
    m = shards.read_manifest(str(dst))
    assert m["counts"]["slices_written"] == 16 and m["counts"]["series"] == 4 and m["counts"]["rejected"] == 0
    qc = m["volume_qc"]
    assert qc["policy"] == "warn" and qc["flagged"] == 3
    assert qc["counts"] == {"not_a_volume": 1, "missing_slices": 1, "gantry_tilt": 1, "mixed_orientation": 0,
                            "mixed_size": 0}
    written = set(shards.read_table(str(dst))["series_id"].to_pylist())
    assert len(written) == 4
    by_flag = {e["flags"][0]["flag"]: e for e in qc["series"]}
    assert set(by_flag) == set(FLAGGED.values()) and all(len(e["flags"]) == 1 for e in qc["series"])
    assert {e["series_id"] for e in qc["series"]} < written  # pseudonyms, the ids of the shards' rows
    assert all(e["written"] and e["slices"] == 4 for e in qc["series"])
    assert by_flag["not_a_volume"]["flags"][0]["reason"] == "all 4 slices at one position (z 5.00 mm)"
    assert "10.00 mm between slices 2 and 3" in by_flag["missing_slices"]["flags"][0]["reason"]
    assert "15.0 degrees off the slice normal" in by_flag["gantry_tilt"]["flags"][0]["reason"]
    lines = out.splitlines()
    head = [ln for ln in lines if "flagged by the volume checks" in ln]
    assert head == ["3 series flagged by the volume checks (--volume-check warn: written): 1 not a volume, "
                    "1 missing slices, 1 gantry tilt"]
    for label, flag in (("not a volume", "not_a_volume"), ("missing slices", "missing_slices"),
                        ("gantry tilt", "gantry_tilt")):
        e = by_flag[flag]
        assert f"  {label}: 1 series, e.g. {e['series_id']}: {e['flags'][0]['reason']}" in lines
    _no_phi(out + json.dumps(m) + "".join(p.read_text() for p in (dst / "_commits").glob("*.json")))


def test_skip_leaves_flagged_series_out_and_lists_each_of_their_files_as_a_reject(qc_tree, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(_prep(qc_tree, dst, "skip")) == 0
    out = capsys.readouterr().out
    m = shards.read_manifest(str(dst))
    t = shards.read_table(str(dst))
    assert t.num_rows == 4 and len(set(t["series_id"].to_pylist())) == 1  # the regular volume only
    assert m["counts"]["rejected"] == 12 and m["counts"]["inputs"] == 16  # nothing lost: 4 written + 12 listed
    rejected = {r["input"] for r in m["rejects"]}
    assert rejected == {f"{f}/IM{i:04d}" for f in FLAGGED for i in range(4)}
    for r in m["rejects"]:
        flag = FLAGGED[r["input"].split("/")[0]]
        assert r["reason"].startswith("series not written (--volume-check skip): "
                                      + {"not_a_volume": "not a volume: ", "missing_slices": "missing slices: ",
                                         "gantry_tilt": "gantry tilt: "}[flag])
    qc = m["volume_qc"]
    assert qc["policy"] == "skip" and qc["flagged"] == 3 and not any(e["written"] for e in qc["series"])
    assert not {e["series_id"] for e in qc["series"]} & set(t["series_id"].to_pylist())
    assert "3 series flagged by the volume checks (--volume-check skip: not written, listed as rejects)" in out
    _no_phi(out + json.dumps(m))


def test_strict_stops_with_one_line_naming_the_series_pseudonym_and_its_flag(qc_tree, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(_prep(qc_tree, ref, "warn")) == 0
    ids = {e["flags"][0]["flag"]: e["series_id"] for e in shards.read_manifest(str(ref))["volume_qc"]["series"]}
    capsys.readouterr()
    dst = tmp_path / "out"
    assert main(_prep(qc_tree, dst, "strict")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in err[0]
    # folders are read in name order: p2 (slices at one position) is the first flagged series
    assert err[0] == (f"ctssl prep: error: series {ids['not_a_volume']}: not a volume: all 4 slices at one "
                      "position (z 5.00 mm); --volume-check strict stops at a flagged series (warn writes it "
                      "and lists the flag, skip leaves it out)")
    assert re.fullmatch(r"SE-[0-9a-f]{20}", ids["not_a_volume"])
    assert not (dst / "_manifest.json").exists()
    _no_phi(err[0])
    # a tree of regular volumes only passes strict, and its output is the one warn makes
    clean = tmp_path / "clean"
    write_ct(clean / "p1" / "IM0", np.zeros((16, 16), np.int16), z=0.0, series_uid="1.2.3.4", study_uid="1.2.3")
    write_ct(clean / "p1" / "IM1", np.zeros((16, 16), np.int16), z=2.0, series_uid="1.2.3.4", study_uid="1.2.3")
    assert main(_prep(clean, tmp_path / "clean-out", "strict")) == 0
    assert shards.read_manifest(str(tmp_path / "clean-out"))["volume_qc"]["flagged"] == 0


def test_a_rerun_never_mixes_policies(qc_tree, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(_prep(qc_tree, dst, "warn")) == 0
    flagged = {e["series_id"] for e in shards.read_manifest(str(dst))["volume_qc"]["series"]}
    capsys.readouterr()
    # strict continues a warn output (the same shards) but holds for the series warn committed
    assert main(_prep(qc_tree, dst, "strict")) == 2
    line = capsys.readouterr().err.strip()
    assert re.match(r"ctssl prep: error: series (SE-[0-9a-f]{20}): ", line)[1] in flagged
    assert line.endswith("--volume-check strict stops at a flagged series (warn writes it and lists the flag, "
                         "skip leaves it out)")
    # skip writes other shards: it refuses a warn output, and warn refuses a skip output
    assert main(_prep(qc_tree, dst, "skip")) == 2
    assert "already holds a prep output made with other settings" in capsys.readouterr().err
    skipped = tmp_path / "skipped"
    assert main(_prep(qc_tree, skipped, "skip")) == 0
    assert main(_prep(qc_tree, skipped, "warn")) == 2
    assert "already holds a prep output made with other settings" in capsys.readouterr().err
    assert main(_prep(qc_tree, skipped, "skip")) == 0  # and skip resumes its own
    assert shards.read_manifest(str(skipped))["counts"]["slices_written"] == 4


# ------------------------------------------------------------------------------------------ study and report
STUDY = """\
apiVersion: ctssl/v1
kind: Study
metadata:
  name: qc
spec:
  storage: {storage}
  data:
    pretrain: {{type: dicom, path: {src}}}
    labelled: {{type: phantom, patients: 4, slices: 4, task: lesion}}
"""


def _study(tmp_path: Path, src: Path, policy: str | None):
    from ray_jobs.study import spec

    text = STUDY.format(storage=tmp_path / "store", src=src)
    return spec.loads(text + (f"  prep: {{volumeCheck: {policy}}}\n" if policy else ""), "qc.yaml")


def test_the_study_file_sets_the_volume_check_of_its_prep_stages(qc_tree, tmp_path, monkeypatch, capsys):
    from data_prep import prep as prep_module
    from ray_jobs.study import spec
    from ray_jobs.study.stages import Context, plan

    with pytest.raises(spec.SpecError) as e:
        _study(tmp_path, qc_tree, "lenient")
    assert e.value.problems == ["qc.yaml:10:10: spec.prep.volumeCheck: 'lenient' is not one of 'warn', 'skip', "
                                "'strict'"]
    assert _study(tmp_path, qc_tree, None).spec["prep"] == {"volumeCheck": "warn"}
    # only skip changes the shards, so only skip is a setting of the prep stages (a change redoes them)
    for policy, setting in (("warn", None), ("strict", None), ("skip", "skip")):
        stages = {s.name: s for s in plan(_study(tmp_path, qc_tree, policy))}
        for role in ("pretrain", "labelled"):
            assert stages[f"prep-{role}"].settings.get("volumeCheck") == setting, (policy, role)

    seen = {}

    def fake_run_prep(cfg, key):
        seen["cfg"] = cfg
        return prep_module.PrepSummary(series=4, volume_qc={"policy": cfg.volume_check, "flagged": 1, "series": [
            {"series_id": "SE-1", "flags": [{"flag": "gantry_tilt", "reason": "slices stack 15.0 degrees"}]}]})

    monkeypatch.setattr(prep_module, "run_prep", fake_run_prep)
    study = _study(tmp_path, qc_tree, "skip")
    stage = next(s for s in plan(study) if s.name == "prep-pretrain")
    result = stage.run(Context(study=study, address=None, tracking_uri=""))
    assert seen["cfg"].volume_check == "skip" and result["volume_flagged"] == 1
    assert "    1 series flagged by the volume checks (--volume-check skip: not written, listed as rejects): " \
           "1 gantry tilt" in capsys.readouterr().out


def test_a_finished_prep_is_redone_under_strict_when_it_holds_flagged_series(qc_tree, tmp_path):
    from ray_jobs.study.stages import Context, plan

    dst = tmp_path / "out"
    assert main(_prep(qc_tree, dst, "warn")) == 0
    for policy, done in (("warn", True), ("skip", True), ("strict", False)):
        study = _study(tmp_path, qc_tree, policy)
        stage = next(s for s in plan(study) if s.name == "prep-pretrain")
        assert stage.done(Context(study=study, address=None, tracking_uri=""), {"url": str(dst)}) is done, policy


def test_the_report_lists_the_volume_checks_of_the_prep_outputs_it_used(qc_tree, tmp_path, capsys):
    from ray_jobs.report.build import ReportConfig, build_report
    from tests.ray_jobs.test_report_unfinished import EXPERIMENT
    from tests.ray_jobs.test_report_unfinished import _study as mlflow_study

    warned, skipped = tmp_path / "warned", tmp_path / "skipped"
    assert main(_prep(qc_tree, warned, "warn")) == 0
    assert main(_prep(qc_tree, skipped, "skip")) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_study(uri)
    paths = build_report(ReportConfig(experiment=EXPERIMENT, out=str(tmp_path / "report"), tracking_uri=uri,
                                      prep_manifests={"pretrain": str(warned), "labelled": str(skipped)}))
    md = Path(paths.markdown).read_text()
    section = md.split("## Volume checks of the input series\n\n")[1]
    assert section.strip().splitlines() == [
        f"- pretrain (`{warned}`): **3 of 4 series flagged** (1 not a volume, 1 missing slices, 1 gantry tilt; "
        "--volume-check warn: written)",
        f"- labelled (`{skipped}`): **3 of 4 series flagged** (1 not a volume, 1 missing slices, 1 gantry tilt; "
        "--volume-check skip: left out, listed as rejects)"]
    html = Path(paths.html).read_text()
    assert "<h2>Volume checks of the input series</h2>" in html and "<strong>3 of 4 series flagged</strong>" in html

"""`ctssl prep` on one folder that mixes what a real archive export holds: a series split over two
top-level folders (named after the patient), copies of some of its files, JPEG Lossless and JPEG-LS
series, an Enhanced CT file, a series at one position, one with a missing slice, one with gantry tilt,
a 12-bit JPEG extended file, a file that is not DICOM and a truncated one.

It commits every decodable slice with a unique id, each series in z order; every input is either
written or listed with its reason; the volume checks are in the manifest; one summary line per kind
of trouble; and no patient value reaches the output.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_prep import shards
from ray_jobs.cli import main
from tests.conftest import REPO, TEST_DEID_KEY
from tests.data_prep.dicom_factory import FAKE_PHI, write_series
from tests.data_prep.test_dicom_series_identity import _enhanced_from
from tests.data_prep.test_volume_qc import write_qc_tree

CODECS = REPO / "tests" / "data" / "dicom_codecs"
PATIENT_FOLDER = f"{FAKE_PHI['PatientName']}_{FAKE_PHI['PatientID']}"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, real_ct_dir: Path) -> tuple[Path, dict[str, int]]:
    """The mixed folder and the number of files of each part."""
    root = tmp_path_factory.mktemp("mixed") / "export"
    staging = root.parent / "staging"
    split = sorted(write_series(staging / "split", 8, size=16))
    for i, p in enumerate(split):  # interleaved over two top-level folders, both named after the patient
        dest = root / (f"{PATIENT_FOLDER}_a" if i % 2 else f"{PATIENT_FOLDER}_b") / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
    for p in split[:3]:  # a partial second copy of the series elsewhere
        dest = root / "copies" / PATIENT_FOLDER / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
    for folder in ("jpeg_lossless_sv1", "jpeg_lossless", "jpeg_ls_lossless"):
        shutil.copytree(CODECS / folder, root / "compressed" / folder)
    shutil.copy2(CODECS / "jpeg_extended_12bit" / "CT00.dcm", root / "compressed" / "lossy12.dcm")
    _enhanced_from(sorted(real_ct_dir.glob("*"))[:3], root / "enhanced" / "multiframe.dcm")
    write_qc_tree(root / "qc")
    (root / "notes.dcm").write_text("exported by the PACS on request\n")
    (root / "truncated.dcm").write_bytes(split[0].read_bytes()[:400])
    parts = {"split": 8, "copies": 3, "codecs": 9, "lossy12": 1, "enhanced": 1, "qc": 16, "junk": 2}
    return root, parts


@pytest.fixture(scope="module")
def prepped(archive, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    root, _ = archive
    out = tmp_path_factory.mktemp("mixed-out") / "shards"
    mp = pytest.MonkeyPatch()
    mp.setenv("CTSSL_DEID_KEY", TEST_DEID_KEY)  # capsys is per test: the one prep's output is redirected
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(["prep", str(root), str(out), "--executor", "local", "--no-progress", "--size", "0"])
    finally:
        mp.undo()
    assert rc == 0, stderr.getvalue()[-3000:]
    return out, stdout.getvalue().splitlines(), stderr.getvalue()


def test_every_decodable_slice_is_committed_once_with_a_unique_id_in_z_order(prepped, archive):
    out, _, _ = prepped
    _, parts = archive
    t = shards.read_table(str(out))
    ids = t["slice_id"].to_pylist()
    assert len(ids) == len(set(ids))
    # the split series once (8), the three codec series (9), the 3 Enhanced frames, the 4 QC series (16)
    assert len(ids) == parts["split"] + parts["codecs"] + 3 + parts["qc"]
    by_series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for sid, idx, z in zip(t["series_id"].to_pylist(), t["slice_index"].to_pylist(), t["z_mm"].to_pylist(),
                           strict=True):
        by_series[sid].append((idx, z))
    assert len(by_series) == 1 + 3 + 1 + 4
    for sid, entries in by_series.items():
        entries.sort()
        assert [i for i, _ in entries] == list(range(len(entries))), sid
        zs = [z for _, z in entries]
        if len(set(zs)) > 1:  # the series at one position has no order to keep
            assert zs == sorted(zs) or zs == sorted(zs, reverse=True), (sid, zs)
    # the split series kept its content in z order: slice i holds HU 10*i inside
    split = [s for s, e in by_series.items() if len(e) == 8]
    assert len(split) == 1
    rows = [i for i, s in enumerate(t["series_id"].to_pylist()) if s == split[0]]
    order = sorted(rows, key=lambda i: t["slice_index"][i].as_py())
    images = shards.decode_images(t.take(order))  # the archive's slices differ in size: one series at a time
    assert [int(img[8, 8]) for img in images] == [10 * i for i in range(8)]


def test_every_input_is_written_or_listed_with_its_reason(prepped, archive):
    out, _, _ = prepped
    _, parts = archive
    m = shards.read_manifest(str(out))
    c = m["counts"]
    rejects = {r["input"]: r["reason"] for r in m["rejects"]}
    assert c["inputs"] == sum(parts.values())
    assert c["rejected"] == len(m["rejects"]) == parts["copies"] + parts["lossy12"] + parts["junk"]
    # written slices count the Enhanced file's frames; every other input is one file = one slice
    assert c["slices_written"] + c["rejected"] == c["inputs"] - parts["enhanced"] + 3
    duplicates = [r for r in rejects.values() if r.startswith("duplicate of ")]
    assert len(duplicates) == parts["copies"]
    assert "1.2.840.10008.1.2.4.51" in rejects["compressed/lossy12.dcm"]
    assert "pylibjpeg-libjpeg" in rejects["compressed/lossy12.dcm"]
    assert rejects["notes.dcm"].startswith("not a DICOM file")
    assert "truncated.dcm" in rejects


def test_the_volume_checks_and_one_summary_line_per_kind(prepped):
    out, lines, _ = prepped
    qc = shards.read_manifest(str(out))["volume_qc"]
    assert qc["counts"]["not_a_volume"] == 1 and qc["counts"]["missing_slices"] == 1
    assert qc["counts"]["gantry_tilt"] == 1 and qc["flagged"] == 3
    kinds = [ln for ln in lines if ln.startswith("rejects by kind: ")]
    assert len(kinds) == 1, lines
    assert "3 duplicate" in kinds[0] and "1 pixel data not decoded" in kinds[0]
    assert "1 not a DICOM file" in kinds[0] and "other" not in kinds[0], kinds[0]
    assert sum(1 for ln in lines if "flagged by the volume checks" in ln) == 1
    assert lines[0].startswith("prep committed: 36 slices from 9 series")


def test_no_patient_value_in_any_output(prepped):
    out, lines, err = prepped
    texts = ["\n".join(lines), err]
    texts += [p.read_text(errors="replace") for p in Path(out).rglob("*.json")]
    t = shards.read_table(str(out))
    texts += [json.dumps(t.select([c for c in t.column_names if c != "image"]).to_pylist(), default=str)]
    for value in [*FAKE_PHI.values(), PATIENT_FOLDER]:
        assert not any(value in x for x in texts), value
    assert np.isfinite(np.asarray(t["z_mm"].to_pylist(), dtype=float)).all()

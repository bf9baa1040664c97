"""Reject paths are redacted with every identifier the run knows, wherever the reject was found.

The phantom cohort's folders are named by the fake PatientID; here its other fake identifiers
(PatientName, SOPInstanceUID, AccessionNumber, birth date, OtherPatientIDs, StudyInstanceUID) name
files and folders too, among bad files of every kind: rejects found while discovering the input (a
labels CSV row naming a missing file), rejects of a folder whose files all fail to parse (so it has
no identifiers of its own), rejects found in an earlier, crashed run, and ignored non-image files.
The property: after prep, no output byte, decoded row or log line at ``-v`` holds any of the values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_prep import shards
from data_prep.phantom.cohort import write_cohort
from data_prep.phantom.dicom_writer import FakePHI, fake_phi
from tests.conftest import TEST_DEID_KEY

PATIENTS = 3


def _prep_cli(src: Path, dst: Path, *extra: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    """``ctssl -v prep`` as a user runs it, stdout and stderr captured (the logs are outputs too)."""
    env = {**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY}
    env.pop("CTSSL_FAILPOINT", None)
    if failpoint:
        env["CTSSL_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", "-v", "prep", str(src), str(dst), "--executor",
                           "local", "--size", "32", *extra], env=env, capture_output=True, text=True, timeout=300)


def _last_name(phi: FakePHI) -> str:
    return phi.patient_name.split("^")[0]


def _cohort_with_phi_names(src: Path, seed: int) -> tuple[set[str], int]:
    """A phantom cohort whose identifiers also name files and folders, with bad files among them.

    Returns (every identifying value to scan the outputs for, number of inputs that must be rejected).
    Which identifier names which file is drawn from ``seed``, so each seed is another layout.
    """
    write_cohort(src, patients=PATIENTS, slices=4, size=32, seed=seed)
    rng = np.random.default_rng(seed)
    phis = [fake_phi(seed, i) for i in range(PATIENTS)]
    scan: set[str] = set()
    for phi in phis:
        scan |= {v for v in phi.searchable().values() if len(v) >= 4}
        scan.add(_last_name(phi))
    rejected = 0
    label_rows = []
    for i, phi in enumerate(phis):
        series = src / phi.patient_id / "study1" / "series1"
        files = sorted(series.glob("*.dcm"))
        for f in files:
            scan.add(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))
        # good files renamed after identifiers of their own header
        for f in rng.choice(files, size=2, replace=False):
            sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            name = rng.choice([f"{sop}.dcm", f"{phi.patient_name}_{sop[-6:]}.dcm", f"{_last_name(phi)}-{f.name}"])
            f.rename(series / name)
        # bad files named by identifiers, in the patient's folder
        (series / f"{rng.choice([phi.accession, phi.birth_date, phi.study_uid])}.dcm").write_bytes(b"not dicom")
        good = sorted(series.glob("*.dcm"))[0].read_bytes()
        trunc = src / phi.patient_id / rng.choice([phi.patient_name, phi.other_patient_id]) / "cut.dcm"
        trunc.parent.mkdir()
        trunc.write_bytes(good[: len(good) - 600])  # header intact, pixel data cut short
        rejected += 2
        # a non-image file named by an identifier: listed as ignored, so redacted as well
        (src / phi.patient_id / f"notes-{_last_name(phi)}.txt").write_text("a radiologist's note\n")
        label_rows += [(phi.patient_id, "abc"[i]),
                       (f"{phi.patient_id}/study1/series1/{phi.series_uid}.dcm", "x")]  # missing file
        rejected += 1
    # a folder of unreadable files named by another patient's identifiers: nothing in it can be read,
    # so only the run as a whole knows what to redact (it sorts before the patient folders: its chunk
    # is committed first, before any header naming it was read)
    other = phis[int(rng.integers(PATIENTS))]
    junk = src / f"{other.other_patient_id}-{rng.choice([other.accession, other.birth_date])}"
    junk.mkdir()
    for name in (other.patient_id, other.patient_name, other.study_uid):
        (junk / f"{name}.dcm").write_bytes(os.urandom(256))
        rejected += 1
    with (src / "labels.csv").open("w") as f:
        f.write("file,label\n" + "".join(f"{k},{v}\n" for k, v in label_rows))
    return scan, rejected


def _outputs(dst: Path, *runs: subprocess.CompletedProcess) -> list[tuple[str, bytes]]:
    blobs = [(str(p.relative_to(dst)), p.read_bytes()) for p in dst.rglob("*") if p.is_file()]
    t = shards.read_table(str(dst))  # Parquet pages are compressed: scan the decoded rows as well
    blobs.append(("decoded rows", str(t.drop_columns(["image"]).to_pylist()).encode()))
    for n, r in enumerate(runs):
        blobs += [(f"run {n} stdout", r.stdout.encode()), (f"run {n} stderr", r.stderr.encode())]
    return blobs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_phi_value_in_any_output_byte_when_identifiers_name_files_and_folders(tmp_path, seed):
    src, dst = tmp_path / "src", tmp_path / "out"
    scan, rejected = _cohort_with_phi_names(src, seed)
    labels = str(src / "labels.csv")
    # one chunk per series (--rows-per-shard 1), killed in the second patient's chunk, then resumed: rejects
    # are committed by chunks that never read the identifiers in their paths, and by an earlier run
    crashed = _prep_cli(src, dst, "--labels", labels, "--rows-per-shard", "1", failpoint="shard.after_write:6")
    resumed = _prep_cli(src, dst, "--labels", labels, "--rows-per-shard", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "already committed" in resumed.stderr  # the resume path really ran

    leaks = sorted({(v, where) for v in scan for where, b in _outputs(dst, crashed, resumed) if v.encode() in b})
    assert not leaks, f"PHI leaked: {leaks[:6]}"
    m = shards.read_manifest(str(dst))
    assert m["counts"]["slices_written"] == PATIENTS * 4 and m["counts"]["patients"] == PATIENTS
    assert len(m["rejects"]) == rejected
    assert all("[redacted]" in r["input"] for r in m["rejects"]), m["rejects"]
    assert all("[redacted]" in x for x in m["ignored"] if x.endswith(".txt"))


def test_labels_row_naming_a_missing_file_in_a_patient_folder_is_redacted(tmp_path):
    """The reject is found before any header is read, so no worker can redact it (it used to reach
    the manifest and stdout with the PatientID folder name in clear)."""
    src, dst = tmp_path / "src", tmp_path / "out"
    write_cohort(src, patients=2, slices=3, size=32)
    pid = fake_phi(0, 1).patient_id
    (src / "labels.csv").write_text(f"file,label\n{pid}/study1/series1/IMG9999.dcm,1\n")
    r = _prep_cli(src, dst, "--labels", str(src / "labels.csv"))
    assert r.returncode == 0, r.stderr
    m = shards.read_manifest(str(dst))
    assert [x["input"] for x in m["rejects"]] == ["labels.csv: [redacted]/study1/series1/IMG9999.dcm"]
    assert "rejected labels.csv: [redacted]/study1/series1/IMG9999.dcm" in r.stdout
    assert pid not in r.stdout + r.stderr and pid.encode() not in (dst / "_manifest.json").read_bytes()


def test_folder_of_unreadable_files_is_redacted_with_other_folders_identifiers(tmp_path):
    """Nothing in the folder parses, so its own chunk knows no identifier: its commit record must not
    name the path in clear, and the manifest redacts it with the identifiers the whole run read."""
    src, dst = tmp_path / "src", tmp_path / "out"
    write_cohort(src, patients=2, slices=3, size=32)
    phi = fake_phi(0, 0)
    junk = src / f"old-{phi.patient_id}"
    junk.mkdir()
    (junk / f"{phi.accession}.dcm").write_bytes(b"not dicom at all")
    r = _prep_cli(src, dst, "--rows-per-shard", "1")
    assert r.returncode == 0, r.stderr
    m = shards.read_manifest(str(dst))
    bad = [x for x in m["rejects"] if "not a DICOM" in x["reason"]]
    assert [x["input"] for x in bad] == ["old-[redacted]/[redacted].dcm"]
    for f in (dst / "_commits").iterdir():
        text = f.read_text()
        assert phi.patient_id not in text and phi.accession not in text, f.name
        for rec in json.loads(text)["rejects"]:
            assert "input" not in rec and rec["file"].startswith("FI-")  # named by a keyed digest only


def test_image_folder_patient_values_are_redacted_from_other_files_names(tmp_path):
    """An image folder has no headers; its labels CSV's ``patient`` column is what identifies a
    person, and files are often named by it (the default patient, the image's own path, is not an
    identifier and must not blank out the names of the rejects)."""
    from PIL import Image

    src, dst = tmp_path / "src", tmp_path / "out"
    (src / "ct").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 50, np.uint8)).save(src / "ct" / "scan1.png")
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(src / "ct" / "extra.png")
    (src / "ct" / "Hollerbach-MRN-5550123.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "ct" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (src / "labels.csv").write_text("file,label,patient\nct/scan1.png,covid,MRN-5550123\n")
    r = _prep_cli(src, dst, "--source", "imagefolder")
    assert r.returncode == 0, r.stderr
    m = shards.read_manifest(str(dst))
    assert sorted(x["input"] for x in m["rejects"]) == ["ct/Hollerbach-[redacted].png", "ct/broken.png"]
    assert b"MRN-5550123" not in (dst / "_manifest.json").read_bytes() and "MRN-5550123" not in r.stdout
    reasons = {x["input"]: x["reason"] for x in m["rejects"]}
    assert "unreadable image" in reasons["ct/broken.png"] and "MRN" not in reasons["ct/Hollerbach-[redacted].png"]

"""Prep of the phantom cohort: the embedded default data, with labels and fake PHI in every header."""

from __future__ import annotations

import os
import subprocess
import sys

import pydicom

from data_prep import shards
from data_prep.phantom.dicom_writer import fake_phi
from tests.conftest import TEST_DEID_KEY


def test_phantom_cohort_prep_writes_labelled_rows_and_no_phi_byte(phantom_dicom, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY}
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "prep", str(phantom_dicom), str(out), "--size", "64",
                        "--labels", str(phantom_dicom / "labels_region.csv"), "--executor", "local"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    t = shards.read_table(str(out))
    assert t.num_rows == 3 * 8
    assert len(set(t["patient_id"].to_pylist())) == 3
    assert None not in t["label"].to_pylist()
    m = shards.read_manifest(str(out))
    assert m["counts"]["rejected"] == 0 and m["counts"]["patients"] == 3
    assert sorted(m["ignored"]) == sorted(p.name for p in phantom_dicom.iterdir() if p.is_file())

    phi: set[str] = set()
    for i in range(3):
        phi |= {v for v in fake_phi(0, i).searchable().values() if len(v) >= 4}
    for f in phantom_dicom.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        phi.add(str(ds.SOPInstanceUID))
        assert str(ds.PatientName) in phi  # the headers really do carry the fake PHI we scan for
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    blobs.append(str(t.drop_columns(["image"]).to_pylist()).encode())
    blobs += [r.stdout.encode(), r.stderr.encode()]
    leaks = sorted(v for v in phi for b in blobs if v.encode() in b)
    assert not leaks, f"PHI leaked into outputs or logs: {leaks[:5]}"

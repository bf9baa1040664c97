"""The file readers' warnings never carry an identifier to stderr, stdout, the manifest or a commit record.

pydicom warns (Python ``warnings`` and its ``pydicom`` logger) when a header value is malformed, and
quotes the value: a UID with an invalid character is printed whole. Readers also word warnings with
the path of the file they read, and input folders are named by the patient. Prep captures them while
it reads, replaces input paths by ``<input>``, redacts the run's identifiers and reports counts per
kind plus the redacted texts (manifest ``reader_warnings``, one summary line).

Property: for generated cohorts (random names and IDs, folder layouts named by them, malformed UIDs
in random files), no identifying value appears in any output byte, decoded row, stdout or stderr,
through the real CLI with the local executor and with Ray (which forwards worker stderr).
"""

from __future__ import annotations

import json
import logging
import os
import string
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_prep import shards
from data_prep.prep import PrepConfig, run_prep
from tests.conftest import TEST_DEID_KEY
from tests.data_prep.dicom_factory import write_series

PATIENTS = 3


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(string.ascii_uppercase), size=n))


def _patch(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))


def _cohort(src: Path, seed: int) -> tuple[set[str], int]:
    """Patients with random identifiers, each in folders named by them, with malformed UIDs (the last
    character made non-ASCII, which pydicom reports quoting the value) in random files.

    Returns (every identifying value to scan the outputs for, number of malformed values)."""
    rng = np.random.default_rng(seed)
    scan: set[str] = set()
    bad = 0
    for i in range(PATIENTS):
        last, first = _word(rng, 7), _word(rng, 6)
        phi = {"PatientName": f"{last}^{first}", "PatientID": f"Q{rng.integers(10**6, 10**7)}",
               "PatientBirthDate": f"19{rng.integers(10, 99)}0{rng.integers(1, 9)}1{rng.integers(0, 9)}",
               "AccessionNumber": f"ACC{rng.integers(10**5, 10**6)}"}
        folder = [src / phi["PatientName"] / phi["PatientID"],
                  src / f"{phi['PatientID']}_{last}" / "ct",
                  src / f"{last} {first}" / f"{i}"][int(rng.integers(3))]
        paths = write_series(folder, 3, size=16, seed=seed * 10 + i, phi=phi)
        scan |= {phi["PatientName"], phi["PatientID"], phi["AccessionNumber"], last, first}
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            scan |= {str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)}
        for p in rng.choice(paths, size=2, replace=False):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            uid = str(ds[rng.choice(["SOPInstanceUID", "StudyInstanceUID"])].value)
            _patch(p, uid.encode(), uid[:-1].encode() + b"\xe9")
            scan.add(uid[:-1])  # what pydicom quotes, up to the bad character
            bad += 1
    return {v for v in scan if len(v) >= 4}, bad


def _prep_cli(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTSSL_DEID_KEY": TEST_DEID_KEY}
    env.pop("CTSSL_FAILPOINT", None)
    env.pop("RAY_ADDRESS", None)  # --executor ray starts its own local Ray, as for a user without a cluster
    return subprocess.run([sys.executable, "-m", "ray_jobs.cli", "-v", "prep", str(src), str(dst), "--size", "12",
                           "--no-progress", *extra], env=env, capture_output=True, text=True, timeout=300)


def _outputs(root: Path, dst: Path, run: subprocess.CompletedProcess) -> list[tuple[str, bytes]]:
    """Every file the run left (output, commit records, any log file under the test folder but the
    input) and its decoded rows, stdout and stderr."""
    blobs = [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file() and "src" not in p.parts]
    t = shards.read_table(str(dst))
    blobs.append(("decoded rows", str(t.drop_columns(["image"]).to_pylist()).encode()))
    return blobs + [("stdout", run.stdout.encode()), ("stderr", run.stderr.encode())]


@pytest.mark.parametrize(("seed", "executor"), [(0, "local"), (1, "local"), (2, "ray")])
def test_reader_warnings_are_counted_and_redacted_never_printed(tmp_path, seed, executor):
    src, dst = tmp_path / "src", tmp_path / "out"
    scan, bad = _cohort(src, seed)
    extra = ["--executor", executor] + (["--workers", "1"] if executor == "ray" else [])
    run = _prep_cli(src, dst, *extra)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Invalid value for VR UI" not in run.stderr  # pydicom's text is not printed at all
    manifest = json.loads((dst / "_manifest.json").read_text())
    info = manifest["reader_warnings"]
    assert info["total"] >= bad and info["counts"].get("pydicom UserWarning", 0) >= bad
    assert any("Invalid value for VR UI: '[redacted]" in m["message"] for m in info["messages"])
    assert f"{info['total']} warning(s) from the file readers" in run.stdout
    commits = [json.loads(p.read_text()) for p in (dst / "_commits").glob("*.json")]
    assert sum(m["count"] for c in commits for m in c["reader_warnings"]) >= bad
    for where, blob in _outputs(tmp_path, dst, run):
        for value in scan:
            assert value.encode() not in blob, f"{value!r} found in {where}"


def test_a_warning_quoting_the_input_path_names_no_patient_folder(tmp_path, monkeypatch, capfd, caplog):
    """Readers name the file they read; the path (folders named by PatientName and PatientID, which
    only the headers say are identifiers) becomes <input>, and nothing reaches stderr, the logging
    handlers or the caller's warnings."""
    src, dst = tmp_path / "src", tmp_path / "out"
    scan, _ = _cohort(src, 5)
    real = pydicom.dcmread

    def dcmread_that_warns(fp, *args, **kwargs):  # noqa: ANN001, ANN202 - pydicom's signature
        warnings.warn(f"odd element in {fp}", UserWarning, stacklevel=2)
        logging.getLogger("pydicom").warning("deferred read of %s", os.path.abspath(str(fp)))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread_that_warns)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary = run_prep(PrepConfig(src=str(src), dst=str(dst), size=12, executor="local", progress=False),
                           TEST_DEID_KEY.encode())
    assert summary.committed
    info = summary.reader_warnings
    texts = [m["message"] for m in info["messages"]]
    assert info["counts"]["python UserWarning"] >= 9 and info["counts"]["pydicom warning"] >= 9
    assert "odd element in <input>" in texts and "deferred read of <input>" in texts
    assert not [w for w in seen if "odd element" in str(w.message)]
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    out, err = capfd.readouterr()
    manifest = (dst / "_manifest.json").read_text()
    for value in scan:
        for where, text in (("stdout", out), ("stderr", err), ("manifest", manifest), ("log", caplog.text)):
            assert value not in text, f"{value!r} found in {where}"

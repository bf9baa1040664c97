"""Helpers that build small phantom cohorts for tests (wired into fixtures by ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

from data_prep.phantom.cohort import write_cohort


def make_phantom_cohort(tmp_path: Path, patients: int = 3, slices: int = 8, size: int = 64, seed: int = 0,
                        lesion_rate: float = 0.3, compress: str | None = None) -> Path:
    """Write a phantom DICOM cohort under ``tmp_path/phantom`` and return that folder."""
    dst = Path(tmp_path) / "phantom"
    write_cohort(dst, patients=patients, slices=slices, size=size, seed=seed, lesion_rate=lesion_rate,
                 compress=compress)
    return dst

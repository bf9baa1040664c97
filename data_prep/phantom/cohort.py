"""Write a whole phantom cohort: one CT series per patient as DICOM, label CSVs and a ground-truth JSON.

Layout (LIDC-IDRI style, patient folders named by the fake PatientID, so a reader must de-identify
folder names too)::

    dst/<PatientID>/study1/series1/IMG0001.dcm ...   file numbers shuffled: not in slice order
    dst/labels_region.csv   file,label   (label: one of REGION_CLASSES)
    dst/labels_lesion.csv   file,label   (label: "1" a lesion is visible, "0" none)
    dst/phantom.json        generator settings and per-series counts, no PHI

Work is split into chunks of slices so that one long series still uses every worker process and the
progress callback moves smoothly; each chunk re-derives its patient's plan from the seed.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctssl_base.errors import UserError
from data_prep.phantom.dicom_writer import COMPRESSIONS, STORAGES, SeriesGeometry, SeriesWriter, fake_phi
from data_prep.phantom.synth import REGION_CLASSES, PhantomPatient, patient_seed

CHUNK_SLICES = 64
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class _Job:
    dst: str
    seed: int
    index: int
    slices: int
    size: int
    lesion_rate: float
    compress: str | None
    lo: int
    hi: int


def storage_of(index: int) -> str:
    """Alternate unsigned / signed storage between patients, so both decode paths are exercised."""
    return STORAGES[index % 2]


def series_dir(phi_patient_id: str) -> str:
    return f"{phi_patient_id}/study1/series1"


def file_numbers(seed: int, index: int, slices: int) -> np.ndarray:
    """File number of each slice (slice order -> IMGnnnn): a permutation, so names say nothing."""
    return np.random.default_rng([seed & 0xFFFFFFFF, index, 0xF11E]).permutation(slices) + 1


def _file_name(num: int, slices: int) -> str:
    return f"IMG{num:0{max(4, len(str(slices)))}d}.dcm"


def _write_chunk(job: _Job) -> list[tuple[str, str, str]]:
    plan = PhantomPatient(patient_seed(job.seed, job.index), job.slices, job.size, job.lesion_rate)
    phi = fake_phi(job.seed, job.index)
    geom = SeriesGeometry(job.size, job.size, plan.spacing_mm, plan.slice_thickness_mm, plan.origin_xy_mm)
    writer = SeriesWriter(phi, geom, storage_of(job.index), job.compress, job.seed, job.index)
    rel_dir = series_dir(phi.patient_id)
    out_dir = Path(job.dst) / rel_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    nums = file_numbers(job.seed, job.index, job.slices)
    rows = []
    for i in range(job.lo, job.hi):
        name = _file_name(int(nums[i]), job.slices)
        # InstanceNumber follows the acquisition (head first); only the file names are shuffled
        writer.write(out_dir / name, plan.render(i), i, i + 1, float(plan.z_mm[i]))
        rows.append((f"{rel_dir}/{name}", str(plan.region[i]), "1" if plan.lesion[i] else "0"))
    return rows


def _series_summary(seed: int, index: int, slices: int, size: int, lesion_rate: float) -> dict:
    plan = PhantomPatient(patient_seed(seed, index), slices, size, lesion_rate)
    return {
        "patient_index": index,
        "slices": slices,
        "storage": storage_of(index),
        "lesion_slices": int(plan.lesion.sum()),
        "lesions": len(plan.anatomy.lesions),
        "regions": {c: int(n) for c, n in sorted(Counter(plan.region.tolist()).items())},
        "pixel_spacing_mm": round(plan.spacing_mm[0], 4),
        "slice_thickness_mm": round(plan.slice_thickness_mm, 4),
    }


def write_cohort(dst: str | os.PathLike, patients: int, slices: int, size: int = 256, seed: int = 0,
                 lesion_rate: float = 0.3, compress: str | None = None, workers: int = 1,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Write the cohort; returns the content of ``phantom.json``. ``progress(n)`` is called with the
    number of slices finished since the last call."""
    if patients < 1 or slices < 1:
        raise UserError(f"need at least one patient and one slice (got patients={patients}, slices={slices})")
    if size < 16:
        raise UserError(f"--size must be at least 16 (got {size})")
    if not 0.0 <= lesion_rate <= 1.0:
        raise UserError(f"--lesion-rate must be between 0 and 1 (got {lesion_rate})")
    if compress == "none":
        compress = None
    if compress not in COMPRESSIONS:
        raise UserError(f"unknown compression {compress!r}; expected none, rle or jpeg2000")
    root = Path(dst)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder")
    if root.is_dir() and (root / "phantom.json").exists():
        raise UserError(f"{root}: already holds a phantom cohort (phantom.json); choose an empty folder")
    root.mkdir(parents=True, exist_ok=True)

    jobs = [_Job(str(root), seed, p, slices, size, lesion_rate, compress, lo, min(lo + CHUNK_SLICES, slices))
            for p in range(patients) for lo in range(0, slices, CHUNK_SLICES)]
    rows: list[tuple[str, str, str]] = []
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            rows += _write_chunk(job)
            if progress:
                progress(job.hi - job.lo)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for part in pool.map(_write_chunk, jobs):
                rows += part
                if progress:
                    progress(len(part))
    rows.sort()
    for name, col in (("labels_region.csv", 1), ("labels_lesion.csv", 2)):
        with (root / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "label"])
            w.writerows((r[0], r[col]) for r in rows)
    series = [_series_summary(seed, p, slices, size, lesion_rate) for p in range(patients)]
    info = {
        "generator": "ctssl phantom",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "patients": patients,
        "slices": slices,
        "size": size,
        "lesion_rate": lesion_rate,
        "compress": compress or "none",
        "region_classes": list(REGION_CLASSES),
        "label_files": {"region": "labels_region.csv", "lesion": "labels_lesion.csv"},
        "totals": {
            "slices": len(rows),
            "lesion_slices": sum(s["lesion_slices"] for s in series),
            "regions": dict(sorted(Counter(r[1] for r in rows).items())),
        },
        "series": series,
    }
    (root / "phantom.json").write_text(json.dumps(info, indent=2) + "\n")
    return info

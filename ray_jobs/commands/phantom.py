"""``ctssl phantom DST``: write a synthetic CT cohort as DICOM series plus label CSVs."""

from __future__ import annotations

import argparse
import os
import sys
import time

from data_prep.phantom.cohort import write_cohort

NAME = "phantom"
HELP = "write a synthetic CT phantom cohort (DICOM series + region / lesion label CSVs)"
DESCRIPTION = """Write synthetic CT series of the trunk (lung apex to pelvis) as CT Image Storage DICOM:
one series per patient under DST/<PatientID>/study1/series1/, with fake patient identifiers
(name, ID, birth date, institution, accession...) so that de-identification has work to do.
DST/labels_region.csv and DST/labels_lesion.csv label every slice file for the two downstream
tasks; DST/phantom.json records the settings and counts (no identifiers). Same seed, same bytes.

examples:
  ctssl phantom ./phantom --patients 20 --slices 100
  ctssl phantom ./phantom-j2k --patients 4 --slices 50 --size 512 --compress jpeg2000
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dst", help="output folder (must not already hold a cohort)")
    p.add_argument("--patients", type=int, default=10, help="number of patients, one series each (default 10)")
    p.add_argument("--slices", type=int, default=64, help="slices per series, lung apex to pelvis (default 64)")
    p.add_argument("--size", type=int, default=256, help="rows and columns of each slice (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same cohort")
    p.add_argument("--lesion-rate", type=float, default=0.3,
                   help="approximate fraction of slices showing a lesion (default 0.3)")
    p.add_argument("--compress", choices=["none", "rle", "jpeg2000"], default="none",
                   help="transfer syntax: none (explicit VR little endian), rle or jpeg2000 (lossless)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="writer processes (default: up to 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    total = max(args.patients, 0) * max(args.slices, 0)
    t0 = time.perf_counter()
    with tqdm(total=total, unit="slice", desc="phantom", disable=args.no_progress, file=sys.stderr) as bar:
        info = write_cohort(args.dst, patients=args.patients, slices=args.slices, size=args.size,
                            seed=args.seed, lesion_rate=args.lesion_rate, compress=args.compress,
                            workers=args.workers, progress=bar.update)
    dt = time.perf_counter() - t0
    tot = info["totals"]
    regions = ", ".join(f"{k} {v}" for k, v in tot["regions"].items())
    print(f"phantom: {tot['slices']} slices in {info['patients']} series ({args.size}x{args.size}, "
          f"{info['compress']}) written to {args.dst} in {dt:.1f}s ({tot['slices'] / max(dt, 1e-9):.0f} slices/s); "
          f"lesion slices {tot['lesion_slices']}; regions: {regions}")
    return 0

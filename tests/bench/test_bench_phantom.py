"""Phantom speed, each figure printed as a ratio to a peer measured in the same run.

1. Rendering one slice vs drawing the same number of Gaussian noise images with numpy (the least a
   noisy synthetic slice can cost): at 256 px the target is well under 5 ms per slice.
2. Writing a 2,000-slice 512x512 cohort (``write_cohort``, 1 and 2 processes) vs pydicom's decode
   ceiling on the same files (``dcmread`` + ``pixel_array``): a cohort should take seconds, not minutes.

Run: ``.venv/bin/python -m pytest tests/bench/test_bench_phantom.py -s -p no:cacheprovider --override-ini=addopts=``
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pydicom

from data_prep.phantom.cohort import write_cohort
from data_prep.phantom.synth import PhantomPatient


def _rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def test_bench_render_slice_vs_numpy_noise():
    n = 200
    rng = np.random.default_rng(0)
    for size in (256, 512):
        plan = PhantomPatient(1, n, size)
        plan.render(0)  # warm the noise bank
        render = _rate(lambda plan=plan: [plan.render(i) for i in range(n)], n)
        noise = _rate(lambda size=size: [rng.standard_normal((size, size), dtype=np.float32) for _ in range(n)], n)
        print(f"\nphantom render {size}x{size}: {1e3 / render:.2f} ms/slice ({render:.0f} slices/s); "
              f"numpy noise image: {1e3 / noise:.2f} ms; ratio render/noise time = {noise / render:.1f}x"
              + ("; target < 5 ms at 256 px" if size == 256 else ""))


def test_bench_write_2000_slice_cohort_vs_decode_ceiling(tmp_path: Path):
    patients, slices = 20, 100
    rates = {}
    for workers in (1, 2):
        dst = tmp_path / f"w{workers}"
        rates[workers] = _rate(lambda dst=dst, w=workers: write_cohort(dst, patients, slices, size=512, seed=0,
                                                                       workers=w), patients * slices)
    files = sorted((tmp_path / "w1").rglob("*.dcm"))
    decode = _rate(lambda: [pydicom.dcmread(f).pixel_array for f in files], len(files))
    print(f"\nphantom write 2,000 x 512x512: 1 process {rates[1]:.0f} slices/s ({patients * slices / rates[1]:.1f} s), "
          f"2 processes {rates[2]:.0f} slices/s ({patients * slices / rates[2]:.1f} s, x{rates[2] / rates[1]:.2f}); "
          f"pydicom decode ceiling {decode:.0f} slices/s; write/decode = {rates[1] / decode:.2f}")
    shutil.rmtree(tmp_path, ignore_errors=True)

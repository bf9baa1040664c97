"""Prep throughput on a JPEG Lossless CT series (the syntax most CT archives hold besides JPEG 2000)
against the decode + encode floor measured in the same run.

Run: ``.venv/bin/python -m pytest tests/bench/test_bench_prep_jpeg_lossless.py -s -p no:cacheprovider
--override-ini=addopts=`` (also part of ``make bench``).

The series: the 20 real 512x512 slices of tests/data/real_ct, re-encoded by GDCM as JPEG Lossless
first-order prediction (1.2.840.10008.1.2.4.70), ten times as ten patients (200 slices; each copy
with its own UIDs), cached under $CTSSL_BENCH_CACHE. Peers, as in test_bench_prep.py:
- *decode ceiling*: ``pydicom.dcmread(f).pixel_array`` (pydicom's gdcm plugin, the only one installed
  for this syntax), one process;
- *decode + encode floor*: the decode ceiling and writing prep's own output again with the shard writer
  alone, back to back.
Target: prep with one worker >= 0.7 x the floor.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from tests.bench.test_bench_prep import (
    CACHE,
    NO_RATE,
    REAL_CT,
    ROUNDS,
    _dicom_files,
    _report,
    decode_ceiling,
    encode_floor,
    floor_of,
    ours,
    warm_page_cache,
    warm_up_ours,
)

COPIES = 10


def _jpeg_lossless_series() -> tuple[Path, list[Path]]:
    from tests.data.dicom_codecs.make_codecs import gdcm_encode

    root = CACHE / "real-jpeg-lossless-x10"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        for c in range(COPIES):
            series = generate_uid(entropy_srcs=["bench-jpeg-lossless", str(c)])
            for f in sorted(REAL_CT.iterdir()):
                ds = pydicom.dcmread(f)
                arr = ds.pixel_array
                ds.PixelData = arr.tobytes()
                ds["PixelData"].VR = "OW"
                ds.SOPClassUID = CTImageStorage
                ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, f.name])
                ds.SeriesInstanceUID, ds.PatientID = series, f"bench-{c}"
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                (root / f"copy{c}").mkdir(parents=True, exist_ok=True)
                gdcm_encode(ds, JPEGLosslessSV1, root / f"copy{c}" / f.name)
        done.write_text("ok")
    return root, _dicom_files(root)


def test_prep_throughput_real_jpeg_lossless(tmp_path):
    src, files = _jpeg_lossless_series()
    assert len(files) == 20 * COPIES
    assert pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    warm_page_cache(files)
    warm_up_ours(src, tmp_path, executor="local")
    ceil = one = enc = NO_RATE
    for _ in range(ROUNDS):
        ceil = ceil.best(decode_ceiling(files))
        one = one.best(ours(src, tmp_path / "o1", executor="local"))
        enc = enc.best(encode_floor(tmp_path / "o1"))
    both = floor_of(ceil, enc)
    _report(f"real series as JPEG Lossless SV1 x{COPIES} ({len(files)} slices 512x512), one process "
            f"(best of {ROUNDS} interleaved rounds)", [
                ("decode ceiling (dcmread + pixel_array, gdcm)", ceil),
                ("ctssl prep, 1 worker, 256 px (default)", one),
                ("encode alone: shard writer, 256 px output", enc),
                ("decode + encode alone, back to back", both),
            ], ceil)
    print(f"  prep / decode + encode alone: x{one.wall / both.wall:.2f} wall-clock, x{one.cpu / both.cpu:.2f} "
          "CPU time (target >= 0.7)")

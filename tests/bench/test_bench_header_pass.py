"""Cost of DICOM discovery's header pass (grouping series over the whole input, finding duplicates)
against the whole prep run.

Run: ``.venv/bin/python -m pytest tests/bench/test_bench_header_pass.py -s -p no:cacheprovider
--override-ini=addopts=``. Discovery reads every file's header once (no pixel data) before any series
is loaded; the figure is the time of ``DicomSource.discover`` over the time of the whole ``run_prep``
(one process, 256 px, page cache warm), median of several runs, on the real JPEG 2000 series in
tests/data/real_ct and on an uncompressed phantom cohort (where decoding is cheap, so the pass weighs
more). Target: <= 10 % on the real series.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from data_prep.prep import PrepConfig, run_prep
from data_prep.sources.dicom import DicomSource

KEY = b"bench-prep-key-7f3a9c21e5b8d046-x2"  # passes data_prep.deid.key_weakness
REPO = Path(__file__).resolve().parents[2]
REAL_CT = REPO / "tests" / "data" / "real_ct" / "totalsegmentator_example_ct"
RUNS = 5


def _ratio(src: Path, tmp: Path, monkeypatch) -> tuple[float, float, float]:
    """(median discover seconds, median prep seconds, ratio) over RUNS runs into fresh folders."""
    spent: list[float] = []
    real = DicomSource.discover

    def timed(self, root, opts):
        t0 = time.perf_counter()
        try:
            return real(self, root, opts)
        finally:
            spent.append(time.perf_counter() - t0)

    monkeypatch.setattr(DicomSource, "discover", timed)
    totals = []
    for i in range(RUNS + 1):  # the first run warms the page cache and imports
        dst = tmp / f"out{i}"
        t0 = time.perf_counter()
        run_prep(PrepConfig(src=str(src), dst=str(dst), source="dicom", executor="local", progress=False), KEY)
        totals.append(time.perf_counter() - t0)
        shutil.rmtree(dst)
    d, t = statistics.median(spent[1:]), statistics.median(totals[1:])
    return d, t, d / t


def test_header_pass_is_at_most_a_tenth_of_prep_on_the_real_series(tmp_path, monkeypatch):
    d, t, r = _ratio(REAL_CT, tmp_path, monkeypatch)
    print(f"\nreal JPEG 2000 series (20 files): discover {d * 1000:.1f} ms of prep {t * 1000:.1f} ms = {r:.1%}")
    assert r <= 0.10


def test_header_pass_share_on_an_uncompressed_phantom_cohort(tmp_path, monkeypatch):
    from data_prep.phantom.cohort import write_cohort

    write_cohort(tmp_path / "src", patients=4, slices=40, size=512, seed=0)
    d, t, r = _ratio(tmp_path / "src", tmp_path, monkeypatch)
    print(f"\nuncompressed phantom (160 files, 512 px): discover {d * 1000:.1f} ms of prep {t * 1000:.1f} ms "
          f"= {r:.1%}")
    assert 0 < r < 1

"""Benchmark of dataset reduction (run with ``make bench`` or ``pytest tests/bench/test_bench_reduce.py -s``).

1. 2,000 phantom slices at 512x512 (20 volumes x 100 slices), hash reduction with Hamming <= 6:
   * the paper-style loop: per slice min-max scaling, ``imagehash.dhash(PIL image)``, greedy per
     volume with imagehash's distance;
   * ctssl from pixels: ``dhash64_hu`` on the batch + the greedy (what prep + reduce compute);
   * ctssl ``hash --scope volume`` as ``ctssl reduce`` runs it: from the dhash column prep stored;
   * imagededup's DHash (``encode_image`` + ``find_duplicates`` per volume), when it is installed.
   All in one run; the selections of the paper loop and ctssl must be identical. Prints ratios.
2. ``hash --scope global`` on 1,000,000 synthetic 64-bit codes with planted near-duplicates: time,
   peak memory, and recall against brute force on a sample of rows.
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc

import numpy as np
import pytest

from data_prep.dhash import dhash64_hu, hamming, minmax_uint8, popcount64
from data_prep.reduce import SliceSet, build_strategy
from data_prep.reduce.greedy import reference_greedy
from data_prep.reduce.mih import global_reference_greedy

N_VOLUMES, PER_VOLUME, SIZE, T = 20, 100, 512, 6


@pytest.fixture(scope="module")
def phantom_volumes() -> np.ndarray:
    from data_prep.phantom.synth import render_volume

    cache = os.path.join(tempfile.gettempdir(), f"ctssl-bench-phantom-{N_VOLUMES}x{PER_VOLUME}x{SIZE}.npy")
    if os.path.exists(cache):
        return np.load(cache)
    t = time.perf_counter()
    hu = np.stack([render_volume(1000 + v, PER_VOLUME, size=SIZE).hu for v in range(N_VOLUMES)])
    print(f"\nrendered {hu.shape[0] * hu.shape[1]} phantom slices at {SIZE}x{SIZE} in {time.perf_counter() - t:.1f} s")
    np.save(cache, hu)
    return hu  # (volumes, slices, H, W)


def paper_loop(hu: np.ndarray) -> list[np.ndarray]:
    import imagehash
    from PIL import Image

    keeps = []
    for vol in hu:
        hashes = [imagehash.dhash(Image.fromarray(minmax_uint8(s)[0]), hash_size=8) for s in vol]
        remaining, keep = list(range(len(hashes))), np.zeros(len(hashes), bool)
        while remaining:
            ref = remaining.pop(0)
            keep[ref] = True
            remaining = [i for i in remaining if hashes[i] - hashes[ref] > T]
        keeps.append(keep)
    return keeps


def ctssl_from_pixels(hu: np.ndarray) -> list[np.ndarray]:
    return [reference_greedy(dhash64_hu(vol), T)[0] for vol in hu]


def best_of(fn, repeats: int = 2):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def test_bench_hash_volume_scope_against_the_paper_loop(phantom_volumes):
    hu = phantom_volumes
    n = hu.shape[0] * hu.shape[1]
    dhash64_hu(hu[0, :2])  # compile the kernel outside the timing

    t_paper, keep_paper = best_of(lambda: paper_loop(hu), repeats=1)
    t_pixels, keep_pixels = best_of(lambda: ctssl_from_pixels(hu))
    try:
        import numba

        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        t_pixels_1, _ = best_of(lambda: ctssl_from_pixels(hu))
        numba.set_num_threads(threads)
    except ImportError:
        threads, t_pixels_1 = 1, t_pixels

    codes = np.concatenate([dhash64_hu(vol) for vol in hu])
    data, _ = SliceSet.from_arrays(np.repeat([f"vol-{v:03d}" for v in range(N_VOLUMES)], PER_VOLUME),
                                   np.tile(np.arange(PER_VOLUME), N_VOLUMES), dhash=codes)

    def stored_column():
        strat = build_strategy("hash", {"scope": "volume"})
        strat.prepare(data)
        return strat.select(T)

    t_column, sel = best_of(stored_column, repeats=3)

    # exactness: identical selections
    assert all(np.array_equal(a, b) for a, b in zip(keep_paper, keep_pixels, strict=True))
    assert np.array_equal(sel.keep, np.concatenate(keep_paper))
    kept = int(sel.keep.sum())

    rows = [("paper loop (PIL + imagehash.dhash + greedy)", t_paper),
            (f"ctssl from pixels, dhash64_hu + greedy ({threads} threads)", t_pixels),
            ("ctssl from pixels, dhash64_hu + greedy (1 thread)", t_pixels_1),
            ("ctssl reduce hash --scope volume (stored dhash column)", t_column)]

    t_idd = _imagededup(hu)
    if t_idd is not None:
        rows.append(("imagededup DHash encode_image + find_duplicates per volume", t_idd))

    print(f"\n{n} slices {SIZE}x{SIZE}, Hamming <= {T}: kept {kept} ({kept / n:.3f}), selections identical")
    print(f"{'method':62s} {'seconds':>9s} {'slices/s':>10s} {'x paper loop':>13s}")
    for name, t in rows:
        print(f"{name:62s} {t:9.3f} {n / t:10.0f} {t_paper / t:13.1f}")
    if t_idd is not None:
        print(f"ctssl from pixels vs imagededup: {t_idd / t_pixels:.1f}x; stored column vs imagededup: {t_idd / t_column:.0f}x")
    print(f"machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def _imagededup(hu: np.ndarray) -> float | None:
    try:
        from imagededup.methods import DHash
    except ImportError:
        print("imagededup is not installed (pip install --no-deps imagededup PyWavelets): skipped as a peer")
        return None
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("imagededup"):
            logging.getLogger(name).setLevel(logging.WARNING)
    hasher = DHash(verbose=False)
    t = time.perf_counter()
    for v, vol in enumerate(hu):
        enc = {f"{v}-{i}": hasher.encode_image(image_array=minmax_uint8(s)[0]) for i, s in enumerate(vol)}
        hasher.find_duplicates(encoding_map=enc, max_distance_threshold=T, num_dist_workers=1)
    return time.perf_counter() - t


def planted_codes(n: int, rng: np.random.Generator) -> np.ndarray:
    """n codes: a fifth are cluster centres, the rest copies of a centre with 0..8 bits flipped."""
    n_centres = n // 5
    centres = rng.integers(0, 2**63, n_centres, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n_centres, dtype=np.uint64)
    members = centres[rng.integers(0, n_centres, n - n_centres)]
    flips = rng.integers(0, 9, members.size)
    for k in range(8):
        bit = rng.integers(0, 64, members.size).astype(np.uint64)
        members ^= np.where(flips > k, np.uint64(1) << bit, np.uint64(0))
    codes = np.concatenate([centres, members])
    return codes[rng.permutation(n)]


def test_bench_hash_global_scope_million_codes():
    rng = np.random.default_rng(0)
    n = 1_000_000
    codes = planted_codes(n, rng)
    tracemalloc.start()
    t = time.perf_counter()
    keep, cause = global_reference_greedy(codes, T)
    elapsed = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # brute force on a sample: the slice's fate from all earlier kept codes
    sample = rng.choice(n, 300, replace=False)
    kept_idx = np.flatnonzero(keep)
    agree, near_dups, found = 0, 0, 0
    t_bf = time.perf_counter()
    for i in sample:
        earlier = kept_idx[kept_idx < i]
        hits = earlier[popcount64(codes[earlier] ^ codes[i]) <= T]
        expected_cause = int(hits[0]) if hits.size else -1
        agree += expected_cause == int(cause[i]) and (hits.size == 0) == bool(keep[i])
        if hits.size:
            near_dups += 1
            found += not keep[i]
    t_bf = (time.perf_counter() - t_bf) / sample.size * n
    assert agree == sample.size
    recall = found / max(near_dups, 1)
    assert recall == 1.0
    assert np.all(hamming(codes[~keep], codes[cause[~keep]]) <= T)
    print(f"\nglobal scope, {n} codes, Hamming <= {T}: {elapsed:.1f} s ({n / elapsed:.0f} codes/s), kept "
          f"{keep.sum()} ({keep.mean():.3f}); peak traced memory {peak / 2**20:.0f} MiB; "
          f"sample of {sample.size} rows vs brute force: {agree}/{sample.size} identical decisions, "
          f"recall {recall:.3f} on {near_dups} near-duplicates; brute force would take ~{t_bf:.0f} s "
          f"for the same check of every row ({t_bf / elapsed:.0f}x)")

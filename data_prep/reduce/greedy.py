"""The two greedy rules of "Less is More", on precomputed features.

* :func:`reference_greedy` — the paper's hash procedure within one volume: the first remaining slice
  becomes a reference and is kept, every remaining slice within the threshold of it is dropped,
  repeat. Equivalently: a slice is kept iff no *earlier kept* slice lies within the threshold, and a
  dropped slice's cause is the earliest such kept slice (the reference that removed it).
* :func:`last_kept_greedy` — SSIM / mutual information / embeddings: walk the series in z order and
  drop a slice when its similarity to the last kept slice is above the threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from data_prep.dhash import popcount64


def reference_greedy(codes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask and cause (local index of the removing reference, -1 if kept) for one volume.

    Vectorised per reference: one XOR + popcount of the reference against all still-remaining
    slices, so the Python loop runs once per *kept* slice.
    """
    k = len(codes)
    keep = np.zeros(k, bool)
    cause = np.full(k, -1, np.int64)
    alive = np.arange(k)
    codes = np.asarray(codes, dtype=np.uint64)
    while alive.size:
        ref = alive[0]
        keep[ref] = True
        rest = alive[1:]
        close = popcount64(codes[rest] ^ codes[ref]) <= max_distance
        cause[rest[close]] = ref
        alive = rest[~close]
    return keep, cause


def last_kept_greedy(n: int, similarity: Callable[[int, int], float], threshold: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask and cause for one series; ``similarity(i, j)`` for i > j (local indices)."""
    keep = np.zeros(n, bool)
    cause = np.full(n, -1, np.int64)
    if n == 0:
        return keep, cause
    keep[0] = True
    last = 0
    for i in range(1, n):
        if similarity(i, last) > threshold:
            cause[i] = last
        else:
            keep[i] = True
            last = i
    return keep, cause


def every_nth(n_rows: int, stride: float) -> np.ndarray:
    """Keep mask for one series: the slices where ``floor(i / stride)`` steps, i.e. i = 0, n, 2n, ...

    An integer stride is the plain every-n-th rule; a fractional stride (>= 1) spreads the kept
    slices evenly at ~1/stride of the series, which lets ``--target-fraction`` hit any fraction.
    """
    i = np.arange(n_rows)
    bucket = np.floor(i / stride + 1e-9).astype(np.int64)
    keep = np.ones(n_rows, bool)
    keep[1:] = bucket[1:] != bucket[:-1]
    return keep

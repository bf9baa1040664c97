"""The compiled fast path of :mod:`data_prep.dhash` (numba), imported only when first used.

Module-level functions so that numba's on-disk cache (``cache=True``) is reused across processes.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def scale_lut(d):  # pragma: no cover - compiled; exact rounding, so no fast-math here
    lut = np.empty(d + 1, np.float64)
    for v in range(d + 1):
        lut[v] = np.floor(np.float64(v) * 255.0 / np.float64(d) + 0.5)
    return lut


# Reassociating the sums is exact: every product and partial sum is an integer below 2**53.
# One thread on purpose: prep runs one process per CPU, where a thread pool per process only
# oversubscribes the cores; on a busy 2-core machine a parallel version made prep 1.5-2.5x slower
# and erratic (its threads wait for each other), while one thread hashes a 256 px slice in ~0.09 ms.
@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def kernel(img, scale, hx0, hlen, htaps, vy0, vlen, vtaps, first, last, out):  # pragma: no cover
    n, h, w = img.shape
    rows = last - first
    for i in range(n):
        sl = img[i]
        lo = np.int64(0)
        d = np.int64(0)
        if scale:
            lo = np.int64(sl[0, 0])
            hi = lo
            for r in range(h):
                for c in range(w):
                    v = np.int64(sl[r, c])
                    lo = min(lo, v)
                    hi = max(hi, v)
            d = hi - lo
            if d == 0:
                out[i] = 0
                continue
        use_lut = scale and d <= 1 << 20
        lut = scale_lut(d) if use_lut else np.empty(1, np.float64)
        row = np.empty(w, np.float64)
        tmp = np.empty((rows, 9), np.float64)
        for r in range(rows):
            src = sl[first + r]
            if use_lut:
                for c in range(w):
                    row[c] = lut[np.int64(src[c]) - lo]
            elif scale:
                for c in range(w):
                    row[c] = np.floor((np.float64(src[c]) - np.float64(lo)) * 255.0 / np.float64(d) + 0.5)
            else:
                for c in range(w):
                    row[c] = np.float64(src[c])
            for xx in range(9):
                # a slice and a plain range: numba then emits no negative-index fix-up, and the
                # loop vectorises (4x faster than indexing row[x0 + j])
                seg = row[hx0[xx]:hx0[xx] + hlen[xx]]
                taps = htaps[xx]
                acc = 0.0
                for j in range(seg.shape[0]):
                    acc += seg[j] * taps[j]
                q = (np.int64(acc) + (1 << 21)) >> 22
                tmp[r, xx] = 0.0 if q < 0 else (255.0 if q > 255 else np.float64(q))
        code = np.uint64(0)
        for yy in range(8):
            prev = np.int64(0)
            y0 = vy0[yy] - first
            for xx in range(9):
                acc = 0.0
                for j in range(vlen[yy]):
                    acc += tmp[y0 + j, xx] * vtaps[yy, j]
                q = (np.int64(acc) + (1 << 21)) >> 22
                px = 0 if q < 0 else (255 if q > 255 else q)
                if xx > 0:
                    code = (code << np.uint64(1)) | np.uint64(1 if px > prev else 0)
                prev = px
        out[i] = code

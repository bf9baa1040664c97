"""Compiled fast path of :mod:`data_prep.hu` (numba): stored values -> HU -> area-downsampled int16.

Why: on uncompressed CT the numpy + Pillow path makes seven passes over a 512x512 slice (cast,
multiply-add, round, padding mask, clip, cast to float for Pillow, box filter, round, cast back) and
costs more than reading the file. For the common case - an integer reduction factor, e.g. 512 -> 256 -
one pass computes each pixel's HU exactly as :func:`data_prep.hu.to_hu` does and averages the k x k
block exactly (integer sum, one rounding), which is what Pillow's BOX filter computes for an integer
factor, without its float32 accumulation.

Module-level ``cache=True`` functions, so a prep worker loads the machine code instead of compiling.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _halve_int(stored, intercept_i, lo, hi, out):  # pragma: no cover - compiled; tested via hu_resized
    """The common case (512 -> 256, slope 1, integer intercept, no padding value) in integers only:
    each output pixel sums its 2 x 2 block of clipped HU and rounds the quarter half to even, which
    is what ``rint(sum / 4.0)`` gives, without a float division per pixel (2x faster)."""
    oh, ow = out.shape
    lo32, hi32, icpt = np.int32(lo), np.int32(hi), np.int32(intercept_i)
    for i in range(oh):
        r0 = stored[2 * i]
        r1 = stored[2 * i + 1]
        o = out[i]
        for j in range(ow):
            s = (min(max(np.int32(r0[2 * j]) + icpt, lo32), hi32) + min(max(np.int32(r0[2 * j + 1]) + icpt, lo32), hi32)
                 + min(max(np.int32(r1[2 * j]) + icpt, lo32), hi32)
                 + min(max(np.int32(r1[2 * j + 1]) + icpt, lo32), hi32))
            q = s >> 2  # floor(s / 4)
            rem = s & 3
            q += np.int32(rem == 3) | (np.int32(rem == 2) & (q & 1))
            o[j] = q


@numba.njit(cache=True, nogil=True)
def hu_box_downsample(stored, k, slope, intercept, int_path, intercept_i, pad, has_pad, lo, hi,  # pragma: no cover
                      out):
    """``out[i, j] = rint(mean(hu[k*i:k*i+k, k*j:k*j+k]))`` with ``hu`` as in ``to_hu``.

    Row by row: the HU of one input row goes to a buffer in a branch-free loop (which LLVM
    vectorises), then is added into the output row's k-wide block sums.
    """
    if k == 2 and int_path and not has_pad:
        _halve_int(stored, intercept_i, lo, hi, out)
        return
    oh, ow = out.shape
    w = stored.shape[1]
    kk = np.float64(k * k)
    acc = np.zeros(ow, np.int64)
    buf = np.empty(w, np.int32)
    lo32, hi32, icpt = np.int32(lo), np.int32(hi), np.int32(intercept_i)
    for i in range(oh):
        acc[:] = 0
        for r in range(k * i, k * i + k):
            row = stored[r]
            if int_path:
                for c in range(w):
                    buf[c] = min(max(np.int32(row[c]) + icpt, lo32), hi32)
            else:
                for c in range(w):
                    buf[c] = min(max(np.int32(np.rint(np.float32(row[c]) * slope + intercept)), lo32), hi32)
            if has_pad:
                for c in range(w):
                    if np.float64(row[c]) == pad:
                        buf[c] = lo32
            if k == 1:
                for j in range(ow):
                    acc[j] += buf[j]
            elif k == 2:
                for j in range(ow):
                    acc[j] += buf[2 * j] + buf[2 * j + 1]
            else:
                for j in range(ow):
                    s = np.int64(0)
                    for c in range(k * j, k * j + k):
                        s += buf[c]
                    acc[j] += s
        for j in range(ow):
            out[i, j] = np.int16(np.rint(np.float64(acc[j]) / kk))


@numba.njit(cache=True, nogil=True)
def area_downsample(src, ri, rw, ci, cw, out):  # pragma: no cover - compiled; tested via resize_square
    """``out = Wr @ src @ Wc.T`` with the banded area-average weights of :func:`data_prep.hu._area_taps`
    (``ri``/``rw`` for rows, ``ci``/``cw`` for columns), in float64; ``src`` is any native 2-D array.

    Row by row: an output row is the weighted sum of the few input rows it covers (buffered in
    float64), then each output pixel the weighted sum of the few buffered columns it covers.
    """
    nh, nw = out.shape
    w = src.shape[1]
    buf = np.empty(w, np.float64)
    for i in range(nh):
        buf[:] = 0.0
        for t in range(ri.shape[1]):
            wt = rw[i, t]
            if wt == 0.0:
                continue
            row = src[ri[i, t]]
            for c in range(w):
                buf[c] += wt * np.float64(row[c])
        for j in range(nw):
            s = 0.0
            for t in range(ci.shape[1]):
                s += cw[j, t] * buf[ci[j, t]]
            out[i, j] = s

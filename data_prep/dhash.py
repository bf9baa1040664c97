"""Difference hash (dhash) of CT slices, bit-identical to ``imagehash.dhash`` but batched.

Why this module exists: "Less is More" (Wolf et al., arXiv 2410.14524) removes near-duplicate slices
by the Hamming distance of ``imagehash.dhash`` codes of per-slice min-max scaled slices. To compare
our selections with the paper's tooling the 64 bits must be *identical*, yet one PIL call per slice
is far too slow for hundreds of thousands of slices. ``imagehash.dhash`` resizes with Pillow's
LANCZOS filter to 9x8 and compares neighbouring columns, so we reproduce Pillow's 8-bit resampler
(``src/libImaging/Resample.c``) exactly, as matrix products over a whole batch:

* per axis, Pillow computes float64 Lanczos-3 weights whose support widens with the reduction
  factor, normalises them per output pixel and converts them to fixed point with 22 fraction bits
  (``PRECISION_BITS = 32 - 8 - 2``), rounding half away from zero;
* it resamples horizontally first (only the rows the vertical pass needs), accumulating
  ``2**21 + sum(pixel * weight)`` in integers and storing ``clamp(acc >> 22, 0, 255)`` as uint8;
  then it resamples that 8-bit intermediate vertically the same way. Pillow 13 swaps the order
  when the height shrinks much more than the width (see :func:`vertical_pass_first`).

Every product is an integer below 2**31 and a row sum stays far below 2**53, so a float64 matrix
product (BLAS) gives the exact integer accumulator; the weights are computed with ``math.sin`` (the
C library's ``sin``, as Pillow uses) in Pillow's order of operations, so they match to the bit.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from data_prep.compiled import optional_kernel

HASH_SIZE = 8
PRECISION_BITS = 22  # Pillow: 32 - 8 - 2
_HALF = float(1 << (PRECISION_BITS - 1))
_INV_ONE = 1.0 / float(1 << PRECISION_BITS)
_LANCZOS_SUPPORT = 3.0

# Bytes of float64 scratch per chunk: bounds memory for arbitrarily large batches.
_CHUNK_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------- min-max scaling


def minmax_uint8(hu: np.ndarray) -> np.ndarray:
    """Scale each slice to 0..255 by its own minimum and maximum (the paper's preprocessing).

    Exact definition, per slice with ``lo = min``, ``hi = max``::

        u8 = floor(255 * (x - lo) / (hi - lo) + 1/2)      # round half up
        u8 = 0 everywhere when hi == lo                    # constant slice

    For integer input this is evaluated exactly (the float64 quotient ``(x - lo) * 255 / (hi - lo)``
    is correctly rounded and a true value never lies closer than ``1 / (2 (hi - lo))`` to a rounding
    boundary other than the boundary itself, which float64 represents exactly). Float input is
    evaluated with the same float64 expression. NaN/inf are rejected, because the paper's scaling
    is undefined for them.
    """
    arr = _as_batch(hu, "hu")
    out = np.empty(arr.shape, dtype=np.uint8)
    for start, stop in _chunks(arr):
        out[start:stop] = _minmax_scaled_f64(arr[start:stop]).astype(np.uint8)
    return out


def _minmax_scaled_f64(arr: np.ndarray) -> np.ndarray:
    """The min-max scaled values 0..255 of ``arr`` (n, H, W), as float64 integers."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("minmax_uint8: input contains NaN or infinite values")
    lo = arr.min(axis=(1, 2)).astype(np.float64)[:, None, None]
    hi = arr.max(axis=(1, 2)).astype(np.float64)[:, None, None]
    span = hi - lo
    constant = span == 0
    span[constant] = 1.0
    f = arr.astype(np.float64)
    f -= lo
    f *= 255.0
    f /= span
    f += 0.5
    np.floor(f, out=f)
    np.clip(f, 0.0, 255.0, out=f)
    if constant.any():
        f[constant[:, 0, 0]] = 0.0
    return f


# --------------------------------------------------------------------------- Pillow's resampler


def _lanczos_filter(x: float) -> float:
    # Pillow: truncated sinc, sinc(x) * sinc(x / 3) on [-3, 3)
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


@functools.lru_cache(maxsize=64)
def _pillow_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for LANCZOS over the full axis.

    Returns per output pixel the first input index ``xmin``, the tap count ``xlen`` and the int32
    fixed-point taps (out_size, ksize), zero-padded.
    """
    scale = float(in_size) / out_size  # box is (0, in_size): float in1 - in0 is exact
    filterscale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    one = float(1 << PRECISION_BITS)
    xmins = np.zeros(out_size, np.int64)
    xlens = np.zeros(out_size, np.int64)
    taps = np.zeros((out_size, ksize), np.int32)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C (int) cast truncates; clamped at 0
        xmax = min(int(center + support + 0.5), in_size) - xmin
        weights = [_lanczos_filter((x + xmin - center + 0.5) * inv_filterscale) for x in range(xmax)]
        total = 0.0
        for w in weights:
            total += w
        if total != 0.0:
            weights = [w / total for w in weights]
        for x, w in enumerate(weights):
            # (int)(+-0.5 + w * 2**22): C truncation toward zero = round half away from zero
            taps[xx, x] = math.trunc(-0.5 + w * one) if w < 0 else math.trunc(0.5 + w * one)
        xmins[xx], xlens[xx] = xmin, xmax
    for a in (xmins, xlens, taps):
        a.setflags(write=False)
    return xmins, xlens, taps


@functools.lru_cache(maxsize=64)
def _fixed_point_weights(in_size: int, out_size: int) -> tuple[np.ndarray, int, int]:
    """Pillow's fixed-point LANCZOS weights as a dense (used_inputs, out_size) float64 matrix.

    Returns the matrix and the [first, last) input range it covers (Pillow's ``ybox_first`` /
    ``ybox_last``: inputs outside it get zero weight everywhere, so they are never read).
    """
    xmins, xlens, taps = _pillow_coeffs(in_size, out_size)
    dense = np.zeros((in_size, out_size), dtype=np.float64)
    for xx in range(out_size):
        dense[xmins[xx]:xmins[xx] + xlens[xx], xx] = taps[xx, :xlens[xx]]
    first, last = int(xmins.min()), int((xmins + xlens).max())
    dense = np.ascontiguousarray(dense[first:last])
    dense.setflags(write=False)
    return dense, first, last


def _requantise(acc: np.ndarray) -> np.ndarray:
    """Pillow's clip8: ``clamp((2**21 + acc) >> 22, 0, 255)`` on exact float64 integers, in place."""
    acc += _HALF
    acc *= _INV_ONE  # power of two: exact
    np.floor(acc, out=acc)
    np.clip(acc, 0.0, 255.0, out=acc)
    return acc


def _resample_rows(img: np.ndarray, out_w: int) -> np.ndarray:
    """Horizontal pass on (n, h, w) float64 integer pixels -> (n, h, out_w)."""
    n, h, w = img.shape
    dense, first, last = _fixed_point_weights(w, out_w)
    src = img[:, :, first:last]
    acc = np.matmul(src.reshape(n * h, last - first) if src.flags.c_contiguous else src, dense)
    return _requantise(acc.reshape(n, h, out_w))


def _resample_cols(img: np.ndarray, out_h: int) -> np.ndarray:
    """Vertical pass on (n, h, w) float64 integer pixels -> (n, out_h, w)."""
    _, h, _ = img.shape
    dense, first, last = _fixed_point_weights(h, out_h)
    acc = np.matmul(dense.T, img[:, first:last, :])
    return _requantise(acc)


def vertical_pass_first(in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    """Pillow 13's choice of pass order (``ImagingResampleInner``, python-pillow/Pillow#9549).

    Pillow >= 13 runs the vertical pass first when the height loses more than twice as many pixels
    as the width, ``(in_h - out_h) > 2 * (in_w - out_w)``, because the horizontal pass is then run
    on fewer rows. The rounding between passes makes the order visible in the result (up to +-10
    grey levels on tiny images), so it must be reproduced. The rule was pinned against the
    installed Pillow on ~600 random shapes (up- and down-scaling); ``tests/data_prep/test_dhash.py``
    re-checks it against whatever Pillow is installed.
    """
    return (in_h - out_h) > 2 * (in_w - out_w)


def resize_lanczos_u8(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """``Image.fromarray(img[i]).resize((out_w, out_h), LANCZOS)`` for a whole (n, H, W) batch.

    ``img`` holds 8-bit values (uint8, or float64 integers 0..255); returns float64 integers.
    Follows ``Image.resize`` and ``ImagingResampleInner``: same size -> copy; a pass runs only on
    an axis whose size changes; the pass order is :func:`vertical_pass_first`.
    """
    _, h, w = img.shape
    f = img if img.dtype == np.float64 else img.astype(np.float64)
    if (w, h) == (out_w, out_h):
        return f.copy()
    if out_w == w:
        return _resample_cols(f, out_h)
    if out_h == h:
        return _resample_rows(f, out_w)
    if vertical_pass_first(w, h, out_w, out_h):
        return _resample_rows(_resample_cols(f, out_h), out_w)
    # horizontal first, on only the rows the vertical pass reads (Pillow's ybox_first/ybox_last);
    # the vertical weights are indexed from `first`, so they line up with the produced rows
    dense, first, last = _fixed_point_weights(h, out_h)
    tmp = _resample_rows(np.ascontiguousarray(f[:, first:last, :]), out_w)
    return _requantise(np.matmul(dense.T, tmp))


# --------------------------------------------------------------------------- the hash


_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_SIZE * HASH_SIZE - 1, -1, -1, dtype=np.uint64)).astype(
    np.uint64
)


def _bits_to_uint64(bits: np.ndarray) -> np.ndarray:
    """(n, 8, 8) booleans -> uint64, row-major with the first bit most significant (imagehash's hex)."""
    flat = bits.reshape(bits.shape[0], -1).astype(np.uint64)
    return (flat * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def _dhash_of_f64(f: np.ndarray) -> np.ndarray:
    small = resize_lanczos_u8(f, HASH_SIZE + 1, HASH_SIZE)
    return _bits_to_uint64(small[:, :, 1:] > small[:, :, :-1])


def dhash64(u8: np.ndarray, compiled: bool = True) -> np.ndarray:
    """64-bit dhash per slice of an (N, H, W) uint8 batch.

    ``dhash64(u8)[i] == int(str(imagehash.dhash(PIL.Image.fromarray(u8[i]), hash_size=8)), 16)``.
    ``compiled=False`` forces the numpy path (the compiled one must give the same bits).
    """
    arr = _as_batch(u8, "u8")
    if arr.dtype != np.uint8:
        raise ValueError(f"dhash64 expects uint8 slices, got dtype {arr.dtype}; use dhash64_hu for HU")
    fast = _dhash_compiled(arr, scale=False) if compiled and arr.shape[0] else None
    if fast is not None:
        return fast
    out = np.empty(arr.shape[0], dtype=np.uint64)
    for start, stop in _chunks(arr):
        out[start:stop] = _dhash_of_f64(arr[start:stop].astype(np.float64))
    return out


def dhash64_hu(hu: np.ndarray, compiled: bool = True) -> np.ndarray:
    """``dhash64(minmax_uint8(hu))`` without materialising the uint8 copy (the prep/reduce path)."""
    arr = _as_batch(hu, "hu")
    fast = _dhash_compiled(arr, scale=True) if compiled and arr.shape[0] else None
    if fast is not None:
        return fast
    out = np.empty(arr.shape[0], dtype=np.uint64)
    for start, stop in _chunks(arr):
        out[start:stop] = _dhash_of_f64(_minmax_scaled_f64(arr[start:stop]))
    return out


# --------------------------------------------------------------------------- compiled fast path
#
# The numpy path above is exact but makes ~10 passes over float64 copies of every pixel. The kernel
# below fuses min-max scaling (a per-slice lookup table of the exact rounding), Pillow's horizontal
# pass (int32 accumulators, as Pillow's C code), the vertical pass and the bit packing, touching each
# pixel once, one slice after another. It covers the common case (both axes shrink or change with the
# horizontal pass first, integer pixels); everything else takes the numpy path. Tests check that
# both paths agree with imagehash.

def _numba_kernel():
    """The compiled kernel (numba is optional: without it the numpy path is used)."""
    return optional_kernel("data_prep.dhash_kernel", "kernel")


def _kernel_applies(arr: np.ndarray) -> bool:
    _, h, w = arr.shape
    return (arr.dtype.kind in "iu" and arr.dtype.itemsize <= 4 and w != HASH_SIZE + 1 and h != HASH_SIZE
            and not vertical_pass_first(w, h, HASH_SIZE + 1, HASH_SIZE))


def _dhash_compiled(arr: np.ndarray, scale: bool) -> np.ndarray | None:
    """The fused kernel's codes, or None when it does not apply (the caller uses numpy)."""
    if not _kernel_applies(arr):
        return None
    kernel = _numba_kernel()
    if kernel is None:
        return None
    _, h, w = arr.shape
    hx0, hlen, htaps = _pillow_coeffs(w, HASH_SIZE + 1)
    vy0, vlen, vtaps = _pillow_coeffs(h, HASH_SIZE)
    first, last = int(vy0.min()), int((vy0 + vlen).max())
    out = np.empty(arr.shape[0], np.uint64)
    kernel(np.ascontiguousarray(arr), scale, hx0, hlen, htaps.astype(np.float64), vy0, vlen,
           vtaps.astype(np.float64), first, last, out)
    return out


# --------------------------------------------------------------------------- Hamming distance


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64, as uint8 (any shape)."""
    arr = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: a hardware popcount ufunc
        return np.bitwise_count(arr).astype(np.uint8, copy=False)
    as_bytes = arr.reshape(-1).view(np.uint8).reshape(-1, 8)
    return _POPCOUNT8[as_bytes].sum(axis=1, dtype=np.uint8).reshape(arr.shape)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Hamming distance between uint64 codes, broadcasting like ``a ^ b``."""
    return popcount64(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


# --------------------------------------------------------------------------- helpers


def _as_batch(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected an (N, H, W) batch of slices, got shape {arr.shape}")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"{name}: slices must be at least 1x1, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf" or arr.dtype.kind == "b":
        raise ValueError(f"{name}: expected integer or float pixels, got dtype {arr.dtype}")
    return arr


def _chunks(arr: np.ndarray):
    n, h, w = arr.shape
    step = max(1, _CHUNK_BYTES // max(1, h * w * 8))
    for start in range(0, n, step):
        yield start, min(n, start + step)

"""Stored pixel values -> Hounsfield units, and resizing to the fixed prep resolution.

Slices are kept as int16 HU (lossless for CT's -1024..3071 range) so that any window can be chosen
at training time; resizing happens once here, area-averaged so that downscaling does not alias.

Every entry point first brings the pixels to a native array (:func:`native_pixels`): sources hand over
what their files store - big-endian DICOM, NIfTI in either byte order, booleans, float16 - and the
compiled kernels and the arithmetic below only take native integers and floats.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from data_prep.compiled import optional_kernel

HU_MIN, HU_MAX = -1024, 3071  # the 12-bit CT range; values outside are clipped (metal, padding)


def native_pixels(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a native-byte-order integer or float array with the same values.

    Byte order is swapped (``>i2`` -> ``int16``), booleans become uint8 0/1 and half floats float32;
    arrays that are already native are returned as they are (no copy). A structured (RGB), complex
    or object array is no scalar image: ``TypeError`` naming the dtype (sources reject such files
    before they get here).
    """
    dt = arr.dtype
    if dt.fields is not None or dt.kind not in "biuf":
        raise TypeError(f"pixel data of dtype {dt} is not a scalar image (expected integers, floats or booleans)")
    if dt.kind == "b":
        return arr.view(np.uint8)
    if dt.kind == "f" and dt.itemsize < 4:
        return arr.astype(np.float32)
    if not dt.isnative:
        return arr.astype(dt.newbyteorder("="))
    return arr


def to_hu(stored: np.ndarray, slope: float, intercept: float, *, padding_value: float | None = None,
          air_hu: int = HU_MIN) -> np.ndarray:
    """int16 HU from stored values: ``HU = stored * slope + intercept``.

    Pixels equal to the padding value (outside the scanner's field of view) become air, not a
    fake tissue value; the result is clipped to the int16-safe CT range.
    """
    arr = stored = native_pixels(stored)
    if slope == 1.0 and float(intercept).is_integer() and arr.dtype.kind in "iu":
        if arr.dtype.itemsize <= 2:
            hu = arr.astype(np.int32, copy=False) + int(intercept)
        else:  # 32/64-bit stored values: int64 so that large values clip instead of wrapping around
            if arr.dtype == np.uint64:
                arr = np.minimum(arr, np.uint64(2**62))
            hu = arr.astype(np.int64, copy=False) + int(intercept)
    else:
        hu = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        hu = np.rint(hu)
    if padding_value is not None:
        hu = np.where(stored == padding_value, air_hu, hu)
    return np.clip(hu, HU_MIN, HU_MAX).astype(np.int16)


def resize_square(img: np.ndarray, size: int | None,
                  pad_value: float = HU_MIN) -> tuple[np.ndarray, tuple[float, float]]:
    """Fit ``img`` into ``size x size`` keeping the aspect ratio; pad the short side centred.

    Downscaling is a true area average at any factor: each output pixel is the mean of the input area
    it covers, input pixels cut by its edges weighted by the fraction that lies inside (for an integer
    factor that is the plain k x k block mean). Integer images are rounded half to even. Upscaling
    (an image smaller than ``size``) is bilinear, since an area average would only replicate pixels.

    Returns the new image (same dtype) and the (row, col) factors for the pixel spacing
    (new spacing = old spacing * factor). ``size=None`` keeps the native size.
    """
    img = native_pixels(img)
    h, w = img.shape
    if size is None or (h == size and w == size):
        return img, (1.0, 1.0)
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        if scale < 1:
            out = area_resize(img, nh, nw)
        else:
            out = np.asarray(Image.fromarray(img.astype(np.float32, copy=False), mode="F").resize(
                (nw, nh), Image.Resampling.BILINEAR))
        if img.dtype.kind in "iu":
            out = np.rint(out)
        out = out.astype(img.dtype)
    else:
        out = img
    return _pad_square(out, size, pad_value), (h / nh, w / nw)


@functools.cache
def _area_taps(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (m, taps): output pixel i of an ``n -> m`` (m <= n) area average is
    ``sum_t weights[i, t] * input[indices[i, t]]``.

    In units of 1/m input pixel, output pixel i covers [i*n, (i+1)*n) and input pixel j covers
    [j*m, (j+1)*m): the overlaps are integers, so the weights (overlap / n) are exact fractions and
    sum to 1 for every output pixel.
    """
    rows: list[list[tuple[int, int]]] = []
    for i in range(m):
        lo, hi = i * n, (i + 1) * n
        rows.append([(j, min(hi, (j + 1) * m) - max(lo, j * m)) for j in range(lo // m, (hi - 1) // m + 1)])
    taps = max(len(r) for r in rows)
    idx = np.zeros((m, taps), np.intp)
    wts = np.zeros((m, taps), np.float64)
    for i, r in enumerate(rows):
        for t, (j, overlap) in enumerate(r):
            idx[i, t], wts[i, t] = j, overlap / n
    idx.setflags(write=False)
    wts.setflags(write=False)
    return idx, wts


def area_resize(img: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """The float64 area average of a 2-D ``img`` at ``nh x nw`` (each no larger than the input's).

    Separable: rows first, then columns, each output line a weighted sum of the few input lines it
    covers (at most ceil(n/m) + 1); compiled (numba) when available, else the same sums in numpy.
    """
    h, w = img.shape
    ri, rw = _area_taps(h, nh)
    ci, cw = _area_taps(w, nw)
    kernel = optional_kernel("data_prep.hu_kernel", "area_downsample")
    if kernel is not None:
        out = np.empty((nh, nw), np.float64)
        kernel(np.ascontiguousarray(img), ri, rw, ci, cw, out)
        return out
    src = img.astype(np.float64, copy=False)
    tmp = np.zeros((nh, w), np.float64)
    for t in range(ri.shape[1]):
        tmp += rw[:, t, None] * src[ri[:, t]]
    out = np.zeros((nh, nw), np.float64)
    for t in range(ci.shape[1]):
        out += tmp[:, ci[:, t]] * cw[None, :, t]
    return out


def _pad_square(img: np.ndarray, size: int, pad_value: float) -> np.ndarray:
    """``img`` centred on a ``size x size`` canvas of ``pad_value`` (unchanged when already square)."""
    nh, nw = img.shape
    if (nh, nw) == (size, size):
        return img
    canvas = np.full((size, size), pad_value, dtype=img.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = img
    return canvas


def hu_resized(stored: np.ndarray, slope: float, intercept: float, *, padding_value: float | None,
               size: int | None, pad_value: float = HU_MIN) -> tuple[np.ndarray, tuple[float, float]]:
    """``resize_square(to_hu(stored, ...), size)`` in one compiled pass when the reduction factor is an
    integer (512 -> 256, 256 -> 128, native size); any other geometry takes the numpy area average.

    The results are equal: both compute each pixel's HU the same way and at an integer factor the
    area average is the exact block mean (tests compare the two paths).
    """
    stored = native_pixels(stored)
    h, w = stored.shape
    k = _integer_factor(h, w, size)
    kernel = _hu_kernel() if k and stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2 else None
    if kernel is None:
        hu = to_hu(stored, slope, intercept, padding_value=padding_value)
        return resize_square(hu, size, pad_value=pad_value)
    int_path = slope == 1.0 and float(intercept).is_integer()
    out = np.empty((h // k, w // k), np.int16)
    kernel(stored, k, np.float32(slope), np.float32(intercept), int_path, int(intercept) if int_path else 0,
           float(padding_value) if padding_value is not None else 0.0, padding_value is not None, HU_MIN, HU_MAX,
           out)
    return (out if size is None else _pad_square(out, size, pad_value)), (float(k), float(k))


def _integer_factor(h: int, w: int, size: int | None) -> int | None:
    if size is None:
        return 1
    longest = max(h, w)
    if longest < size or longest % size:
        return None
    k = longest // size
    return k if h % k == 0 and w % k == 0 else None


def _hu_kernel():
    """The numba kernel, or None when numba is unavailable (the numpy path is then used)."""
    return optional_kernel("data_prep.hu_kernel", "hu_box_downsample")

"""Stored pixel values -> Hounsfield units, and resizing to the fixed prep resolution.

Slices are kept as int16 HU (lossless for CT's -1024..3071 range) so that any window can be chosen
at training time; resizing happens once here, area-averaged so that downscaling does not alias.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from data_prep.compiled import optional_kernel

HU_MIN, HU_MAX = -1024, 3071  # the 12-bit CT range; values outside are clipped (metal, padding)


def to_hu(stored: np.ndarray, slope: float, intercept: float, *, padding_value: float | None = None,
          air_hu: int = HU_MIN) -> np.ndarray:
    """int16 HU from stored values: ``HU = stored * slope + intercept``.

    Pixels equal to the padding value (outside the scanner's field of view) become air, not a
    fake tissue value; the result is clipped to the int16-safe CT range.
    """
    arr = stored
    if slope == 1.0 and float(intercept).is_integer() and arr.dtype.kind in "iu":
        hu = arr.astype(np.int32, copy=False) + int(intercept)
    else:
        hu = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        hu = np.rint(hu)
    if padding_value is not None:
        hu = np.where(stored == padding_value, air_hu, hu)
    return np.clip(hu, HU_MIN, HU_MAX).astype(np.int16)


def resize_square(img: np.ndarray, size: int | None,
                  pad_value: float = HU_MIN) -> tuple[np.ndarray, tuple[float, float]]:
    """Fit ``img`` into ``size x size`` keeping the aspect ratio; pad the short side centred.

    Returns the new image (same dtype) and the (row, col) factors for the pixel spacing
    (new spacing = old spacing * factor). ``size=None`` keeps the native size.
    """
    h, w = img.shape
    if size is None or (h == size and w == size):
        return img, (1.0, 1.0)
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        # PIL's BOX filter is an exact area average for any factor (antialiased downscaling) and runs
        # in C on float32; upscaling uses bilinear since a box would only replicate pixels.
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        out = np.asarray(Image.fromarray(img.astype(np.float32, copy=False), mode="F").resize((nw, nh), resample))
        if img.dtype.kind in "iu":
            out = np.rint(out)
        out = out.astype(img.dtype)
    else:
        out = img
    return _pad_square(out, size, pad_value), (h / nh, w / nw)


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
    integer (512 -> 256, 256 -> 128, native size); any other geometry takes the numpy + Pillow path.

    The results are equal: both compute each pixel's HU the same way and an integer-factor box filter
    is the exact block mean (tests compare the two paths).
    """
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

"""Stored pixel values -> Hounsfield units, and resizing to the fixed prep resolution.

Slices are kept as int16 HU (lossless for CT's -1024..3071 range) so that any window can be chosen
at training time; resizing happens once here, area-averaged so that downscaling does not alias.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

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
    factors = (h / nh, w / nw)
    if (nh, nw) == (size, size):
        return out, factors
    canvas = np.full((size, size), pad_value, dtype=img.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = out
    return canvas, factors

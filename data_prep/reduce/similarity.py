"""Batched image similarities for the SSIM and mutual-information strategies.

Both work on per-slice min-max scaled 8-bit thumbnails (the paper's preprocessing), reduced by an
integer block mean so that a long series fits in memory; similarities are computed for whole
batches of pairs at once.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from data_prep.dhash import minmax_uint8

SSIM_WINDOW = 7  # skimage's default uniform window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def thumbnails(hu: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W) HU -> (n, size, size) uint8: area means over an even grid of ``size`` x ``size``
    bins (nearest pixel when a side is smaller than ``size``), then per-slice min-max scaling.

    A fixed output shape lets slices of different native sizes be compared.
    """
    hu = np.asarray(hu, dtype=np.float64)
    for axis in (1, 2):
        length = hu.shape[axis]
        starts = (np.arange(size) * length) // size
        sums = np.add.reduceat(hu, starts, axis=axis)
        stops = np.append(starts[1:], length)
        counts = np.maximum(stops - starts, 1)
        # reduceat yields the single element at `start` when a bin is empty (upsampling)
        shape = [1, 1, 1]
        shape[axis] = size
        hu = sums / np.where(stops > starts, counts, 1).reshape(shape)
    return minmax_uint8(hu)


def ssim_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean SSIM of each pair (a[i], b[i]) of uint8 images (Wang et al. 2004, as skimage computes it:
    7x7 uniform window, sample covariances, data range 255, borders of half a window excluded)."""
    x = a.astype(np.float32)
    y = b.astype(np.float32)
    size = (1, SSIM_WINDOW, SSIM_WINDOW)
    np_ = SSIM_WINDOW * SSIM_WINDOW
    cov_norm = np_ / (np_ - 1.0)
    ux, uy = uniform_filter(x, size), uniform_filter(y, size)
    uxx, uyy, uxy = uniform_filter(x * x, size), uniform_filter(y * y, size), uniform_filter(x * y, size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (SSIM_WINDOW - 1) // 2
    if s.shape[1] > 2 * pad and s.shape[2] > 2 * pad:
        s = s[:, pad:-pad, pad:-pad]
    return s.reshape(s.shape[0], -1).mean(axis=1, dtype=np.float64)


def nmi_pairs(a: np.ndarray, b: np.ndarray, bins: int = 32) -> np.ndarray:
    """Normalised mutual information ``2 I(A;B) / (H(A) + H(B))`` in [0, 1] of each pair of uint8
    images, from ``bins``-level joint histograms; 1 for two constant images."""
    p = a.shape[0]
    qa = (a.reshape(p, -1).astype(np.int64) * bins) >> 8
    qb = (b.reshape(p, -1).astype(np.int64) * bins) >> 8
    joint_idx = (np.arange(p)[:, None] * bins + qa) * bins + qb
    joint = np.bincount(joint_idx.ravel(), minlength=p * bins * bins).reshape(p, bins, bins).astype(np.float64)
    joint /= joint.sum(axis=(1, 2), keepdims=True)

    def entropy(prob: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(prob > 0, prob * np.log(prob), 0.0)
        return -terms.sum(axis=axes)

    h_ab = entropy(joint, (1, 2))
    h_a = entropy(joint.sum(axis=2), (1,))
    h_b = entropy(joint.sum(axis=1), (1,))
    denom = h_a + h_b
    with np.errstate(divide="ignore", invalid="ignore"):
        nmi = np.where(denom > 0, 2.0 * (denom - h_ab) / denom, 1.0)
    return np.clip(nmi, 0.0, 1.0)

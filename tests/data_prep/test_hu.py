"""Stored values -> HU -> prep resolution: the compiled one-pass path equals the numpy + Pillow path."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.hu import HU_MAX, HU_MIN, _hu_kernel, hu_resized, resize_square, to_hu

CASES = [  # (dtype, shape, size, slope, intercept, padding)
    ("<i2", (512, 512), 256, 1.0, 0.0, None),
    ("<i2", (512, 512), 256, 1.0, -1.0, None),             # integer 2x2 path: halves of either sign to even
    ("<u2", (512, 512), 256, 1.0, -1024.0, None),
    ("<u2", (512, 512), 128, 1.0, -1024.0, 0.0),           # 4x4 blocks, padding value = 0
    ("<i2", (512, 512), 256, 0.5, -1000.5, -2000.0),       # float path: float32 multiply-add, round
    ("<i2", (384, 384), 128, 2.0, -1024.0, None),          # 3x3 blocks
    ("<i2", (512, 256), 256, 1.0, -1024.0, None),          # non-square: 2x, then padded to square
    ("<u2", (256, 256), None, 1.0, -1024.0, 0.0),          # native size: HU only
    ("<i2", (256, 256), 256, 1.0, -1024.0, None),          # already at size
]


@pytest.mark.parametrize(("dtype", "shape", "size", "slope", "intercept", "pad"), CASES)
def test_compiled_path_equals_numpy_and_pillow(dtype, shape, size, slope, intercept, pad):
    assert _hu_kernel() is not None, "numba is a dependency; the compiled path must be available"
    rng = np.random.default_rng(0)
    lo = 0 if dtype == "<u2" else -3000
    stored = rng.integers(lo, 5000, size=shape).astype(dtype)
    stored[:20, :20] = 0 if pad is None else int(pad)  # a padded corner
    stored[-8:, -8:] = 30000 if dtype == "<u2" else 32000  # metal, clipped to HU_MAX
    got, f_got = hu_resized(stored, slope, intercept, padding_value=pad, size=size)
    ref, f_ref = resize_square(to_hu(stored, slope, intercept, padding_value=pad), size)
    assert got.dtype == ref.dtype == np.int16
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_allclose(f_got, f_ref)
    assert got.min() >= HU_MIN and got.max() <= HU_MAX


def test_non_integer_factor_falls_back_to_pillow():
    stored = np.arange(500 * 500, dtype="<i2").reshape(500, 500) % 3000
    got, f = hu_resized(stored, 1.0, -1024.0, padding_value=None, size=256)
    ref, f_ref = resize_square(to_hu(stored, 1.0, -1024.0), 256)
    np.testing.assert_array_equal(got, ref)
    assert f == f_ref

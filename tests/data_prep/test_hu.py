"""Stored values -> HU -> prep resolution: every pixel dtype, the exact area average at any factor, and the
compiled one-pass path equal to the numpy path."""

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


def test_non_integer_factor_takes_the_numpy_area_average():
    stored = np.arange(500 * 500, dtype="<i2").reshape(500, 500) % 3000
    got, f = hu_resized(stored, 1.0, -1024.0, padding_value=None, size=256)
    ref, f_ref = resize_square(to_hu(stored, 1.0, -1024.0), 256)
    np.testing.assert_array_equal(got, ref)
    assert f == f_ref


# ---------------------------------------------------------------- native pixel arrays, true area average
def _round_half_even(num: np.ndarray, den: int) -> np.ndarray:
    """``rint(num / den)`` exactly, in integers (no float on the way)."""
    q, r = np.divmod(num, den)
    return q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1)))


def _area_reference(hu: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """The exact area average of an integer image, independently of data_prep.hu: upsample each axis by
    lcm(n, m) / n with ``np.repeat`` (every output pixel then covers whole blocks) and block-sum in
    int64; one exact rounding at the end."""
    out = hu.astype(np.int64)
    den = 1
    for axis, m in ((0, nh), (1, nw)):
        n = out.shape[axis]
        big = np.lcm(n, m)
        out = np.repeat(out, big // n, axis=axis)
        shape = list(out.shape)
        shape[axis:axis + 1] = [m, big // m]
        out = out.reshape(shape).sum(axis=axis + 1)
        den *= big // m
    return _round_half_even(out, den)


def _hu_reference(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """HU of the stored values as plain Python numbers (the dtype's values, whatever its byte order)."""
    hu = np.rint(values.astype(np.float64) * slope + intercept)
    return np.clip(hu, HU_MIN, HU_MAX).astype(np.int64)


DTYPES = [">i2", ">u2", "<i2", "<u2", "uint8", "int8", "int32", ">i4", "uint32", "int64", "float32", ">f8",
          "float16", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "size"), [((48, 48), None), ((48, 48), 24), ((48, 48), 32), ((48, 36), 20)])
def test_every_pixel_dtype_gives_the_hu_of_its_values_at_native_integer_and_non_integer_factors(dtype, shape, size):
    rng = np.random.default_rng(len(dtype) + (size or 0))
    dt = np.dtype(dtype)
    if dt.kind == "b":
        values = rng.integers(0, 2, size=shape).astype(bool)
    elif dt.kind == "f":
        values = rng.uniform(-1500, 3500, size=shape).round().astype(dtype)
    else:
        info = np.iinfo(dt)
        values = rng.integers(max(info.min, -3000), min(info.max, 5000), size=shape, endpoint=True).astype(dtype)
        values.flat[:3] = [info.max, info.min, info.max]  # extremes clip; 32/64-bit ones must not wrap around
    slope, intercept = 1.0, (-1024.0 if dt.kind == "u" else 0.0)
    ref_hu = _hu_reference(values, slope, intercept)
    for got, factors in (hu_resized(values, slope, intercept, padding_value=None, size=size),
                         resize_square(to_hu(values, slope, intercept), size)):
        assert got.dtype == np.int16 and got.dtype.isnative
        if size is None:
            np.testing.assert_array_equal(got, ref_hu)
            continue
        nh, nw = round(shape[0] * size / max(shape)), round(shape[1] * size / max(shape))
        ref = _area_reference(ref_hu, nh, nw)
        top, left = (size - nh) // 2, (size - nw) // 2
        inner = got[top:top + nh, left:left + nw].astype(np.int64)
        assert np.abs(inner - ref).max() <= (0 if shape[0] % nh == 0 and shape[1] % nw == 0 else 1)
        np.testing.assert_allclose(factors, (shape[0] / nh, shape[1] / nw))


def test_non_integer_factor_weights_the_pixels_cut_by_an_output_pixel_edge_by_their_fraction():
    img = np.array([[0, 0, 300]] * 3, np.int16)  # 3 -> 2: output pixels cover 1.5 input pixels each
    got, factors = resize_square(img, 2)
    np.testing.assert_array_equal(got, [[0, 200], [0, 200]])  # (0.5 * 0 + 1 * 300) / 1.5, not 300
    assert factors == (1.5, 1.5)


def test_area_average_without_numba_equals_the_compiled_one(monkeypatch):
    import data_prep.hu as hu_mod

    img = np.random.default_rng(3).integers(-1024, 3071, size=(100, 77)).astype(np.int16)
    compiled, _ = resize_square(img, 64)
    monkeypatch.setattr(hu_mod, "optional_kernel", lambda *a: None)
    numpy_only, _ = resize_square(img, 64)
    np.testing.assert_array_equal(compiled, numpy_only)
    nw = round(77 * 64 / 100)
    left = (64 - nw) // 2
    assert np.abs(numpy_only[:, left:left + nw].astype(np.int64) - _area_reference(img, 64, nw)).max() <= 1


@pytest.mark.parametrize("size", [224, 384])
def test_real_head_ct_resize_is_the_exact_area_average(size):
    import glob

    import pydicom

    files = sorted(glob.glob("tests/data/real_ct/totalsegmentator_example_ct/*"))
    assert files, "the real CT example series is part of the repository"
    for f in files[::7]:  # three slices of the JPEG 2000 series
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        got, _ = hu_resized(stored, slope, intercept, padding_value=None, size=size)
        ref = _area_reference(_hu_reference(stored, slope, intercept), *(
            round(n * size / max(stored.shape)) for n in stored.shape))
        assert got.shape == ref.shape
        assert np.abs(got.astype(np.int64) - ref).max() <= 1

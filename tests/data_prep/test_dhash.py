"""The batched dhash must equal imagehash.dhash bit for bit, so selections match the paper's tooling."""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import pydicom
import pytest
from PIL import Image

from data_prep.dhash import (
    _kernel_applies,
    _numba_kernel,
    dhash64,
    dhash64_hu,
    hamming,
    minmax_uint8,
    popcount64,
    resize_lanczos_u8,
)

REAL_CT = Path(__file__).resolve().parents[1] / "data" / "real_ct" / "totalsegmentator_example_ct"  # tests/data/


def imagehash_codes(u8: np.ndarray) -> np.ndarray:
    """The paper's tooling: one PIL image and one imagehash call per slice."""
    return np.array(
        [int(str(imagehash.dhash(Image.fromarray(s), hash_size=8)), 16) for s in u8], dtype=np.uint64
    )


def real_ct_hu() -> np.ndarray:
    files = sorted(REAL_CT.iterdir())
    assert len(files) >= 10, f"expected the real CT example slices in {REAL_CT}"
    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        slices.append(np.round(ds.pixel_array.astype(np.float64) * slope + intercept).astype(np.int16))
    return np.stack(slices)


def phantom_hu(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Ellipse 'body' with organs and noise, air outside: the kind of slice the pipeline sees."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out = np.full((n, size, size), -1000.0)
    for i in range(n):
        a, b = 0.38 + 0.05 * rng.random(), 0.30 + 0.05 * rng.random()
        body = (xx / a) ** 2 + (yy / b) ** 2 < 1
        out[i][body] = 40
        for _ in range(4):
            cx, cy, r = rng.uniform(-0.2, 0.2), rng.uniform(-0.15, 0.15), rng.uniform(0.03, 0.1)
            out[i][(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.choice([-800, 60, 300, 1200])
        out[i] += rng.normal(0, 15, (size, size))
    return np.round(out).astype(np.int16)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_dhash_equals_imagehash_on_real_ct_slices(compiled):
    hu = real_ct_hu()
    u8 = minmax_uint8(hu)
    expected = imagehash_codes(u8)
    assert np.array_equal(dhash64(u8, compiled=compiled), expected)
    assert np.array_equal(dhash64_hu(hu, compiled=compiled), expected)
    # neighbouring slices are near-duplicates (the paper's point), but not all codes are equal
    assert len(set(expected.tolist())) >= 4


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("size", [512, 256, 64])
def test_dhash_equals_imagehash_on_phantom_slices(size, compiled):
    hu = phantom_hu(6, size, np.random.default_rng(size))
    u8 = minmax_uint8(hu)
    assert np.array_equal(dhash64_hu(hu, compiled=compiled), imagehash_codes(u8))


def test_compiled_kernel_is_used_for_square_ct_slices_and_handles_wide_int_ranges():
    assert _numba_kernel() is not None
    assert _kernel_applies(np.zeros((1, 512, 512), np.int16))
    assert not _kernel_applies(np.zeros((1, 512, 512), np.float32))  # floats take the numpy path
    # int32 slices whose span exceeds the kernel's lookup table (> 2**20) use its direct formula
    rng = np.random.default_rng(11)
    wide = rng.integers(-(2**30), 2**30, (3, 64, 64)).astype(np.int32)
    assert np.array_equal(dhash64_hu(wide), imagehash_codes(minmax_uint8(wide)))
    assert np.array_equal(dhash64_hu(wide), dhash64_hu(wide, compiled=False))


@pytest.mark.parametrize(
    "height,width",
    [(512, 512), (256, 256), (64, 64), (9, 8), (8, 9), (8, 8), (1, 1), (3, 17), (101, 37), (37, 101),
     (513, 257), (257, 513), (1000, 5), (5, 1000), (20, 10), (27, 18), (26, 18)],
)
def test_dhash_equals_imagehash_on_random_images_of_odd_sizes(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    noise = rng.integers(0, 256, (4, height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack(
        [np.clip(128 + 90 * np.sin(xx / (2 + k) + yy / (3 + k)) + rng.normal(0, 8, (height, width)), 0, 255)
         for k in range(4)]
    ).astype(np.uint8)
    u8 = np.concatenate([noise, smooth])
    expected = imagehash_codes(u8)
    assert np.array_equal(dhash64(u8), expected)
    assert np.array_equal(dhash64(u8, compiled=False), expected)
    assert np.array_equal(dhash64_hu(u8.astype(np.int16) * 7 - 1000), dhash64_hu(u8.astype(np.int16) * 7 - 1000,
                                                                                  compiled=False))


def test_lanczos_resize_equals_pillow_pixel_for_pixel_including_pass_order():
    # shapes on both sides of Pillow 13's vertical-first rule (in_h - 8 > 2 * (in_w - 9))
    rng = np.random.default_rng(7)
    for height, width in [(26, 18), (27, 18), (170, 90), (171, 90), (40, 30), (16, 9), (300, 200)]:
        u8 = rng.integers(0, 256, (2, height, width), dtype=np.uint8)
        ours = resize_lanczos_u8(u8, 9, 8)
        for i in range(2):
            pil = np.asarray(Image.fromarray(u8[i]).resize((9, 8), Image.Resampling.LANCZOS))
            assert np.array_equal(ours[i], pil), (height, width)


def test_constant_slices_scale_to_zeros_and_hash_to_zero():
    hu = np.stack([np.full((64, 64), -1000, np.int16), np.full((64, 64), 3000, np.int16)])
    u8 = minmax_uint8(hu)
    assert u8.dtype == np.uint8 and not u8.any()
    assert dhash64_hu(hu).tolist() == [0, 0]
    assert np.array_equal(dhash64(u8), imagehash_codes(u8))


def test_minmax_rounds_half_up_exactly():
    # span 2: values 0, 1, 2 -> 0, 127.5 -> 128 (half up), 255
    hu = np.array([[[0, 1, 2]]], dtype=np.int16)
    assert minmax_uint8(hu).tolist() == [[[0, 128, 255]]]
    # span 510: 255 * x / 510 = x / 2, so odd x sit exactly on .5 and round up
    row = np.arange(-1024, -1024 + 511, dtype=np.int16)[None, None, :]
    assert np.array_equal(minmax_uint8(row)[0, 0], (np.arange(511) + 1) // 2)
    # wide int16 span: equals the exact rational rounding floor((510 (x - lo) + d) / (2 d))
    wide = np.random.default_rng(0).integers(-32768, 32768, (2, 50, 50)).astype(np.int16)
    lo = wide.min(axis=(1, 2)).astype(np.int64)[:, None, None]
    d = wide.max(axis=(1, 2)).astype(np.int64)[:, None, None] - lo
    exact = (510 * (wide.astype(np.int64) - lo) + d) // (2 * d)
    assert np.array_equal(minmax_uint8(wide), exact.astype(np.uint8))


def test_minmax_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        minmax_uint8(np.array([[[0.0, np.nan]]]))
    with pytest.raises(ValueError, match="shape"):
        minmax_uint8(np.zeros((2, 3, 4, 5), np.int16))
    with pytest.raises(ValueError, match="uint8"):
        dhash64(np.zeros((1, 8, 8), np.int16))


def test_hamming_and_popcount_match_python_bit_counts():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2**63, 500, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 500, dtype=np.uint64)
    b = rng.integers(0, 2**63, 500, dtype=np.uint64)
    expected = [bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b, strict=True)]
    assert hamming(a, b).tolist() == expected
    assert popcount64(np.array([0, 2**64 - 1, 1 << 63], dtype=np.uint64)).tolist() == [0, 64, 1]
    # broadcasting: one code against many
    assert hamming(a[:1], a).tolist() == [bin(int(a[0]) ^ int(x)).count("1") for x in a]

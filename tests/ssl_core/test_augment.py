"""Batched CT augmentations: geometry, intensity, multi-crop and the per-method recipes."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from ssl_core.augment import (
    AIR_HU,
    GaussianBlur,
    GaussianNoise,
    RandomFlip,
    RandomResizedCrop,
    RandomSolarize,
    Window,
    crop_affine,
    gaussian_blur,
    random_resized_crop,
    swav_local_size,
)
from ssl_core.ct_window import WindowJitter
from ssl_core.methods import create_views


def _column_ramp(n: int, size: int) -> torch.Tensor:
    """HU value = column index, identical for every sample."""
    return torch.arange(size, dtype=torch.float32).view(1, 1, 1, size).expand(n, 1, size, size).contiguous()


def test_full_area_square_crop_is_the_identity_and_flip_is_an_exact_mirror():
    x = torch.randn(4, 1, 32, 32) * 300
    same = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(same, x, atol=1e-3, rtol=0)
    mirrored = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=1.0)
    torch.testing.assert_close(mirrored, x.flip(-1), atol=1e-3, rtol=0)
    torch.testing.assert_close(RandomFlip(hflip_p=1.0, vflip_p=1.0)(x), x.flip(-1).flip(-2))


def test_crop_of_a_quarter_area_spans_half_the_width_at_a_different_place_per_sample():
    x = _column_ramp(64, 64)
    out = random_resized_crop(x, 64, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    # 64 output pixel centres over half the width: 63/64 of 32 columns
    torch.testing.assert_close(span, torch.full((64,), 31.5), atol=1e-3, rtol=0)
    starts = out.amin(dim=(1, 2, 3))
    assert starts.min() >= -0.5 and starts.max() <= 32.0
    assert len(torch.unique(starts.round(decimals=3))) == 64  # per-sample random positions
    assert starts.max() - starts.min() > 20  # spread over the admissible range [0, 32]


def test_crop_scale_and_aspect_stay_in_their_ranges():
    theta = crop_affine(2000, (64, 64), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        generator=torch.Generator().manual_seed(0))
    fw, fh = theta[:, 0, 0].abs(), theta[:, 1, 1].abs()
    area = fw * fh
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1.0 + 1e-6
    aspect = fw / fh
    unclipped = (fw < 1) & (fh < 1)
    assert aspect[unclipped].min() >= 3 / 4 - 1e-5 and aspect[unclipped].max() <= 4 / 3 + 1e-5
    # the crop never leaves the image: |center| + half-size <= 1
    assert (theta[:, 0, 2].abs() + fw).max() <= 1 + 1e-6 and (theta[:, 1, 2].abs() + fh).max() <= 1 + 1e-6


def test_rotation_is_a_true_rotation_in_pixel_space_also_for_non_square_images():
    h, w = 32, 64
    theta = crop_affine(500, (h, w), scale=(1.0, 1.0), ratio=(w / h, w / h), max_rotation_deg=30,
                        generator=torch.Generator().manual_seed(0))
    s = torch.diag(torch.tensor([w / 2, h / 2]))
    p = s @ theta[:, :, :2] @ torch.linalg.inv(s)  # the map on pixel offsets
    torch.testing.assert_close(p @ p.transpose(1, 2), torch.eye(2).expand(500, 2, 2), atol=1e-5, rtol=0)
    angles = torch.rad2deg(torch.atan2(p[:, 1, 0], p[:, 0, 0]))
    assert angles.abs().max() <= 30 + 1e-4 and angles.min() < -25 and angles.max() > 25


def test_pixels_rotated_in_from_outside_the_slice_are_air():
    x = torch.zeros(64, 1, 32, 32)  # water everywhere
    out = RandomResizedCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, max_rotation_deg=45)(
        x, generator=torch.Generator().manual_seed(0))
    corner = out[:, 0, 0, 0]
    assert corner.min() == pytest.approx(AIR_HU)  # a strongly rotated sample shows air in its corner
    assert out[:, 0, 16, 16].abs().max() < 1e-3  # the centre stays water


def test_blur_matches_torchvision_per_sample_sigma_and_zero_sigma_is_identity():
    x = torch.randn(3, 2, 24, 24)
    sig = torch.tensor([0.0, 0.7, 1.5])
    out = gaussian_blur(x, sig, kernel_size=7)
    torch.testing.assert_close(out[0], x[0])
    for i in (1, 2):
        ref = TF.gaussian_blur(x[i:i + 1], kernel_size=[7, 7], sigma=[float(sig[i])] * 2)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)


def test_blur_probability_and_noise_level_are_per_sample():
    x = torch.zeros(400, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    out = GaussianBlur(sigma=(1.0, 1.0), p=0.25)(x, generator=torch.Generator().manual_seed(0))
    blurred = (out[:, 0, 8, 8] < 0.99).float().mean().item()
    assert 0.18 < blurred < 0.32
    noisy = GaussianNoise(std=(20.0, 20.0), p=1.0)(torch.zeros(8, 1, 64, 64),
                                                   generator=torch.Generator().manual_seed(0))
    assert noisy.std(dim=(1, 2, 3)).sub(20.0).abs().max() < 1.0
    assert torch.equal(GaussianNoise(p=0.0)(x), x)


def test_solarize_inverts_only_values_above_the_threshold():
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 1, 1, 3)
    torch.testing.assert_close(RandomSolarize(p=1.0, threshold=0.5)(x).flatten(), torch.tensor([0.2, 0.5, 0.1]))


@pytest.mark.parametrize("method", ["byol", "mocov2", "swav", "spark"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_recipes_turn_hu_slices_into_windowed_views(method, in_chans):
    hu = torch.randn(6, 1, 48, 48) * 400 - 400
    views = create_views(method, 48, in_chans=in_chans)(hu, generator=torch.Generator().manual_seed(0))
    expected = {"byol": 2, "mocov2": 2, "swav": 8, "spark": 1}[method]
    assert len(views) == expected
    assert views[0].shape == (6, in_chans, 48, 48)
    for v in views:
        assert v.dtype == torch.float32 and v.min() >= 0.0 and v.max() <= 1.0
    if method == "swav":
        assert [tuple(v.shape[-2:]) for v in views] == [(48, 48)] * 2 + [(swav_local_size(48),) * 2] * 6
        assert swav_local_size(224) == 96


def test_spark_recipe_is_only_crop_and_flip_with_a_fixed_window():
    (pipe, count), = create_views("spark", 64).pipelines
    assert count == 1
    crop, window = pipe.ops
    assert isinstance(crop, RandomResizedCrop) and crop.scale == (0.67, 1.0) and crop.hflip_p == 0.5
    assert crop.max_rotation_deg == 0.0
    assert isinstance(window, Window) and window.jitter is None


def test_byol_views_are_asymmetric_like_the_paper():
    (v1, _), (v2, _) = create_views("byol", 224).pipelines
    blur1, blur2 = v1.ops[1], v2.ops[1]
    assert (blur1.p, blur2.p) == (1.0, 0.1)
    assert blur1.sigma == pytest.approx((0.1, 2.0))
    assert (v1.ops[3].p, v2.ops[3].p) == (0.0, 0.2)
    assert isinstance(v1.ops[2].jitter, WindowJitter) and v1.ops[2].jitter.p == 0.8


def test_views_are_reproducible_with_a_generator_and_random_without():
    hu = torch.randn(4, 1, 32, 32) * 400
    recipe = create_views("mocov2", 32)
    a = recipe(hu, generator=torch.Generator().manual_seed(5))
    b = recipe(hu, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])  # the two views of a pair differ


def test_invalid_crop_parameters_are_rejected():
    with pytest.raises(ValueError, match="crop scale"):
        RandomResizedCrop(32, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="unknown method 'simclr'; known: byol, "):
        create_views("simclr", 32)
    assert math.isclose(create_views("swav", 224).pipelines[1][0].ops[0].scale[1], 0.14)


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_blur_keeps_the_input_dtype_under_bf16_autocast(p):
    """On CUDA the training step runs the views under bf16 autocast; the blur's convolution then
    returns bf16, which must not leak into (or fail to copy back into) the float32 view."""
    from ssl_core.augment import GaussianBlur

    x = torch.rand(8, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = GaussianBlur((0.5, 1.5), p=p)(x, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.shape == x.shape

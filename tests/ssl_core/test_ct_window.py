"""CT windows: HU -> [0, 1] channels, presets, per-sample jitter."""

from __future__ import annotations

import pytest
import torch

from ssl_core.ct_window import WINDOW_PRESETS, WindowJitter, apply_window, default_windows, window_params


def _row(*values: float) -> torch.Tensor:
    return torch.tensor(values).view(1, 1, 1, -1)


def test_lung_window_maps_its_range_linearly_onto_zero_to_one():
    # lung: center -600, width 1500 -> [-1350, 150]
    out = apply_window(_row(-2000, -1350, -975, -600, 150, 3000), "lung")
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0, 1.0]))


def test_three_windows_become_three_channels_each_with_its_own_window():
    hu = _row(-600, 40, 400)
    out = apply_window(hu, ["lung", "soft_tissue", "bone"])
    assert out.shape == (1, 3, 1, 3)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([
        [0.5, (40 + 1350) / 1500, 1.0],  # lung [-1350, 150]
        [0.0, 0.5, 1.0],  # soft tissue [-160, 240]
        [0.0, (40 + 500) / 1800, 0.5],  # bone [-500, 1300]
    ]))
    assert default_windows(1) == ["lung"] and default_windows(3) == ["lung", "soft_tissue", "bone"]


def test_gray8_data_maps_0_to_255_onto_zero_to_one():
    assert WINDOW_PRESETS["gray8"] == (127.5, 255.0)
    torch.testing.assert_close(apply_window(_row(0, 51, 127.5, 255), "gray8").flatten(),
                               torch.tensor([0.0, 0.2, 0.5, 1.0]))


def test_explicit_center_width_pairs_work_like_presets():
    torch.testing.assert_close(apply_window(_row(-100, 0, 100), [(0.0, 200.0)]).flatten(),
                               torch.tensor([0.0, 0.5, 1.0]))


def test_window_jitter_differs_per_sample_and_stays_within_its_ranges():
    jit = WindowJitter(center_shift=0.2, width_scale=(0.5, 1.5), p=1.0)
    g = torch.Generator().manual_seed(3)
    c, w = window_params(256, ["lung", "bone"], jit, g)
    assert c.shape == w.shape == (256, 2, 1, 1)
    for k, (c0, w0) in enumerate([WINDOW_PRESETS["lung"], WINDOW_PRESETS["bone"]]):
        shift, scale = c[:, k].flatten() - c0, w[:, k].flatten() / w0
        assert shift.abs().max() <= 0.2 * w0 and shift.abs().max() > 0.15 * w0
        assert scale.min() >= 0.5 and scale.max() <= 1.5 and scale.max() - scale.min() > 0.8
        assert len(torch.unique(scale)) == 256  # each sample gets its own window


def test_window_jitter_is_reproducible_and_p_zero_means_no_jitter():
    hu = torch.randn(8, 1, 16, 16) * 400 - 300
    jit = WindowJitter(p=1.0)
    a = apply_window(hu, "lung", jit, torch.Generator().manual_seed(1))
    b = apply_window(hu, "lung", jit, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.allclose(a, apply_window(hu, "lung"))
    assert torch.equal(apply_window(hu, "lung", WindowJitter(p=0.0)), apply_window(hu, "lung"))
    # p = 0.5: about half of the samples keep the preset window exactly
    _, w = window_params(1000, "lung", WindowJitter(p=0.5), torch.Generator().manual_seed(0))
    kept = (w.flatten() == 1500.0).float().mean().item()
    assert 0.4 < kept < 0.6


def test_bad_window_input_is_rejected_with_the_offending_value():
    with pytest.raises(ValueError, match="unknown CT window 'lungs'"):
        apply_window(torch.zeros(1, 1, 2, 2), "lungs")
    with pytest.raises(ValueError, match="width must be > 0, got -5.0"):
        apply_window(torch.zeros(1, 1, 2, 2), [(0, -5)])
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\), got \(1, 3, 2, 2\)"):
        apply_window(torch.zeros(1, 3, 2, 2), "lung")
    with pytest.raises(ValueError, match="width_scale"):
        WindowJitter(width_scale=(1.5, 0.5))


def test_standardised_windows_give_zero_mean_unit_variance_on_the_datasets_statistics():
    from ssl_core.ct_window import dataset_windows, standardisation, standardised

    g = torch.Generator().manual_seed(0)
    grey = (torch.rand(64, 1, 16, 16, generator=g) * 120 + 60).round()  # an 8-bit set, grey 60..180
    mean, std = float(grey.mean()), float(grey.std(unbiased=False))
    spec = dataset_windows("gray8", {"mean": mean, "std": std}, in_chans=1)
    assert spec == [standardised("gray8", mean / 255, std / 255)] and spec[0].startswith("gray8@")
    y = apply_window(grey, spec)
    assert abs(float(y.mean())) < 1e-4 and abs(float(y.std(unbiased=False)) - 1) < 1e-4
    plain = apply_window(grey, ["gray8"])
    torch.testing.assert_close(apply_window(grey, spec, standardise=False), plain)
    assert standardisation(["gray8", "lung"]) is None
    assert standardisation(spec + ["lung"]) == [(pytest.approx(mean / 255, rel=1e-5),
                                                 pytest.approx(std / 255, rel=1e-5)), (0.0, 1.0)]
    assert dataset_windows("hu", None, 1) is None
    assert dataset_windows("gray8", None, 3) == ["gray8"] * 3
    with pytest.raises(ValueError, match="expected NAME@MEAN/STD"):
        apply_window(grey, ["gray8@x/y"])


def test_byol_solarizes_on_0_1_values_before_standardising():
    from ssl_core.augment import byol_views

    spec = ["gray8@0.5/0.25"]
    views = byol_views(16, windows=spec, fill=0.0)
    ops = [type(o).__name__ for o in views.pipelines[1][0].ops]
    assert ops[-3:] == ["Window", "RandomSolarize", "Standardise"]
    x = torch.full((4, 1, 16, 16), 255.0)
    out = views(x, generator=torch.Generator().manual_seed(0))
    assert all(float(v.max()) <= (1 - 0.5) / 0.25 + 1e-5 for v in out)  # [0, 1] -> at most +2 sd

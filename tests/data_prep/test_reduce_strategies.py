"""Every strategy on phantom CT volumes: monotone in its threshold, target fractions, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from ctssl_base.errors import UserError
from data_prep.dhash import dhash64_hu
from data_prep.phantom.synth import render_volume
from data_prep.reduce import STRATEGIES, SliceSet, build_strategy, search_threshold
from data_prep.reduce.embedding import kcenter_greedy
from data_prep.reduce.greedy import every_nth
from data_prep.reduce.similarity import nmi_pairs, ssim_pairs, thumbnails
from ray_jobs.commands.reduce import strategy_inputs

N_SERIES, N_SLICES, SIZE = 4, 50, 64


@pytest.fixture(scope="module")
def volumes() -> SliceSet:
    hu = np.concatenate([render_volume(seed, N_SLICES, size=SIZE).hu for seed in range(N_SERIES)])
    series = np.repeat([f"series-{s}" for s in range(N_SERIES)], N_SLICES)
    data, _ = SliceSet.from_arrays(series, np.tile(np.arange(N_SLICES), N_SERIES), dhash=dhash64_hu(hu))

    def iter_pixels():
        for s in range(0, len(hu), 64):
            yield np.arange(s, min(s + 64, len(hu))), hu[s:s + 64]

    data.iter_pixels = iter_pixels
    return data


# strategy name, options, thresholds to sweep (ascending)
SWEEPS = [
    ("every_n", {}, [1, 1.5, 2, 3, 4.5, 7, 12, 60]),
    ("hash", {"scope": "volume"}, list(range(0, 25, 2))),
    ("hash", {"scope": "global"}, list(range(0, 25, 2))),
    ("ssim", {"size": 32}, [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]),
    ("mutual_info", {"size": 32}, [0.1, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95]),
    ("embedding", {"model": "resnet18", "size": 32}, [0.5, 0.9, 0.99, 0.999, 0.9999, 1.0]),
    ("embedding", {"model": "resnet18", "size": 32, "mode": "kcenter"}, [0.05, 0.1, 0.3, 0.5, 0.9, 1.0]),
]


@pytest.fixture(scope="module")
def prepared(volumes):
    cache = {}

    def get(name, options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            s = build_strategy(name, dict(options), strategy_inputs(name, options))
            s.prepare(volumes)
            cache[key] = s
        return cache[key]

    return get


@pytest.mark.parametrize("name,options,thresholds", SWEEPS,
                         ids=[f"{s[0]}-{s[1].get('scope', s[1].get('mode', ''))}" for s in SWEEPS])
def test_kept_count_moves_monotonically_with_the_threshold(prepared, name, options, thresholds):
    strat = prepared(name, options)
    kept = [strat.select(strat.check_threshold(t)).kept for t in thresholds]
    if strat.larger_keeps_fewer:
        assert all(a >= b for a, b in zip(kept, kept[1:], strict=False)), kept
    else:
        assert all(a <= b for a, b in zip(kept, kept[1:], strict=False)), kept
    assert kept[0] != kept[-1], f"{name}: the sweep should change the kept count, got {kept}"


@pytest.mark.parametrize("name,options", [
    ("every_n", {}), ("ssim", {"size": 32}), ("mutual_info", {"size": 32}),
    ("embedding", {"model": "resnet18", "size": 32, "mode": "kcenter"}),
])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.75])
def test_target_fraction_lands_within_one_percent(prepared, name, options, target):
    sel = search_threshold(prepared(name, options), target, tolerance=0.01)
    assert abs(sel.fraction - target) <= 0.01 + 1e-9, (name, target, sel.fraction, sel.threshold)
    assert sel.info["target_reached"] is True


def test_hash_target_fraction_takes_the_closest_integer_distance_and_says_so(prepared):
    strat = prepared("hash", {"scope": "volume"})
    fractions = {t: strat.select(t).fraction for t in range(0, 65)}
    for target in (0.3, 0.5, 0.8):
        sel = search_threshold(strat, target)
        best = min(abs(f - target) for f in fractions.values())
        assert abs(sel.fraction - target) == pytest.approx(best)
        assert sel.info["target_reached"] == (best <= 0.01)
        if not sel.info["target_reached"]:
            assert "no threshold keeps" in sel.info["target_warning"]


def test_every_n_with_integer_stride_is_plain_slicing():
    for n_rows in (1, 7, 50):
        for n in (1, 2, 3, 5):
            assert np.flatnonzero(every_nth(n_rows, n)).tolist() == list(range(0, n_rows, n))
    # fractional stride spreads kept slices evenly: 2.5 -> 0, 3, 5, 8, 10, ...
    assert np.flatnonzero(every_nth(11, 2.5)).tolist() == [0, 3, 5, 8, 10]


def test_ssim_and_nmi_are_one_for_identical_slices_and_drop_with_noise(volumes):
    rng = np.random.default_rng(0)
    hu = next(volumes.iter_pixels())[1][:8]
    a = thumbnails(hu, 64)
    noisy = thumbnails(hu + rng.normal(0, 300, hu.shape).astype(np.int16), 64)
    unrelated = rng.integers(0, 256, a.shape, dtype=np.uint8)
    assert np.allclose(ssim_pairs(a, a), 1.0)
    assert np.allclose(nmi_pairs(a, a), 1.0)
    s_noisy, s_unrel = ssim_pairs(a, noisy), ssim_pairs(a, unrelated)
    assert np.all(s_noisy < 0.95) and np.all(s_unrel < s_noisy) and np.all(np.abs(s_unrel) < 0.2)
    n_noisy, n_unrel = nmi_pairs(a, noisy), nmi_pairs(a, unrelated)
    assert np.all(n_noisy < 1.0) and np.all(n_unrel < n_noisy) and np.all(n_unrel < 0.1)
    assert np.allclose(ssim_pairs(a, noisy), ssim_pairs(noisy, a))
    assert np.allclose(nmi_pairs(a, noisy), nmi_pairs(noisy, a))


def test_kcenter_greedy_picks_one_point_per_cluster_first():
    rng = np.random.default_rng(1)
    centres = np.eye(8)[:3]
    pts = np.concatenate([c + rng.normal(0, 0.01, (20, 8)) for c in centres])
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    keep, cause = kcenter_greedy(pts, 3)
    assert keep.sum() == 3
    assert sorted(np.flatnonzero(keep) // 20) == [0, 1, 2]
    dropped = np.flatnonzero(~keep)
    assert np.all(cause[dropped] // 20 == dropped // 20)  # each point is covered by its own cluster's centre


def test_selection_causes_point_to_earlier_kept_slices_of_the_same_series(prepared, volumes):
    for name, options in [("hash", {"scope": "volume"}), ("ssim", {"size": 32}), ("every_n", {})]:
        strat = prepared(name, options)
        sel = strat.select(strat.default_threshold)
        dropped = np.flatnonzero(~sel.keep)
        assert dropped.size > 0
        assert np.all(sel.keep[sel.cause[dropped]])
        assert np.all(sel.cause[dropped] < dropped)
        assert np.all(volumes.series[sel.cause[dropped]] == volumes.series[dropped])
        assert np.all(sel.cause[sel.keep] == -1)


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(UserError, match=r"unknown reduction strategy 'phash'; known: .*every_n.*hash"):
        build_strategy("phash")


@pytest.mark.parametrize("name,bad,match", [
    ("hash", 65, r"out of range .*\[0, 64\]"),
    ("hash", -1, r"out of range"),
    ("hash", 2.5, r"whole number"),
    ("ssim", 1.5, r"SSIM must lie in \[-1, 1\]"),
    ("mutual_info", -0.1, r"\[0, 1\]"),
    ("every_n", 0.5, r"\[1, "),
    ("embedding", float("nan"), r"out of range"),
])
def test_out_of_range_threshold_is_a_clear_error(name, bad, match):
    with pytest.raises(UserError, match=match):
        build_strategy(name).check_threshold(bad)


def test_bad_target_fraction_and_options_are_clear_errors(prepared):
    with pytest.raises(UserError, match=r"--target-fraction 1.5: must be in \(0, 1\]"):
        search_threshold(prepared("every_n", {}), 1.5)
    with pytest.raises(UserError, match="--scope 'galaxy'"):
        build_strategy("hash", {"scope": "galaxy"})
    with pytest.raises(UserError, match="--mode 'random'"):
        build_strategy("embedding", {"mode": "random"})


def test_every_registered_strategy_is_covered_by_the_sweeps():
    assert {s[0] for s in SWEEPS} == set(STRATEGIES)


def test_thumbnails_have_a_fixed_shape_whatever_the_slice_size():
    ramp = np.arange(16 * 16, dtype=np.int16).reshape(1, 16, 16)
    # 4x4 bins of a ramp: bin means 0..255 scaled; rows step by 4 * 16, columns by 4
    assert thumbnails(ramp, 4)[0].tolist() == [[0, 5, 10, 15], [80, 85, 90, 95], [160, 165, 170, 175],
                                                [240, 245, 250, 255]]
    assert thumbnails(np.zeros((2, 130, 97), np.int16), 32).shape == (2, 32, 32)
    small = thumbnails(np.arange(12, dtype=np.int16).reshape(1, 3, 4), 8)  # upsampled by repetition
    assert small.shape == (1, 8, 8) and small[0, 0, 0] == 0 and small[0, -1, -1] == 255


def test_embedding_loads_a_ctssl_encoder_checkpoint_and_rejects_a_wrong_one(volumes, tmp_path):
    import torch

    from ssl_core.backbones import create_backbone, export_encoder_state_dict

    torch.manual_seed(0)
    encoder = create_backbone("resnet18", in_chans=1)
    path = tmp_path / "encoder.pt"
    torch.save(export_encoder_state_dict(encoder), path)
    options = {"model": "resnet18", "checkpoint": str(path), "size": 32}
    a = build_strategy("embedding", options, strategy_inputs("embedding", options))
    b = build_strategy("embedding", options, strategy_inputs("embedding", options))
    a.prepare(volumes)
    b.prepare(volumes)
    # same weights -> same embeddings (unit length), hence the same selection
    assert np.allclose(a.feats, b.feats, atol=1e-5)
    assert np.allclose(np.linalg.norm(a.feats, axis=1), 1.0, atol=1e-4)
    assert np.array_equal(a.select(0.999).keep, b.select(0.999).keep)
    assert a.options["windows"] == ["lung"]  # the default the strategy chose is what gets recorded
    with pytest.raises(UserError, match="does not fit timm model 'resnet34'"):
        strategy_inputs("embedding", {**options, "model": "resnet34"})
    with pytest.raises(UserError, match="no such file"):
        strategy_inputs("embedding", {**options, "checkpoint": str(tmp_path / "nope.pt")})


def test_embedding_without_a_handed_in_encoder_or_with_the_wrong_channels_is_a_clear_error(volumes):
    bare = build_strategy("embedding", {"size": 32})
    with pytest.raises(UserError, match="needs its encoder handed in"):
        bare.prepare(volumes)
    two = {"size": 32, "windows": ["lung", "soft_tissue"]}
    one_channel = strategy_inputs("embedding", {"size": 32})
    with pytest.raises(UserError, match=r"2 window\(s\), but the encoder takes 1 input channel"):
        build_strategy("embedding", two, one_channel).prepare(volumes)
    assert strategy_inputs("embedding", two)["embedder"].in_chans == 2
    assert strategy_inputs("hash", {}) == {}

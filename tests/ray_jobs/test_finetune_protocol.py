"""The fine-tuning protocol: a recipe grid chosen on validation by default, the baseline's backbone
following the encoders', and the settings that are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctssl_base.errors import UserError
from ray_jobs.finetune.cell import choose_recipe, late_best
from ray_jobs.finetune.config import FinetuneConfig, Recipe, default_recipes, parse_recipes
from ray_jobs.finetune.encoders import resolve_encoders


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(data="d", storage="s", experiment="e", **kw)


def test_the_default_protocol_tunes_lr_and_frozen_epochs_for_every_encoder():
    cfg = _cfg(epochs=70)
    cfg.validate()
    assert cfg.protocol == "tuned"
    assert cfg.recipe_grid() == [Recipe(1e-3, 0), Recipe(1e-3, 10), Recipe(1e-4, 0), Recipe(1e-4, 10)]
    assert "best validation AUC" in cfg.protocol_text() and "test split plays no part" in cfg.protocol_text()
    assert default_recipes(8) == [Recipe(1e-3, 0), Recipe(1e-3, 1), Recipe(1e-4, 0), Recipe(1e-4, 1)]
    assert default_recipes(1) == [Recipe(1e-3, 0), Recipe(1e-4, 0)]


def test_the_fixed_protocol_is_one_recipe_and_says_so():
    cfg = _cfg(protocol="fixed", lr=1e-4, frozen_epochs=10, epochs=70)
    cfg.validate()
    assert cfg.recipe_grid() == [Recipe(1e-4, 10)]
    assert cfg.protocol_text().startswith("fixed recipe for every encoder (lr 0.0001, backbone frozen for 10 of 70")


def test_recipes_parse_and_bad_ones_are_one_line_errors():
    assert parse_recipes("1e-3:0, 3e-4:5,1e-3:0") == [Recipe(1e-3, 0), Recipe(3e-4, 5)]
    assert parse_recipes(None) is None
    for bad, msg in (("fast", "is not LR:FROZEN_EPOCHS"), ("0:1", "needs lr > 0"), ("1e-3:-1", "needs lr > 0")):
        with pytest.raises(UserError, match=msg):
            parse_recipes(bad)
    with pytest.raises(UserError, match="freezes the backbone for 20 epochs, more than --epochs 8"):
        _cfg(epochs=8, recipes=["1e-3:20"]).validate()
    with pytest.raises(UserError, match="--asha needs --protocol fixed"):
        _cfg(asha=True).validate()
    with pytest.raises(UserError, match="--recipes is the grid of --protocol tuned"):
        _cfg(protocol="fixed", recipes=["1e-3:0"]).validate()
    with pytest.raises(UserError, match="--protocol must be one of tuned, fixed"):
        _cfg(protocol="best").validate()


def test_settings_round_trip_keeps_the_grid():
    cfg = _cfg(epochs=20, recipes=["1e-3:0", "1e-4:3"])
    back = FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.recipe_grid() == [Recipe(1e-3, 0), Recipe(1e-4, 3)]


def test_the_recipe_with_the_best_validation_auc_wins_ties_go_to_the_first_nan_never_wins():
    r = [Recipe(1e-3, 0), Recipe(1e-4, 0), Recipe(1e-4, 2)]
    assert choose_recipe(list(zip(r, [0.7, 0.8, 0.75], strict=True))) == 1
    assert choose_recipe(list(zip(r, [0.8, 0.8, 0.75], strict=True))) == 0
    assert choose_recipe(list(zip(r, [math.nan, 0.6, math.nan], strict=True))) == 1
    assert choose_recipe(list(zip(r, [math.nan] * 3, strict=True))) == 0


def test_late_best_is_the_last_ten_percent_of_epochs_at_least_the_last_one():
    assert [late_best(e, 8) for e in (5, 6, 7)] == [False, False, True]
    assert [late_best(e, 70) for e in (62, 63, 69)] == [False, True, True]


def _encoder(tmp_path, name: str, backbone: str) -> str:
    from ssl_core.backbones import create_backbone, export_encoder_state_dict

    folder = tmp_path / name
    folder.mkdir()
    torch.save(export_encoder_state_dict(create_backbone(backbone, in_chans=1)), folder / "encoder.pt")
    (folder / "encoder_config.json").write_text(json.dumps({"backbone": backbone, "in_chans": 1, "method": name}))
    return str(folder)


def test_the_random_baseline_takes_the_encoders_backbone(tmp_path):
    a = _encoder(tmp_path, "byol", "resnet18")
    specs = resolve_encoders(["random", a], default_backbone=None, in_chans=None, tracking_uri="sqlite://")
    assert [(s.name, s.backbone) for s in specs] == [("random", "resnet18"), ("byol", "resnet18")]
    only = resolve_encoders(["random"], default_backbone=None, in_chans=None, tracking_uri="sqlite://")
    assert only[0].backbone == "resnet50"  # nothing to follow: the papers' network
    named = resolve_encoders(["random", a], default_backbone="resnet34", in_chans=None, tracking_uri="sqlite://")
    assert named[0].backbone == "resnet34"  # said so explicitly: kept


def test_encoders_of_different_backbones_need_the_baselines_named(tmp_path):
    a, b = _encoder(tmp_path, "byol", "resnet18"), _encoder(tmp_path, "spark", "resnet34")
    with pytest.raises(UserError, match=r"different backbones \(resnet18, resnet34\); name the baseline's with "
                                       "--backbone"):
        resolve_encoders(["random", a, b], default_backbone=None, in_chans=None, tracking_uri="sqlite://")
    # without a random baseline, different backbones are fine
    assert len(resolve_encoders([a, b], default_backbone=None, in_chans=None, tracking_uri="sqlite://")) == 2

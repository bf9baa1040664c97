"""Optimisers by name, lr scaled by batch size, warm-up + cosine lr, weight-decay schedule, device."""

from __future__ import annotations

import pytest
import torch
from timm.optim import Lamb, Lars
from torch import nn

from ssl_core.device import autocast, channels_last
from ssl_core.methods import OptimizerDefaults, create_method
from ssl_core.optim import build_schedule, create_optimizer
from ssl_core.schedules import ParamScheduler, ScheduleConfig, cosine, scale_lr, warmup_cosine


@pytest.mark.parametrize(("name", "cls"), [("lars", Lars), ("lamb", Lamb), ("sgd", torch.optim.SGD),
                                           ("adamw", torch.optim.AdamW)])
def test_optimiser_is_chosen_by_name_with_lr_scaled_by_batch_size(name, cls):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = create_optimizer(model, OptimizerDefaults(name=name, base_lr=0.2, weight_decay=1e-4), batch_size=512)
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 512 / 256)  # linear at or above the recipe's batch


def test_method_param_groups_exempt_norms_and_biases_from_weight_decay():
    m = create_method("byol", backbone="test_resnet", img_size=32)
    opt = create_optimizer(m, m.optimizer_defaults(), batch_size=512)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1.5e-6 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert decay["lr"] == pytest.approx(0.4)  # BYOL: 0.2 x 512 / 256
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


def test_unknown_optimiser_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown optimiser 'adam'; known: sgd, adamw, lars, lamb"):
        create_optimizer(nn.Linear(2, 2), OptimizerDefaults(name="adam", base_lr=1e-3, weight_decay=0), 8)


def test_schedule_helpers_give_the_expected_values():
    assert scale_lr(1.5e-4, 4096, 256) == pytest.approx(2.4e-3)
    # warm-up 10 steps to 1.0, then cosine over the remaining 90 to 0
    assert warmup_cosine(0, 100, 1.0, 10) == 0.0
    assert warmup_cosine(5, 100, 1.0, 10) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 1.0, 10, end=0.01) == pytest.approx(0.01)
    # SparK's weight decay 0.04 -> 0.2 along a cosine: midpoint 0.12
    assert cosine(0, 10, 0.04, 0.2) == pytest.approx(0.04)
    assert cosine(5, 10, 0.04, 0.2) == pytest.approx(0.12)
    assert cosine(10, 10, 0.04, 0.2) == pytest.approx(0.2)


def test_param_scheduler_sets_lr_and_weight_decay_but_keeps_no_decay_groups_at_zero():
    w, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.04}, {"params": [b], "weight_decay": 0.0}])
    sched = ParamScheduler(opt, ScheduleConfig(total_steps=20, peak_lr=1e-3, warmup_steps=10,
                                               weight_decay=0.04, weight_decay_end=0.2))
    values = sched.step(5)
    assert values["lr"] == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    sched.step(20)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.2)
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_build_schedule_uses_the_recipe_warmup_and_weight_decay_end():
    model = nn.Linear(3, 3)
    d = OptimizerDefaults(name="lamb", base_lr=2e-4, weight_decay=0.04, weight_decay_end=0.2,
                          warmup_epochs=2, base_batch_size=256)
    opt = create_optimizer(model, d, batch_size=512)
    sched = build_schedule(opt, d, total_steps=100, steps_per_epoch=10)
    assert sched.config.warmup_steps == 20 and sched.config.peak_lr == pytest.approx(4e-4)
    assert sched.step(20)["lr"] == pytest.approx(4e-4)
    assert sched.step(100)["weight_decay"] == pytest.approx(0.2)


def test_cpu_runs_in_fp32_without_channels_last():
    conv = nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    with autocast("cpu"):
        assert conv(x).dtype == torch.float32
    assert channels_last(x, "cpu") is x
    assert channels_last(conv, "cpu").weight.is_contiguous()
    y = channels_last(x, "cuda")  # the conversion itself needs no GPU
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_layerwise_optimisers_scale_by_the_square_root_below_their_recipe_batch():
    from ssl_core.methods.base import OptimizerDefaults
    from ssl_core.optim import create_optimizer, lr_scaling_rule

    params = [torch.nn.Parameter(torch.ones(4, 4))]
    lamb = OptimizerDefaults("lamb", base_lr=2e-4, weight_decay=0.04)
    assert lr_scaling_rule(lamb, 32) == "sqrt" and lr_scaling_rule(lamb, 512) == "linear"
    assert create_optimizer(params, lamb, 32).param_groups[0]["lr"] == pytest.approx(2e-4 * (32 / 256) ** 0.5)
    assert create_optimizer(params, lamb, 1024).param_groups[0]["lr"] == pytest.approx(8e-4)
    sgd = OptimizerDefaults("sgd", base_lr=0.03, weight_decay=1e-4)
    assert create_optimizer(params, sgd, 32).param_groups[0]["lr"] == pytest.approx(0.03 / 8)  # linear
    fixed = OptimizerDefaults("lars", base_lr=0.2, weight_decay=1e-6, extra={"lr_scaling": "linear"})
    assert create_optimizer(params, fixed, 64).param_groups[0]["lr"] == pytest.approx(0.05)
    assert scale_lr(0.2, 64, 256, "sqrt") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown lr scaling rule"):
        scale_lr(0.2, 64, 256, "cubic")

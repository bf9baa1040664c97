"""EMA target networks: the update formula, the cosine tau schedule, and no gradients in targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssl_core.methods import StepContext, create_method
from ssl_core.momentum import cosine_tau, ema_update_, freeze


def test_ema_follows_tau_times_target_plus_one_minus_tau_times_online_step_by_step():
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
    expected = torch.zeros(2, 3)
    for step, tau in enumerate([0.5, 0.9, 0.99]):
        with torch.no_grad():
            online.weight.fill_(float(step + 1))  # the online network keeps moving: 1, 2, 3
        ema_update_(target, online, tau)
        expected = tau * expected + (1 - tau) * (step + 1)
        torch.testing.assert_close(target.weight, expected)
    # 0.5*0 + 0.5*1 = 0.5; 0.9*0.5 + 0.1*2 = 0.65; 0.99*0.65 + 0.01*3 = 0.6735
    torch.testing.assert_close(target.weight, torch.full((2, 3), 0.6735))
    with pytest.raises(ValueError, match="tau must be in"):
        ema_update_(target, online, 1.5)


def test_cosine_tau_rises_from_base_to_one_like_byol():
    assert cosine_tau(0, 100) == pytest.approx(0.99)
    assert cosine_tau(50, 100) == pytest.approx(0.995)
    assert cosine_tau(100, 100) == pytest.approx(1.0)
    assert cosine_tau(25, 100) == pytest.approx(1 - 0.01 * (2 ** -0.5 + 1) / 2)
    assert cosine_tau(500, 100) == 1.0  # clamped after the schedule ends
    assert cosine_tau(0, 10, base=0.996) == pytest.approx(0.996)


@pytest.mark.parametrize(("method", "online", "target"), [
    ("byol", ("backbone", "projector"), ("target_backbone", "target_projector")),
    ("mocov2", ("backbone", "projector"), ("key_backbone", "key_projector")),
])
def test_target_and_key_encoders_get_no_gradients(method, online, target):
    torch.manual_seed(0)
    kwargs = {"queue_size": 32} if method == "mocov2" else {}
    m = create_method(method, backbone="test_resnet", img_size=32, **kwargs)
    out = m.training_step(torch.randn(8, 1, 32, 32) * 300, StepContext(step=0, total_steps=10))
    out["loss"].backward()
    for name in target:
        params = list(getattr(m, name).parameters())
        assert params and all(not p.requires_grad and p.grad is None for p in params)
    for name in online:
        assert all(p.grad is not None for p in getattr(m, name).parameters())
    trainable = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not any(id(p) in trainable for name in target for p in getattr(m, name).parameters())


def test_byol_target_moves_by_the_scheduled_tau_after_each_step():
    torch.manual_seed(0)
    m = create_method("byol", backbone="test_resnet", img_size=32)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    total = 4
    for step in range(2):
        ctx = StepContext(step=step, total_steps=total)
        before = [p.detach().clone() for p in m.target_backbone.parameters()]
        opt.zero_grad()
        m.training_step(torch.randn(8, 1, 32, 32) * 300, ctx)["loss"].backward()
        opt.step()
        m.after_optimizer_step(ctx)
        tau = cosine_tau(step, total)
        assert m.tau == pytest.approx(tau)
        for t, t0, o in zip(m.target_backbone.parameters(), before, m.backbone.parameters(), strict=True):
            torch.testing.assert_close(t, tau * t0 + (1 - tau) * o.detach())


def test_freeze_turns_off_gradients():
    layer = freeze(nn.Linear(2, 2))
    assert all(not p.requires_grad for p in layer.parameters())

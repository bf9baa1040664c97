"""BYOL: loss values, head sizes scaled to the backbone, symmetric two-view step."""

from __future__ import annotations

import pytest
import torch

from ssl_core.heads import byol_head_dims
from ssl_core.losses import byol_loss
from ssl_core.methods import StepContext, create_method


def test_byol_loss_is_two_minus_twice_the_cosine():
    p = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    assert byol_loss(p, p * 5).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter
    assert byol_loss(p, -p).item() == pytest.approx(4.0)
    assert byol_loss(p[:1], torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.0)
    # mean over the batch of 2 - 2 cos: cos = 1, 0, 1/sqrt(2) against (1, 0)
    z = torch.tensor([[1.0, 0.0]]).expand(3, 2)
    assert byol_loss(p, z).item() == pytest.approx((0 + 2 + (2 - 2 ** 0.5)) / 3)


def test_byol_loss_sends_no_gradient_into_the_target():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_heads_keep_the_papers_ratios_to_the_backbone_width():
    assert byol_head_dims(2048) == (4096, 256)  # the paper's ResNet-50 head
    assert byol_head_dims(512) == (1024, 128)
    m = create_method("byol", backbone="resnet18", img_size=32)
    assert (m.projector.in_dim, m.projector.hidden_dim, m.projector.out_dim) == (512, 1024, 128)
    assert (m.predictor.in_dim, m.predictor.out_dim) == (128, 128)
    assert m.optimizer_defaults().name == "lars" and m.optimizer_defaults().base_lr == 0.2


def test_byol_step_is_symmetric_over_its_two_views():
    torch.manual_seed(0)
    m = create_method("byol", backbone="test_resnet", img_size=32)
    v1, v2 = torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)

    class Fixed:  # the views a recipe would produce, in a chosen order
        def __init__(self, views):
            self.v = views

        def __call__(self, x, generator=None):
            return self.v

        def __len__(self):
            return 2

    m.eval()  # BN in eval mode so the two forwards see identical statistics
    m.views = Fixed([v1, v2])
    a = m.training_step(torch.zeros(4, 1, 32, 32), StepContext(0, 1))["loss"]
    m.views = Fixed([v2, v1])
    b = m.training_step(torch.zeros(4, 1, 32, 32), StepContext(0, 1))["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert 0.0 < a.item() < 8.0  # two terms of 2 - 2 cos

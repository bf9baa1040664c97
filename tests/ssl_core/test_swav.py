"""SwAV: multi-crop views, batched forwards per crop size, swapped-prediction loss values."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core.losses import swav_swapped_loss
from ssl_core.methods import StepContext, create_method
from ssl_core.methods.common import forward_views


def test_swapped_loss_of_uniform_scores_is_log_k():
    k = 10
    scores = [torch.zeros(4, k) for _ in range(4)]  # softmax = 1/k whatever the codes
    codes = [torch.full((4, k), 1.0 / k) for _ in range(2)]
    assert swav_swapped_loss(scores, codes).item() == pytest.approx(math.log(k), rel=1e-5)


def test_swapped_loss_predicts_each_global_code_from_the_other_views_only():
    # view 0 agrees perfectly with code 1 (sharp), view 1 with code 0; view 0 against its own code
    # would be wrong (uniform); a correct swap gives a small loss, an unswapped one a large loss
    onehot_a = torch.tensor([[1.0, 0.0]])
    onehot_b = torch.tensor([[0.0, 1.0]])
    s_a, s_b = onehot_a * 5, onehot_b * 5  # scores / T=0.1 -> logits 50 vs 0
    swapped = swav_swapped_loss([s_a, s_b], [onehot_b, onehot_a], temperature=0.1)
    unswapped = swav_swapped_loss([s_a, s_b], [onehot_a, onehot_b], temperature=0.1)
    assert swapped.item() < 1e-6 and unswapped.item() == pytest.approx(50.0, rel=1e-4)


def test_views_of_the_same_size_share_one_forward_call():
    calls = []

    def net(x):
        calls.append(x.shape[0])
        return x.mean(dim=(1, 2, 3)).unsqueeze(1)

    views = [torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)] + [torch.rand(3, 1, 4, 4) for _ in range(4)]
    out = forward_views(net, views)
    assert calls == [6, 12]  # 2 global views in one call, 4 local crops in another
    for v, o in zip(views, out, strict=True):
        torch.testing.assert_close(o, v.mean(dim=(1, 2, 3)).unsqueeze(1))


def test_swav_step_uses_2_global_and_n_local_crops_and_scales_the_head():
    torch.manual_seed(0)
    m = create_method("swav", backbone="test_resnet", img_size=48, n_local=3, n_prototypes=25)
    assert m.views.counts == [2, 3] and m.n_global == 2
    assert m.prototypes.weight.shape == (25, 128) and m.projector.hidden_dim == 96
    assert m.optimizer_defaults().name == "lars"
    out = m.training_step(torch.randn(4, 1, 48, 48) * 300, StepContext(step=500, total_steps=1000))
    assert out["loss"].ndim == 0 and 0 < out["loss"].item() < 2 * math.log(25)
    out["loss"].backward()
    assert m.prototypes.weight.grad is not None  # past the freeze: prototypes learn


def test_swav_rejects_a_recipe_without_two_global_views():
    from ssl_core.methods import create_views

    with pytest.raises(ValueError, match="SwAV needs >= 2 global views"):
        create_method("swav", backbone="test_resnet", img_size=32, views=create_views("spark", 32))

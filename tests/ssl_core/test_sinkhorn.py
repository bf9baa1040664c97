"""Sinkhorn-Knopp codes and SwAV's prototypes (unit norm, frozen for N iterations, then trained)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_core.methods import StepContext, create_method
from ssl_core.sinkhorn import sinkhorn_knopp


def _scores(b: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, 16, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    return z @ c.t()


def test_codes_assign_each_sample_fully_and_spread_samples_equally_over_prototypes():
    b, k = 64, 16
    q = sinkhorn_knopp(_scores(b, k), iterations=3, epsilon=0.05)
    assert q.shape == (b, k) and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b))  # exact: the last step normalises rows
    # prescribed column sums: b / k = 4 samples per prototype. A plain softmax is far from it
    # (worst prototype off by ~4.9); SwAV's 3 iterations more than halve that; 50 converge.
    softmax_gap = (F.softmax(_scores(b, k) / 0.05, dim=1).sum(dim=0) - 4.0).abs().max()
    gap = (q.sum(dim=0) - 4.0).abs().max()
    assert gap < 0.5 * softmax_gap
    assert q.sum() == pytest.approx(b)
    q50 = sinkhorn_knopp(_scores(b, k), iterations=50, epsilon=0.05)
    torch.testing.assert_close(q50.sum(dim=0), torch.full((k,), 4.0), atol=1e-3, rtol=0)  # converged


def test_sinkhorn_is_computed_in_float32_without_gradients_and_rejects_bad_arguments():
    s = _scores(8, 4).requires_grad_()
    q = sinkhorn_knopp(s.to(torch.bfloat16))
    assert q.dtype == torch.float32 and not q.requires_grad
    with pytest.raises(ValueError, match="epsilon > 0"):
        sinkhorn_knopp(_scores(8, 4), epsilon=0.0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn_knopp(torch.zeros(8))


def _swav(freeze: int):
    torch.manual_seed(0)
    return create_method("swav", backbone="test_resnet", img_size=32, n_local=2, n_prototypes=20,
                         freeze_prototypes_iters=freeze)


def test_prototypes_are_frozen_for_the_first_n_iterations_then_trained_and_stay_unit_norm():
    m = _swav(freeze=2)
    opt = torch.optim.SGD([{"params": [p for n, p in m.named_parameters() if p.requires_grad]}],
                          lr=0.5, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(8, 1, 32, 32) * 300 - 300
    history = []
    for step in range(4):
        ctx = StepContext(step=step, total_steps=4)
        before = m.prototypes.weight.detach().clone()
        opt.zero_grad(set_to_none=True)
        out = m.training_step(images, ctx)
        out["loss"].backward()
        grad = m.prototypes.weight.grad
        opt.step()
        m.after_optimizer_step(ctx)
        history.append((out["prototypes_frozen"].item(), grad is None,
                        (m.prototypes.weight - before).abs().max().item()))
        norms = m.prototypes.weight.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(20))
    # steps 0 and 1: frozen, no gradient, no change at all; steps 2 and 3: trained
    assert [h[:2] for h in history] == [(1.0, True), (1.0, True), (0.0, False), (0.0, False)]
    assert history[0][2] < 1e-6 and history[1][2] < 1e-6  # re-normalising a unit vector: rounding only
    assert history[2][2] > 1e-4 and history[3][2] > 1e-4
    assert all(p.grad is not None for p in m.backbone.parameters())  # the backbone trains throughout


def test_feature_queue_starts_at_its_epoch_and_joins_the_sinkhorn_problem():
    torch.manual_seed(0)
    m = create_method("swav", backbone="test_resnet", img_size=32, n_local=0, n_prototypes=10,
                      freeze_prototypes_iters=0, queue_length=16, queue_start_epoch=1)
    images = torch.randn(4, 1, 32, 32) * 300
    for epoch, step in [(0, 0), (1, 1), (1, 2)]:
        ctx = StepContext(step=step, total_steps=3, epoch=epoch, total_epochs=2)
        m.training_step(images, ctx)["loss"].backward()
        m.after_optimizer_step(ctx)
        if epoch == 0:
            assert [q.filled for q in m.queues] == [0, 0]  # not started yet
    assert [q.filled for q in m.queues] == [8, 8]  # two steps x 4 samples per global view
    # queued features are unit vectors from the projector, not the random initial vectors
    torch.testing.assert_close(m.queues[0].filled_entries().norm(dim=1), torch.ones(8))


def test_prototypes_and_freezing_are_sized_from_the_pool_and_the_run():
    from ssl_core.methods.swav import SwAV

    # a 2,000-slice pool: 200 prototypes; frozen for a tenth of a 500-step run instead of 313 steps
    assert SwAV.options_for_pool(2000, 64, total_steps=500) == {"n_prototypes": 200, "freeze_prototypes_iters": 50}
    # ImageNet keeps the paper's 3,000 prototypes and 313 frozen iterations
    assert SwAV.options_for_pool(1_281_167, 256, total_steps=500_000) == {}
    # a time budget has no step count: the first tenth of the run, whatever its length
    assert SwAV.options_for_pool(2000, 64, total_steps=None) == {"n_prototypes": 200,
                                                                 "freeze_prototypes_fraction": 0.1}
    # the user's own freezing is not contradicted
    assert SwAV.options_for_pool(2000, 64, None, given={"freeze_prototypes_iters"}) == {"n_prototypes": 200}


def test_prototypes_freeze_for_a_fraction_of_the_run_when_asked():
    """A time-budgeted run sees schedule steps on a fixed scale; the fraction follows the scale."""
    torch.manual_seed(0)
    m = create_method("swav", backbone="test_resnet", img_size=32, n_local=2, n_prototypes=20,
                      freeze_prototypes_fraction=0.25)
    assert [m.prototypes_frozen(s, 100) for s in (0, 24, 25, 99)] == [True, True, False, False]
    assert m.prototypes_frozen(24_999, 100_000) and not m.prototypes_frozen(25_000, 100_000)
    images = torch.randn(4, 1, 32, 32) * 300 - 300
    assert m.training_step(images, StepContext(step=10, total_steps=100))["prototypes_frozen"].item() == 1.0
    assert m.training_step(images, StepContext(step=30, total_steps=100))["prototypes_frozen"].item() == 0.0
    with pytest.raises(ValueError, match="freeze_prototypes_fraction"):
        create_method("swav", backbone="test_resnet", img_size=32, freeze_prototypes_fraction=1.5)

"""Same tensors into ctssl and into lightly (a peer implementation): same outputs.

lightly is a test-only dependency (``pip install lightly``; it keeps the installed torch).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from ssl_core.losses import byol_loss, info_nce_queue_loss, swav_swapped_loss
from ssl_core.memory_queue import MemoryQueue
from ssl_core.momentum import cosine_tau, ema_update_
from ssl_core.sinkhorn import sinkhorn_knopp


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_byol_loss_equals_two_plus_twice_lightlys_negative_cosine_similarity():
    g = _gen(0)
    p, z = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    peer = NegativeCosineSimilarity()
    torch.testing.assert_close(byol_loss(p, z), 2 + 2 * peer(p, z))
    # the symmetric BYOL objective, as lightly's BYOL example forms it (0.5 x sum of two terms)
    p2, z2 = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    ours = byol_loss(p, z2) + byol_loss(p2, z)
    theirs = 0.5 * (peer(p, z2) + peer(p2, z))
    torch.testing.assert_close(ours, 4 + 4 * theirs)


def test_moco_infonce_with_queue_matches_lightlys_ntxent_memory_bank_over_a_wraparound():
    batch, size, dim, t = 8, 24, 16, 0.2
    peer = NTXentLoss(temperature=t, memory_bank_size=(size, dim))
    ours = MemoryQueue(size, dim)
    ours.queue.copy_(peer.memory_bank.bank)  # same random initial negatives
    g = _gen(1)
    for step in range(5):  # 5 x 8 keys through 24 slots: the queue wraps around
        q = torch.randn(batch, dim, generator=g, requires_grad=True)
        k = torch.randn(batch, dim, generator=g)
        theirs = peer(q, k)  # uses the bank, then enqueues k
        mine = info_nce_queue_loss(q, k, ours.negatives(), t)
        ours.enqueue(k)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        torch.testing.assert_close(ours.queue, peer.memory_bank.bank)
    assert ours.ptr == (5 * batch) % size


def test_sinkhorn_matches_lightlys():
    g = _gen(2)
    a, b = torch.randn(32, 8, generator=g), torch.randn(20, 8, generator=g)
    scores = F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
    for iters in (1, 3, 10):
        torch.testing.assert_close(sinkhorn_knopp(scores, iters, 0.05), lightly_sinkhorn(scores, iters, 0.05),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_local", [0, 4])
def test_swav_loss_with_sinkhorn_codes_matches_lightlys_swav_loss(n_local):
    g = _gen(3)
    protos = F.normalize(torch.randn(30, 16, generator=g), dim=1)

    def scores(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, 16, generator=g), dim=1) @ protos.t()

    high = [scores(12) for _ in range(2)]
    low = [scores(12) for _ in range(n_local)]
    theirs = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(high, low)
    codes = [sinkhorn_knopp(s, 3, 0.05) for s in high]
    ours = swav_swapped_loss(high + low, codes, temperature=0.1)
    torch.testing.assert_close(ours.reshape(()), theirs.reshape(()), rtol=1e-5, atol=1e-6)


def test_cosine_momentum_schedule_matches_lightlys():
    total = 40
    for step in range(total + 1):
        # lightly's max_steps counts the states including the last one: K steps -> K + 1 states
        assert cosine_tau(step, total, 0.99, 1.0) == pytest.approx(cosine_schedule(step, total + 1, 0.99, 1.0))


def test_ema_update_matches_lightlys_update_momentum():
    online = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(4)))
    peer_target = copy.deepcopy(target)
    ema_update_(target, online, 0.9)
    update_momentum(online, peer_target, 0.9)
    for a, b in zip(target.parameters(), peer_target.parameters(), strict=True):
        torch.testing.assert_close(a, b)

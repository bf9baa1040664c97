"""MoCo v2: the queue's ring-buffer arithmetic, InfoNCE values, shuffle-BN, queue sizing."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core.losses import info_nce_queue_loss
from ssl_core.memory_queue import MemoryQueue, suggest_queue_size
from ssl_core.methods import StepContext, create_method
from ssl_core.methods.mocov2 import MoCoV2


def _keys(start: int, n: int) -> torch.Tensor:
    """Distinguishable keys: row i is filled with the value start + i."""
    return (torch.arange(start, start + n, dtype=torch.float32).view(-1, 1)).expand(n, 2).clone()


def test_queue_pointer_advances_and_wraps_around_overwriting_the_oldest_keys():
    q = MemoryQueue(size=5, dim=2, normalize=False)
    assert (q.ptr, q.filled) == (0, 0)
    q.enqueue(_keys(0, 2))
    assert (q.ptr, q.filled) == (2, 2)
    q.enqueue(_keys(2, 2))
    assert (q.ptr, q.filled) == (4, 4)
    q.enqueue(_keys(4, 3))  # slots 4, 0, 1 <- keys 4, 5, 6
    assert (q.ptr, q.filled) == (2, 5)
    assert q.queue[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    # oldest-to-newest order of the filled entries: 2, 3, 4, 5, 6
    assert q.filled_entries()[:, 0].tolist() == [5.0, 6.0, 2.0, 3.0, 4.0]
    q.enqueue(_keys(10, 7))  # more keys than slots: only the newest 5 stay (12..16)
    assert sorted(q.queue[:, 0].tolist()) == [12.0, 13.0, 14.0, 15.0, 16.0]
    assert q.ptr == (2 + 7) % 5


def test_partly_filled_queue_exposes_only_written_keys_in_order():
    q = MemoryQueue(size=8, dim=2, normalize=False)
    q.enqueue(_keys(1, 3))
    assert q.filled_entries()[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert q.negatives().shape == (8, 2)  # MoCo uses the whole buffer, random init included
    with pytest.raises(ValueError, match=r"keys must be \(B, 2\)"):
        q.enqueue(torch.zeros(3, 4))


def test_queue_starts_with_random_unit_vectors_and_normalises_keys():
    q = MemoryQueue(size=16, dim=8)
    torch.testing.assert_close(q.queue.norm(dim=1), torch.ones(16))
    q.enqueue(torch.full((2, 8), 3.0))
    torch.testing.assert_close(q.queue[:2].norm(dim=1), torch.ones(2))


def test_info_nce_with_orthogonal_negatives_has_the_closed_form_value():
    t = 0.2
    q = torch.tensor([[1.0, 0.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    # logits: positive 1/T, three negatives 0 -> loss = -log(e^5 / (e^5 + 3))
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 3))
    assert info_nce_queue_loss(q, q.clone(), negatives, t).item() == pytest.approx(expected, rel=1e-5)
    # a query whose key sits in the queue as well: logits 5 (positive), 5, 0, -5
    # -> loss = -log(e^5 / (e^5 + e^5 + e^0 + e^-5)) = log(2 + e^-5 + e^-10)
    k = negatives[:1]
    expected_bad = math.log(2 + math.exp(-5) + math.exp(-10))
    assert info_nce_queue_loss(k, k, negatives, t).item() == pytest.approx(expected_bad, rel=1e-5)


def test_training_step_enqueues_the_keys_after_the_optimiser_step():
    torch.manual_seed(0)
    m = create_method("mocov2", backbone="test_resnet", img_size=32, queue_size=12)
    assert m.bn_mode == "none"  # single process: nothing to shuffle across
    before = m.queue.queue.clone()
    m.training_step(torch.randn(4, 1, 32, 32) * 300, StepContext(0, 2))["loss"].backward()
    assert torch.equal(m.queue.queue, before)  # not yet: the loss used the old queue
    keys = m._pending_keys.clone()
    m.after_optimizer_step(StepContext(0, 2))
    assert m.queue.ptr == 4
    torch.testing.assert_close(m.queue.queue[:4], keys)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(4))


def test_key_encoder_follows_momentum_0999():
    torch.manual_seed(0)
    m = create_method("mocov2", backbone="test_resnet", img_size=32, queue_size=8)
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    k0 = [p.clone() for p in m.key_backbone.parameters()]
    m.after_optimizer_step(StepContext(0, 1))
    for k, k_old, o in zip(m.key_backbone.parameters(), k0, m.backbone.parameters(), strict=True):
        torch.testing.assert_close(k, 0.999 * k_old + 0.001 * o)


def test_shuffle_bn_gives_each_sample_its_own_key_back():
    torch.manual_seed(0)
    plain = create_method("mocov2", backbone="test_resnet", img_size=32, queue_size=8, bn_mode="none")
    shuffled = create_method("mocov2", backbone="test_resnet", img_size=32, queue_size=8, bn_mode="shuffle")
    shuffled.load_state_dict(plain.state_dict())
    x = torch.rand(6, 1, 32, 32)
    # one process: BN statistics of a permuted batch are the same, so keys must match row by row
    torch.testing.assert_close(shuffled._key(x), plain._key(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="bn_mode"):
        create_method("mocov2", backbone="test_resnet", bn_mode="group")


def test_queue_is_sized_from_the_pool_not_imagenet():
    assert suggest_queue_size(1_281_167, 256) == 65536  # ImageNet keeps the paper default
    assert suggest_queue_size(1700, 64) == 384  # a quarter of a small pool, whole batches
    assert suggest_queue_size(100, 64) == 64  # never less than one batch
    assert MoCoV2.suggest_from_dataset_size(1700, 64) == {"queue_size": 384}

"""MoCo v2: the queue's ring-buffer arithmetic, InfoNCE values, shuffle-BN, queue sizing."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_core.losses import info_nce_queue_loss
from ssl_core.memory_queue import MemoryQueue, suggest_queue_size
from ssl_core.methods import StepContext, create_method
from ssl_core.methods.mocov2 import MIN_QUEUE_BATCHES, MoCoV2, moco_queue_size


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
    assert m.bn_mode == "shuffle" and m.key_bn_groups(4) == 1  # 4 samples: too few to split
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
    shuffled = create_method("mocov2", backbone="test_resnet", img_size=32, queue_size=8, bn_mode="shuffle",
                             shuffle_bn_groups=1)
    shuffled.load_state_dict(plain.state_dict())
    x = torch.rand(6, 1, 32, 32)
    # one process, one group: BN statistics of a permuted batch are the same, so keys must match row by row
    torch.testing.assert_close(shuffled._key(x), plain._key(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="bn_mode"):
        create_method("mocov2", backbone="test_resnet", bn_mode="group")


def test_queue_is_sized_from_the_pool_not_imagenet():
    assert suggest_queue_size(1_281_167, 256) == 65536  # ImageNet keeps the paper default
    assert MoCoV2.options_for_pool(1_281_167, 256, None) == {}
    assert moco_queue_size(1700, 64) == 384  # a quarter of a small pool, whole batches
    # batch 256 on a 1,736-slice pool: a quarter is one batch, whose negatives keep the loss at chance;
    # four batches fit below the pool
    assert MoCoV2.options_for_pool(1736, 256, None) == {"queue_size": 1024}
    assert moco_queue_size(100, 64) == 64  # below the pool, whole batches
    assert moco_queue_size(64, 64) == 63  # never the whole pool: each image's own key would be a negative
    assert MoCoV2.options_for_pool(1700, 64, None, given={"queue_size"}) == {}
    for rows in (2, 17, 100, 536, 1736, 20_000):
        for batch in (1, 8, 32, 256):
            if batch <= rows:
                q = moco_queue_size(rows, batch)
                assert 1 <= q < rows
                if MIN_QUEUE_BATCHES * batch < rows:
                    assert q >= MIN_QUEUE_BATCHES * batch


def _record_inputs(module: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


def test_one_process_key_encoder_normalises_random_sub_batches_and_returns_keys_in_order():
    """Without DDP there is no other rank to shuffle across: the key encoder's batch norm runs over
    random quarters of the batch while the query's runs over the whole of it, so a query and its key
    never share BN statistics; each key still comes back in its sample's row."""
    torch.manual_seed(0)
    m = create_method("mocov2", backbone="test_resnet", img_size=32, queue_size=64)
    assert m.key_bn_groups(32) == 4 and m.key_bn_groups(256) == 8 and m.key_bn_groups(6) == 1
    assert m.key_bn_groups(30) == 3  # equal sub-batches: a divisor of the batch
    x = torch.rand(32, 1, 32, 32)
    queries, keys_in = _record_inputs(m.backbone), _record_inputs(m.key_backbone)
    m._query(x)
    k = m._key(x)
    queries, keys_in = list(queries), list(keys_in)  # (the checks below run the encoders again)
    assert [len(c) for c in queries] == [32] and [len(c) for c in keys_in] == [32]  # one forward each
    order = [int((x == s).flatten(1).all(1).nonzero()) for s in keys_in[0]]
    assert sorted(order) != order and sorted(order) == list(range(32))  # the key batch is shuffled
    with torch.no_grad():
        # each key as if its sub-batch of 8 (consecutive in the shuffled order) were a batch of its own
        for i in range(0, 32, 8):
            idx = order[i:i + 8]
            alone = torch.nn.functional.normalize(m.key_projector(m.key_backbone(x[idx])), dim=1)
            torch.testing.assert_close(k[idx], alone, atol=1e-5, rtol=1e-4)
        whole = torch.nn.functional.normalize(m.key_projector(m.key_backbone(x)), dim=1)
    assert not torch.allclose(k, whole, atol=1e-3)  # the statistics differ from the whole batch's
    assert all(bn.sub_batches == 1 for bn in m._key_bns)  # only while the keys are computed
    seen = _record_inputs(m.key_backbone)
    m._key(x)
    assert [int((x == s).flatten(1).all(1).nonzero()) for s in seen[0]] != order  # a fresh grouping
    with pytest.raises(ValueError, match="shuffle_bn_groups"):
        create_method("mocov2", backbone="test_resnet", img_size=32, shuffle_bn_groups=0)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sub_batch_norm_is_batch_norm_of_each_sub_batch(channels_last, dtype):
    from ssl_core.methods.mocov2 import sub_batch_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(12, 5, 4, 3, generator=g) * 3 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(5, generator=g), torch.randn(5, generator=g)
    y = sub_batch_norm(x, 3, weight, bias, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = torch.cat([torch.nn.functional.batch_norm(c.float(), None, None, weight, bias, True, 0.0, 1e-5)
                          for c in x.chunk(3)])
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.float(), expected, atol=tol, rtol=tol)


def test_one_process_moco_with_pool_sized_queue_learns_to_find_its_keys():
    """The default one-process setup (sub-batch key BN, a queue of several batches sized for the pool)
    lowers the InfoNCE loss against *real* negatives (keys of other slices, not the random initial
    queue) on a fixed batch within 40 steps."""
    import numpy as np

    from data_prep.phantom import render_slices

    pool = torch.from_numpy(render_slices(160, size=32, seed=1).hu.astype(np.float32)).unsqueeze(1)
    opts = MoCoV2.options_for_pool(len(pool), 32, None)
    assert opts == {"queue_size": 128}  # four batches: a quarter of 160 slices would be one
    torch.manual_seed(0)
    m = create_method("mocov2", backbone="test_resnet", img_size=32, momentum=0.99, **opts)
    batch, others = pool[:32], pool[32:]

    def fixed_loss() -> float:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(1234)
            v1, v2 = m.views(batch)
            (negatives,) = m.views(others)[:1]
            q, k, neg = m._query(v1), m._key(v2), m._key(negatives)
            return info_nce_queue_loss(q, k, neg, m.temperature).item()

    before = fixed_loss()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        ctx = StepContext(step, 40)
        loss = m.training_step(pool[torch.randint(0, len(pool), (32,), generator=g)], ctx)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m.after_optimizer_step(ctx)
    after = fixed_loss()
    print(f"[moco one process] fixed-batch loss vs real negatives {before:.3f} -> {after:.3f} "
          f"(chance {math.log(1 + len(others)):.3f})")
    assert after < before - 0.1

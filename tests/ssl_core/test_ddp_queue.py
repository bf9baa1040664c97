"""Collectives under a real 2-process gloo DDP group on 127.0.0.1 (torch.multiprocessing spawn).

One spawn runs every check, because starting the processes is the expensive part; each check writes
its numbers to a result file that the test asserts on in the parent process.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from ssl_core.distributed import gather_no_grad, gather_with_grad, shuffle_batch, unshuffle_batch
        from ssl_core.memory_queue import MemoryQueue
        from ssl_core.methods import StepContext, create_method
        from ssl_core.sinkhorn import sinkhorn_knopp

        res: dict[str, object] = {}
        # 1. a queue fed with gathered keys holds both ranks' keys, in rank order
        q = MemoryQueue(size=12, dim=3, normalize=False)
        keys = torch.full((BATCH, 3), float(rank + 1))
        q.enqueue(gather_no_grad(keys))
        res["queue"] = q.queue.clone()
        res["queue_ptr"] = q.ptr

        # 2. distributed Sinkhorn on each rank's rows == single-process Sinkhorn on all rows
        g = torch.Generator().manual_seed(0)
        all_scores = torch.randn(WORLD * BATCH, 5, generator=g)
        local = all_scores[rank * BATCH:(rank + 1) * BATCH]
        res["sinkhorn_local"] = sinkhorn_knopp(local, iterations=3, epsilon=0.05)
        res["all_scores"] = all_scores

        # 3. gather_with_grad: gradient of sum(rank-weighted gather) reaches the local slice
        x = torch.ones(BATCH, 2, requires_grad=True)
        full = gather_with_grad(x * (rank + 1))
        weights = torch.arange(1, WORLD * BATCH + 1, dtype=torch.float32).view(-1, 1)
        (full * weights).sum().backward()
        res["gather_grad"] = x.grad.clone()

        # 4. shuffle-BN round trip gives back each rank's own rows
        y = torch.arange(BATCH, dtype=torch.float32).view(-1, 1) + 100 * rank
        ys, unshuffle = shuffle_batch(y)
        res["shuffled"] = ys.clone()
        res["unshuffled"] = unshuffle_batch(ys, unshuffle)

        # 5. MoCo v2 under DDP: after one step the queue holds keys from both ranks; wrapped as the
        # pre-training loop wraps it, calling the wrapper is the training step and the gradients agree
        torch.manual_seed(0)  # same initial weights on both ranks, as DDP would broadcast
        m = create_method("mocov2", backbone="test_resnet", img_size=32, queue_size=16)
        ddp = torch.nn.parallel.DistributedDataParallel(m, find_unused_parameters=True)
        images = torch.randn(BATCH, 1, 32, 32) * 300 + 200 * rank
        out = ddp(images, StepContext(step=0, total_steps=1))
        out["loss"].backward()
        res["moco_grad"] = next(p.grad for p in m.backbone.parameters() if p.grad is not None).clone()
        pending = m._pending_keys.clone()
        m.after_optimizer_step(StepContext(step=0, total_steps=1))
        res["moco_bn_mode"] = m.bn_mode
        res["moco_pending"] = pending
        res["moco_queue"] = m.queue.queue.clone()
        res["moco_ptr"] = m.queue.ptr
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_collectives_under_two_process_gloo_ddp(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(WORLD)]

    # queue: slots 0-3 hold rank 0's keys (1.0), slots 4-7 rank 1's (2.0), on both ranks
    for res in r:
        assert res["queue_ptr"] == 8
        assert torch.equal(res["queue"][:4], torch.full((4, 3), 1.0))
        assert torch.equal(res["queue"][4:8], torch.full((4, 3), 2.0))

    # sinkhorn: the distributed codes are exactly the rows of the single-process solution
    from ssl_core.sinkhorn import sinkhorn_knopp

    full = sinkhorn_knopp(r[0]["all_scores"], iterations=3, epsilon=0.05)
    dist_codes = torch.cat([r[0]["sinkhorn_local"], r[1]["sinkhorn_local"]])
    torch.testing.assert_close(dist_codes, full, rtol=1e-5, atol=1e-7)
    # ...and that differs from running Sinkhorn on each rank alone (the all-reduce matters)
    alone = sinkhorn_knopp(r[0]["all_scores"][:BATCH], iterations=3, epsilon=0.05)
    assert not torch.allclose(alone, full[:BATCH], atol=1e-4)

    # gather_with_grad: every rank's loss sum_j w_j full_j depends on rank r's x through its slice, so
    # rank r receives the sum over both ranks' losses: WORLD * (r + 1) * w[slice r]
    # (DDP's gradient averaging then yields the gradient of the mean loss)
    w = torch.arange(1, WORLD * BATCH + 1, dtype=torch.float32).view(-1, 1).expand(-1, 2)
    for rank, res in enumerate(r):
        expected = WORLD * (rank + 1) * w[rank * BATCH:(rank + 1) * BATCH]
        torch.testing.assert_close(res["gather_grad"], expected)

    # shuffle-BN: rows move across ranks, unshuffling restores each rank's own rows
    both = torch.cat([r[0]["shuffled"], r[1]["shuffled"]]).flatten().sort().values
    assert torch.equal(both, torch.tensor([0.0, 1, 2, 3, 100, 101, 102, 103]))
    for rank, res in enumerate(r):
        assert torch.equal(res["unshuffled"].flatten(), torch.arange(4.0) + 100 * rank)

    # MoCo v2: shuffle-BN chosen automatically; the queue got 2 x 4 keys, rank 0's then rank 1's,
    # identical on both ranks
    assert r[0]["moco_bn_mode"] == "shuffle"
    torch.testing.assert_close(r[0]["moco_grad"], r[1]["moco_grad"])  # DDP averaged the ranks' gradients
    for res in r:
        assert res["moco_ptr"] == 2 * BATCH
        torch.testing.assert_close(res["moco_queue"][:BATCH], r[0]["moco_pending"])
        torch.testing.assert_close(res["moco_queue"][BATCH:2 * BATCH], r[1]["moco_pending"])
    assert not torch.allclose(r[0]["moco_pending"], r[1]["moco_pending"])
    torch.testing.assert_close(r[0]["moco_queue"], r[1]["moco_queue"])

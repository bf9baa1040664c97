"""Training-step throughput of ctssl's BYOL, MoCo v2 and SwAV against lightly's, in the same run.

Both sides get the same timm backbone, batch size, input size, head widths, queue / prototype sizes
and SGD settings; each lightly model is written the way lightly's own examples write it. Both sides
start from the same finished views: augmentation is timed on neither side (ctssl's batched
augmentation of the raw HU batch runs once before the timing, and is timed alone for reference).

Three sides are timed per method, all with the same warm-up and the same number of steps, their
steps interleaved (the order rotates every round, so load from other processes hits all alike):

* ctssl with ``torch.optim.SGD`` as lightly's examples build it (the same optimiser as the peer);
* ctssl with the fused SGD kernel its own optimiser builder picks (``ssl_core.optim.fused_kwargs``);
* lightly with ``torch.optim.SGD``.

Each row prints each side's img/s (batch / median step time) and, for both ctssl sides, the ratio to
lightly: the median over rounds of lightly's step time / ctssl's step time in the same round.

``test_mocov2_step_parts_vs_lightly`` (``-k parts``) times the pieces of a MoCo v2 step on both sides
(query and key forward, loss, backward, SGD, EMA), which says where the two steps differ.

Run: ``make bench BENCH_ARGS="-k ssl_methods"`` or
``.venv/bin/python -m pytest tests/bench/test_bench_ssl_methods.py -s -p no:cacheprovider --override-ini=addopts=``
(``CTSSL_BENCH_ROUNDS=N``: timed steps per side).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

lightly = pytest.importorskip("lightly")  # test-only peer dependency; benchmarks may skip without it
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the peers module next to this file
from lightly_peers import PEERS, PROTOTYPES, QUEUE, TOTAL_STEPS  # noqa: E402

from ssl_core.backbones import create_backbone  # noqa: E402
from ssl_core.methods import StepContext, create_method  # noqa: E402
from ssl_core.optim import fused_kwargs  # noqa: E402

pytestmark = pytest.mark.timeout(7200)  # minutes per configuration on a busy 2-core machine

WARMUP = 2  # untimed steps per side before the timed ones (allocator, oneDNN kernels)


@dataclass
class Case:
    method: str
    n_local: int = 0

    @property
    def label(self) -> str:
        return f"{self.method}" + (f" 2+{self.n_local} crops" if self.method == "swav" else "")


class FixedViews:
    """Stands in for a method's ``MultiView``: hands back views computed once, so that the timed step
    does no augmentation (the peer's step does none either)."""

    def __init__(self, views: list[torch.Tensor], counts: list[int]):
        self.views, self.counts = views, counts

    def __len__(self) -> int:
        return len(self.views)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return self.views


def _ours(case: Case, backbone: str, size: int) -> nn.Module:
    kw: dict = {"byol": {}, "mocov2": {"queue_size": QUEUE},
                "swav": {"n_local": case.n_local, "n_prototypes": PROTOTYPES, "freeze_prototypes_iters": 0}}
    return create_method(case.method, backbone=backbone, img_size=size, **kw[case.method])


def _sgd(model: nn.Module, **impl) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                           weight_decay=1e-5, **impl)


def _measure(case: Case, backbone: str, size: int, batch: int, rounds: int) -> dict[str, float]:
    """Median step time (s) of each side; ``same`` / ``recipe``: the median over rounds of lightly's
    step time / ctssl's in the same round; ``aug``: ctssl's augmentation of the batch alone (best of 3)."""
    torch.manual_seed(0)
    ours = _ours(case, backbone, size)
    hu = torch.randn(batch, 1, size, size) * 400 - 400
    views = [v.contiguous() for v in ours.views(hu)]
    t_aug = []
    for _ in range(3):
        t0 = time.perf_counter()
        ours.views(hu)
        t_aug.append(time.perf_counter() - t0)
    ours.views = FixedViews(views, ours.views.counts)
    ours_fused = copy.deepcopy(ours)
    peer = PEERS[case.method](create_backbone(backbone, in_chans=1))
    peer_views = [v.clone() for v in views]  # the same input data on both sides

    def ctssl_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[int], float]:
        def step(n: int) -> float:
            ctx = StepContext(step=n, total_steps=TOTAL_STEPS)
            opt.zero_grad(set_to_none=True)
            loss = model.training_step(hu, ctx)["loss"]
            loss.backward()
            opt.step()
            model.after_optimizer_step(ctx)
            return float(loss.detach())
        return step

    opt_p = _sgd(peer)

    def peer_step(n: int) -> float:
        opt_p.zero_grad(set_to_none=True)
        loss = peer.step(peer_views, n)
        loss.backward()
        opt_p.step()
        return float(loss.detach())

    sides = {"ctssl_same": ctssl_step(ours, _sgd(ours)),
             "ctssl_fused": ctssl_step(ours_fused, _sgd(ours_fused, **fused_kwargs(
                 [p for p in ours_fused.parameters() if p.requires_grad]))),
             "lightly": peer_step}
    names = list(sides)
    for n in range(WARMUP):
        for name in names:
            sides[name](n)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            loss = sides[name](WARMUP + r)
            times[name].append(time.perf_counter() - t0)
            assert math.isfinite(loss), f"{case.label} {name}: loss {loss}"
    out = {name: statistics.median(ts) for name, ts in times.items()}
    for key, side in (("same", "ctssl_same"), ("recipe", "ctssl_fused")):
        out[key] = statistics.median(p / o for p, o in zip(times["lightly"], times[side], strict=True))
    out["aug"] = min(t_aug)
    return out


_ROUNDS = int(os.environ.get("CTSSL_BENCH_ROUNDS", "0"))  # override the rounds on a very busy machine
CONFIGS = [("resnet18", 64, 32, _ROUNDS or 12), ("resnet50", 64, 16, _ROUNDS or 9)]
CASES = [Case("byol"), Case("mocov2"), Case("swav", 0), Case("swav", 4)]


@pytest.mark.parametrize(("backbone", "size", "batch", "rounds"), CONFIGS,
                         ids=[f"{b}-{s}px-b{n}" for b, s, n, _ in CONFIGS])
def test_ssl_method_step_throughput_vs_lightly(backbone, size, batch, rounds):
    print(f"\n[bench ssl_methods] {backbone} {size}px batch {batch}: {WARMUP} warm-up + {rounds} timed steps per "
          "side, sides interleaved; augmentation timed on neither side (both start from the same views); "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    print(f"{'method':>14s} | {'ctssl SGD':>10s} {'fused SGD':>10s} {'lightly':>10s} (img/s) | "
          f"{'same-opt ratio':>14s} {'recipe ratio':>12s} | ctssl aug alone (ms)", flush=True)
    rows = []
    for case in CASES:
        t = _measure(case, backbone, size, batch, rounds)
        same, recipe = t["same"], t["recipe"]
        rows.append((case.label, same, recipe))
        print(f"{case.label:>14s} | {batch / t['ctssl_same']:10.1f} {batch / t['ctssl_fused']:10.1f} "
              f"{batch / t['lightly']:10.1f}         | {same:14.2f} {recipe:12.2f} | {1000 * t['aug']:.1f}",
              flush=True)
    print(f"[bench ssl_methods] load average at the end {os.getloadavg()[0]:.2f}", flush=True)
    # a guard against a step that has become much slower, not a target: parity is within the noise
    slow = [r for r in rows if r[1] < 0.85]
    assert not slow, f"far slower than lightly with the same optimiser: {slow}"


# ----------------------------------------------------------------------------- MoCo v2, part by part
def _parts_ctssl(model: nn.Module, views: list[torch.Tensor], opt: torch.optim.Optimizer, tick) -> None:
    from ssl_core.losses import info_nce_queue_loss

    v1, v2 = views
    opt.zero_grad(set_to_none=True)
    negatives = model.queue.negatives()
    q = model._query(v1)
    tick("query forward")
    k = model._key(v2)
    tick("key forward")
    loss = info_nce_queue_loss(q, k, negatives, model.temperature)
    tick("loss")
    model._pending_keys = k
    loss.backward()
    tick("backward")
    opt.step()
    tick("SGD step")
    model.after_optimizer_step(StepContext(step=1, total_steps=TOTAL_STEPS))
    tick("EMA (+ enqueue)")
    assert math.isfinite(float(loss.detach()))


def _parts_lightly(peer: nn.Module, views: list[torch.Tensor], opt: torch.optim.Optimizer, tick) -> None:
    from lightly.models.utils import update_momentum

    xq, xk = views
    opt.zero_grad(set_to_none=True)
    update_momentum(peer.backbone, peer.backbone_momentum, m=0.999)
    update_momentum(peer.projection_head, peer.projection_head_momentum, m=0.999)
    tick("EMA (+ enqueue)")
    query = peer.projection_head(peer.backbone(xq).flatten(start_dim=1))
    tick("query forward")
    with torch.no_grad():
        key = peer.projection_head_momentum(peer.backbone_momentum(xk).flatten(start_dim=1))
    tick("key forward")
    loss = peer.criterion(query, key)  # NTXentLoss with a memory bank: also enqueues the keys
    tick("loss")
    loss.backward()
    tick("backward")
    opt.step()
    tick("SGD step")
    assert math.isfinite(float(loss.detach()))


@pytest.mark.parametrize(("backbone", "size", "batch", "rounds"), CONFIGS,
                         ids=[f"{b}-{s}px-b{n}" for b, s, n, _ in CONFIGS])
def test_mocov2_step_parts_vs_lightly(backbone, size, batch, rounds):
    """Where a MoCo v2 step's time goes, ctssl's and lightly's side by side: the pieces of one step timed
    in sequence, ``torch.optim.SGD`` on both sides, no augmentation on either, the two sides' steps
    alternating (2 warm-up steps each), medians over ``2 * rounds`` steps per side."""
    torch.manual_seed(0)
    ours = _ours(Case("mocov2"), backbone, size)
    views = [v.contiguous() for v in ours.views(torch.randn(batch, 1, size, size) * 400 - 400)]
    peer = PEERS["mocov2"](create_backbone(backbone, in_chans=1))
    sides = {"ctssl": (_parts_ctssl, ours, _sgd(ours)), "lightly": (_parts_lightly, peer, _sgd(peer))}
    parts: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
    for r in range(WARMUP + 2 * rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            fn, model, opt = sides[name]
            clock = [time.perf_counter()]

            def tick(part: str, name=name, clock=clock, r=r) -> None:
                now = time.perf_counter()
                if r >= WARMUP:
                    parts[name].setdefault(part, []).append(now - clock[0])
                clock[0] = now

            fn(model, [v.clone() for v in views] if name == "lightly" else views, opt, tick)
    order = ["query forward", "key forward", "loss", "backward", "SGD step", "EMA (+ enqueue)"]
    med = {name: {p: statistics.median(parts[name][p]) for p in order} for name in sides}
    print(f"\n[bench mocov2 parts] {backbone} {size}px batch {batch}, median of {2 * rounds} steps per side, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for p in order + ["sum"]:
        o = sum(med["ctssl"].values()) if p == "sum" else med["ctssl"][p]
        lt = sum(med["lightly"].values()) if p == "sum" else med["lightly"][p]
        print(f"  {p:18s} ctssl {1000 * o:7.1f} ms   lightly {1000 * lt:7.1f} ms   "
              f"difference {1000 * (o - lt):+6.1f} ms")

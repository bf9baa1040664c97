"""Training-step throughput of ctssl's BYOL, MoCo v2 and SwAV against lightly's, in the same run.

Both sides get the same timm backbone, batch size, input size, head widths, queue / prototype sizes
and optimiser (SGD); each lightly model is written the way lightly's own examples write it. ctssl's
step *includes* its batched augmentation of raw HU slices; lightly's step gets its views
precomputed (its augmentation runs per image in DataLoader workers), so the ratio is conservative.
Steps alternate between the two sides and the median step time is compared, which keeps load from
other processes on this machine from favouring either side.

Run: ``make bench BENCH_ARGS="-k ssl_methods"`` or
``.venv/bin/python -m pytest tests/bench/test_bench_ssl_methods.py -s -p no:cacheprovider --override-ini=addopts=``
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

lightly = pytest.importorskip("lightly")  # test-only peer dependency; benchmarks may skip without it
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the peers module next to this file
from lightly_peers import PEERS, PROTOTYPES, QUEUE, TOTAL_STEPS, peer_views  # noqa: E402

from ssl_core.backbones import create_backbone  # noqa: E402
from ssl_core.methods import StepContext, create_method  # noqa: E402
from ssl_core.optim import fused_kwargs  # noqa: E402

pytestmark = pytest.mark.timeout(7200)  # minutes per configuration on a busy 2-core machine


# ----------------------------------------------------------------------------- harness
@dataclass
class Case:
    method: str
    n_local: int = 0

    @property
    def label(self) -> str:
        return f"{self.method}" + (f" 2+{self.n_local} crops" if self.method == "swav" else "")


def _ours(case: Case, backbone: str, size: int) -> nn.Module:
    kw: dict = {"byol": {}, "mocov2": {"queue_size": QUEUE},
                "swav": {"n_local": case.n_local, "n_prototypes": PROTOTYPES, "freeze_prototypes_iters": 0}}
    return create_method(case.method, backbone=backbone, img_size=size, **kw[case.method])


def _sgd(model: nn.Module, **impl) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                           weight_decay=1e-5, **impl)


def _measure(case: Case, backbone: str, size: int, batch: int, rounds: int) -> tuple[float, float]:
    torch.manual_seed(0)
    ours = _ours(case, backbone, size)
    peer = PEERS[case.method](create_backbone(backbone, in_chans=1))
    # Same SGD settings; ctssl's side uses the fused kernel its own optimiser builder picks
    # (ssl_core.optim.fused_kwargs), lightly's side the optimiser as lightly's examples build it.
    opt_o = _sgd(ours, **fused_kwargs([p for p in ours.parameters() if p.requires_grad]))
    opt_p = _sgd(peer)
    hu = torch.randn(batch, 1, size, size) * 400 - 400
    views = peer_views(case.method, batch, size, case.n_local)
    step = {"n": 0}

    def ours_step():
        ctx = StepContext(step=step["n"], total_steps=TOTAL_STEPS)
        opt_o.zero_grad(set_to_none=True)
        ours.training_step(hu, ctx)["loss"].backward()
        opt_o.step()
        ours.after_optimizer_step(ctx)

    def peer_step():
        opt_p.zero_grad(set_to_none=True)
        peer.step(views, step["n"]).backward()
        opt_p.step()

    for _ in range(1):  # warm-up: allocator, oneDNN kernels
        ours_step()
        peer_step()
    t_ours, t_peer = [], []
    for r in range(rounds):
        step["n"] = r + 1
        for fn, acc in ((ours_step, t_ours), (peer_step, t_peer)) if r % 2 == 0 else (
                (peer_step, t_peer), (ours_step, t_ours)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return batch / statistics.median(t_ours), batch / statistics.median(t_peer)


_ROUNDS = int(os.environ.get("CTSSL_BENCH_ROUNDS", "0"))  # override the rounds on a very busy machine
CONFIGS = [("resnet18", 64, 32, _ROUNDS or 9), ("resnet50", 64, 16, _ROUNDS or 7)]
CASES = [Case("byol"), Case("mocov2"), Case("swav", 0), Case("swav", 4)]


@pytest.mark.parametrize(("backbone", "size", "batch", "rounds"), CONFIGS,
                         ids=[f"{b}-{s}px-b{n}" for b, s, n, _ in CONFIGS])
def test_ssl_method_step_throughput_vs_lightly(backbone, size, batch, rounds):
    rows = []
    for case in CASES:
        ours, peer = _measure(case, backbone, size, batch, rounds)
        rows.append((case.label, ours, peer, ours / peer))
        print(f"[bench ssl_methods] {backbone} {size}px batch {batch} {case.label:>16}: "
              f"ctssl {ours:7.1f} img/s  lightly {peer:7.1f} img/s  ratio {ours / peer:5.2f}", flush=True)
    slow = [r for r in rows if r[3] < 1.0]
    assert not slow, f"slower than lightly (target ratio >= 1.0): {slow}"

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

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

lightly = pytest.importorskip("lightly")  # test-only peer dependency; benchmarks may skip without it
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss  # noqa: E402
from lightly.models.modules import (  # noqa: E402
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum  # noqa: E402
from lightly.utils.scheduler import cosine_schedule  # noqa: E402

from ssl_core.augment import swav_local_size  # noqa: E402
from ssl_core.backbones import create_backbone, feature_dim  # noqa: E402
from ssl_core.heads import byol_head_dims  # noqa: E402
from ssl_core.methods import StepContext, create_method  # noqa: E402
from ssl_core.optim import fused_kwargs  # noqa: E402

pytestmark = pytest.mark.timeout(7200)  # minutes per configuration on a busy 2-core machine

QUEUE = 4096
PROTOTYPES = 512
TOTAL_STEPS = 1000


# ----------------------------------------------------------------------------- lightly's side
class LightlyBYOL(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        d = feature_dim(backbone)
        h, o = byol_head_dims(d)
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(d, h, o)
        self.prediction_head = BYOLPredictionHead(o, h, o)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x):
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def step(self, views, step):
        m = cosine_schedule(step, TOTAL_STEPS, 0.99, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)
        x0, x1 = views
        p0, z0 = self.forward(x0), self.forward_momentum(x0)
        p1, z1 = self.forward(x1), self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class LightlyMoCo(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        d = feature_dim(backbone)
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(d, d, 128)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=0.2, memory_bank_size=(QUEUE, 128))

    def step(self, views, step):
        update_momentum(self.backbone, self.backbone_momentum, m=0.999)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.999)
        xq, xk = views
        query = self.projection_head(self.backbone(xq).flatten(start_dim=1))
        key = self.projection_head_momentum(self.backbone_momentum(xk).flatten(start_dim=1)).detach()
        return self.criterion(query, key)


class LightlySwAV(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        d = feature_dim(backbone)
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(d, d, 128)
        self.prototypes = SwaVPrototypes(128, n_prototypes=PROTOTYPES)
        self.criterion = SwaVLoss()

    def forward(self, x):
        x = F.normalize(self.projection_head(self.backbone(x).flatten(start_dim=1)), dim=1, p=2)
        return self.prototypes(x)

    def step(self, views, step):
        self.prototypes.normalize()
        out = [self.forward(v) for v in views]
        return self.criterion(out[:2], out[2:])


# ----------------------------------------------------------------------------- harness
@dataclass
class Case:
    method: str
    n_local: int = 0

    @property
    def label(self) -> str:
        return f"{self.method}" + (f" 2+{self.n_local} crops" if self.method == "swav" else "")


PEERS: dict[str, Callable[[nn.Module], nn.Module]] = {"byol": LightlyBYOL, "mocov2": LightlyMoCo,
                                                      "swav": LightlySwAV}


def _ours(case: Case, backbone: str, size: int) -> nn.Module:
    kw: dict = {"byol": {}, "mocov2": {"queue_size": QUEUE},
                "swav": {"n_local": case.n_local, "n_prototypes": PROTOTYPES, "freeze_prototypes_iters": 0}}
    return create_method(case.method, backbone=backbone, img_size=size, **kw[case.method])


def _views_for_peer(case: Case, batch: int, size: int) -> list[torch.Tensor]:
    if case.method != "swav":
        return [torch.rand(batch, 1, size, size) for _ in range(2)]
    local = swav_local_size(size)
    return [torch.rand(batch, 1, size, size) for _ in range(2)] + [
        torch.rand(batch, 1, local, local) for _ in range(case.n_local)]


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
    views = _views_for_peer(case, batch, size)
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

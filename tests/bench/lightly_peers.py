"""lightly's BYOL, MoCo v2 and SwAV, written the way lightly's own examples write them.

The peer side of the benchmarks that compare ctssl's training steps with lightly's: the CPU benchmark
(``test_bench_ssl_methods.py``) and the GPU check (``gpu_check.py``). They live in one module so both
measure the same peer. Importing it needs ``lightly``; callers that must run without it catch the
ImportError.

Each peer gets a timm backbone from ``ssl_core.backbones`` and the head widths ctssl's method uses for
that backbone, so a comparison differs only in how the step is implemented.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from ssl_core.augment import swav_local_size
from ssl_core.backbones import feature_dim
from ssl_core.heads import byol_head_dims

QUEUE = 4096
PROTOTYPES = 512
TOTAL_STEPS = 1000


class LightlyBYOL(nn.Module):
    """Four forwards per step (online and momentum network, per view), as in lightly's BYOL example."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()

    def step(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        m = cosine_schedule(step, TOTAL_STEPS, 0.99, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)
        x0, x1 = views
        p0, z0 = self.forward(x0), self.forward_momentum(x0)
        p1, z1 = self.forward(x1), self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class LightlyMoCo(nn.Module):
    """Query / momentum key with ``NTXentLoss`` over a memory bank of ``queue`` keys."""

    def __init__(self, backbone: nn.Module, queue: int = QUEUE):
        super().__init__()
        d = feature_dim(backbone)
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(d, d, 128)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=0.2, memory_bank_size=(queue, 128))

    def step(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        update_momentum(self.backbone, self.backbone_momentum, m=0.999)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.999)
        xq, xk = views
        query = self.projection_head(self.backbone(xq).flatten(start_dim=1))
        key = self.projection_head_momentum(self.backbone_momentum(xk).flatten(start_dim=1)).detach()
        return self.criterion(query, key)


class LightlySwAV(nn.Module):
    """One forward per crop and ``SwaVLoss`` (2 global crops first, then the local ones)."""

    def __init__(self, backbone: nn.Module, prototypes: int = PROTOTYPES):
        super().__init__()
        d = feature_dim(backbone)
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(d, d, 128)
        self.prototypes = SwaVPrototypes(128, n_prototypes=prototypes)
        self.criterion = SwaVLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.projection_head(self.backbone(x).flatten(start_dim=1)), dim=1, p=2)
        return self.prototypes(x)

    def step(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        self.prototypes.normalize()
        out = [self.forward(v) for v in views]
        return self.criterion(out[:2], out[2:])


PEERS: dict[str, Callable[..., nn.Module]] = {"byol": LightlyBYOL, "mocov2": LightlyMoCo, "swav": LightlySwAV}


def peer_views(method: str, batch: int, size: int, n_local: int = 0,
               device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Ready-made windowed views for the peer: lightly augments per image in DataLoader workers,
    so its training step starts from finished views (2 global, plus ``n_local`` SwAV local crops)."""
    views = [torch.rand(batch, 1, size, size, device=device) for _ in range(2)]
    if method == "swav":
        local = swav_local_size(size)
        views += [torch.rand(batch, 1, local, local, device=device) for _ in range(n_local)]
    return views


def lightly_transform(method: str, size: int):
    """The transform of lightly's example for ``method`` at ``size`` px (PIL image in, views out):
    what a plain lightly loop augments with (SwAV: 2 global + 6 local crops, as ctssl's default)."""
    from lightly.transforms import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
        MoCoV2Transform,
        SwaVTransform,
    )

    if method == "byol":
        return BYOLTransform(view_1_transform=BYOLView1Transform(input_size=size),
                             view_2_transform=BYOLView2Transform(input_size=size))
    if method == "mocov2":
        return MoCoV2Transform(input_size=size)
    if method == "swav":
        return SwaVTransform(crop_sizes=(size, swav_local_size(size)), crop_counts=(2, 6))
    raise ValueError(f"lightly has no example for {method!r}")


__all__ = ["PEERS", "PROTOTYPES", "QUEUE", "TOTAL_STEPS", "LightlyBYOL", "LightlyMoCo", "LightlySwAV",
           "lightly_transform", "peer_views"]

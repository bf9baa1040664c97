"""BYOL (Grill et al. 2020): an online network predicts a slowly moving target's projection.

    v1, v2 = views(x)
    p1, p2 = predictor(projector(backbone(v1, v2)))        # online, with gradients
    z1, z2 = target_projector(target_backbone(v1, v2))      # EMA copy, no gradients
    loss = (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1))        # symmetric
    after the optimiser step: target <- tau * target + (1 - tau) * online,
    tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2     # 0.99 -> 1.0

Heads keep the paper's ratios to the backbone width (ResNet-50: 2048 -> 4096 -> 256).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ssl_core.augment import MultiView, byol_views
from ssl_core.backbones import create_backbone, feature_dim
from ssl_core.ct_window import WindowSpec
from ssl_core.heads import MLPHead, byol_head_dims
from ssl_core.losses import byol_loss
from ssl_core.methods import METHODS
from ssl_core.methods.base import OptimizerDefaults, SSLMethod, StepContext
from ssl_core.methods.common import forward_views
from ssl_core.momentum import cosine_tau, ema_update_, freeze

log = logging.getLogger(__name__)


@METHODS.register("byol")
class BYOL(SSLMethod):
    #: the method's default view recipe (``views=`` overrides it); :func:`ssl_core.methods.create_views`
    VIEWS = staticmethod(byol_views)

    def __init__(
        self,
        backbone: str = "resnet50",
        in_chans: int = 1,
        img_size: int = 224,
        windows: Sequence[WindowSpec] | None = None,
        tau_base: float = 0.99,
        tau_end: float = 1.0,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        views: MultiView | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.backbone = create_backbone(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
        d = feature_dim(self.backbone)
        h, o = byol_head_dims(d)
        h, o = hidden_dim or h, out_dim or o
        self.projector = MLPHead(d, h, o)
        self.predictor = MLPHead(o, h, o)
        self.target_backbone = freeze(copy.deepcopy(self.backbone))
        self.target_projector = freeze(copy.deepcopy(self.projector))
        self.tau_base, self.tau_end = tau_base, tau_end
        self.tau = tau_base
        self.views = views or self.VIEWS(img_size, windows, in_chans)
        if len(self.views) != 2:
            raise ValueError(f"BYOL needs exactly 2 views, the recipe makes {len(self.views)}")
        log.info("BYOL: backbone %s (width %d), projector %d->%d->%d, tau %.4g->%.4g",
                 backbone, d, d, h, o, tau_base, tau_end)

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = self.views(images)
        p1, p2 = forward_views(self._online, [v1, v2])
        z1, z2 = forward_views(self._target, [v1, v2])
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return {"loss": loss, "tau": torch.tensor(self.tau)}

    def after_optimizer_step(self, ctx: StepContext) -> None:
        # tau for the *next* step's target: schedule position after this step
        self.tau = cosine_tau(ctx.step, ctx.total_steps, self.tau_base, self.tau_end)
        ema_update_(self.target_backbone, self.backbone, self.tau)
        ema_update_(self.target_projector, self.projector, self.tau)

    def optimizer_defaults(self) -> OptimizerDefaults:
        # paper: LARS, lr 0.2 x batch/256, weight decay 1.5e-6, 10 warm-up epochs, cosine decay
        return OptimizerDefaults(name="lars", base_lr=0.2, weight_decay=1.5e-6, base_batch_size=256,
                                 warmup_epochs=10.0, momentum=0.9)


__all__ = ["BYOL"]

"""MoCo v2 (Chen et al. 2020): contrast a query against its momentum-encoded key and a queue.

    q = normalize(head(backbone(v1)))                        # with gradients
    k = normalize(key_head(key_backbone(shuffle(v2))))       # momentum copy, no gradients, shuffle-BN
    loss = CE([q.k, q.queue] / T, label 0)                   # T = 0.2
    after the optimiser step: key <- m * key + (1 - m) * online (m = 0.999);
                              queue.enqueue(gather(k) over all DDP ranks)

The queue is sized from the data when the caller knows the pool (see
:meth:`MoCoV2.suggest_from_dataset_size`): ImageNet's 65,536 keys would hold every image of a small
CT pool several times over, so an image's own older keys would be its negatives.

Batch-norm cheating is prevented with shuffle-BN (default under DDP) or SyncBN (``bn_mode="sync"``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ssl_core.augment import MultiView, mocov2_views
from ssl_core.backbones import create_backbone, feature_dim
from ssl_core.ct_window import WindowSpec
from ssl_core.distributed import (
    convert_sync_batchnorm,
    gather_no_grad,
    is_distributed,
    shuffle_batch,
    unshuffle_batch,
)
from ssl_core.heads import MLPHead, mocov2_head_dims
from ssl_core.losses import info_nce_queue_loss
from ssl_core.memory_queue import MemoryQueue, suggest_queue_size
from ssl_core.methods import register
from ssl_core.methods.base import OptimizerDefaults, SSLMethod, StepContext
from ssl_core.methods.common import prepare_input
from ssl_core.momentum import ema_update_, freeze

log = logging.getLogger(__name__)

BN_MODES = ("auto", "shuffle", "sync", "none")


@register("mocov2")
class MoCoV2(SSLMethod):
    def __init__(
        self,
        backbone: str = "resnet50",
        in_chans: int = 1,
        img_size: int = 224,
        windows: Sequence[WindowSpec] | None = None,
        queue_size: int = 65536,
        temperature: float = 0.2,
        momentum: float = 0.999,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        bn_mode: str = "auto",
        symmetric: bool = False,
        views: MultiView | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.backbone = create_backbone(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
        d = feature_dim(self.backbone)
        h, o = mocov2_head_dims(d)
        h, o = hidden_dim or h, out_dim or o
        self.projector = MLPHead(d, h, o, batch_norm=False)  # MoCo v2: fc-ReLU-fc
        self.bn_mode = ("shuffle" if is_distributed() else "none") if bn_mode == "auto" else bn_mode
        if self.bn_mode == "sync":
            self.backbone = convert_sync_batchnorm(self.backbone)
        self.key_backbone = freeze(copy.deepcopy(self.backbone))
        self.key_projector = freeze(copy.deepcopy(self.projector))
        self.queue = MemoryQueue(queue_size, o)
        self.temperature, self.momentum, self.symmetric = temperature, momentum, symmetric
        self.views = views or mocov2_views(img_size, windows, in_chans)
        if len(self.views) != 2:
            raise ValueError(f"MoCo v2 needs exactly 2 views, the recipe makes {len(self.views)}")
        self._pending_keys: torch.Tensor | None = None
        log.info("MoCo v2: backbone %s (width %d), head %d->%d->%d, queue %d keys, T=%.3g, m=%.4g, BN %s",
                 backbone, d, d, h, o, queue_size, temperature, momentum, self.bn_mode)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(prepare_input(x))), dim=1)

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_mode == "shuffle":
            xs, unshuffle = shuffle_batch(x)
            k = self.key_projector(self.key_backbone(prepare_input(xs)))
            k = unshuffle_batch(k, unshuffle)
        else:
            k = self.key_projector(self.key_backbone(prepare_input(x)))
        return F.normalize(k.float(), dim=1)

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = self.views(images)
        negatives = self.queue.negatives()
        if self.symmetric:
            q = self._query(torch.cat([v1, v2]))
            k = torch.cat([self._key(v2), self._key(v1)])
        else:
            q, k = self._query(v1), self._key(v2)
        loss = info_nce_queue_loss(q, k, negatives, self.temperature)
        self._pending_keys = k[: v1.shape[0]] if self.symmetric else k
        return {"loss": loss}

    def forward(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Same as :meth:`training_step`, so a DDP wrapper sees a forward call."""
        return self.training_step(images, ctx)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        ema_update_(self.key_backbone, self.backbone, self.momentum)
        ema_update_(self.key_projector, self.projector, self.momentum)
        if self._pending_keys is not None:
            self.queue.enqueue(gather_no_grad(self._pending_keys))  # every rank's keys, rank order
            self._pending_keys = None

    def optimizer_defaults(self) -> OptimizerDefaults:
        # paper: SGD momentum 0.9, lr 0.03 x batch/256, weight decay 1e-4, cosine, no warm-up
        return OptimizerDefaults(name="sgd", base_lr=0.03, weight_decay=1e-4, base_batch_size=256,
                                 warmup_epochs=0.0, momentum=0.9)

    @staticmethod
    def suggest_from_dataset_size(n_images: int, batch_size: int = 256) -> dict[str, Any]:
        """Queue length for a pool of ``n_images`` (global ``batch_size``); logged by the caller."""
        size = suggest_queue_size(n_images, batch_size)
        log.info("MoCo v2: %d images, batch %d -> queue of %d keys (paper default 65536)", n_images,
                 batch_size, size)
        return {"queue_size": size}


__all__ = ["MoCoV2"]

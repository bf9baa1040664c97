"""SwAV (Caron et al. 2020): predict one view's prototype code from the other views.

    normalise prototypes; views = 2 global + N local crops
    z = normalize(projector(backbone(views)));  scores = z @ prototypes.T
    for each global view i:  q_i = sinkhorn(scores_i [+ queue scores])     # 3 iters, eps 0.05,
                                                                            # sums all-reduced over ranks
    loss = mean_i mean_{v != i} CE(q_i, softmax(scores_v / 0.1))
    prototypes get no gradient for the first ``freeze_prototypes_iters`` optimiser steps
    (or the first ``freeze_prototypes_fraction`` of the run)

The optional feature queue (per rank, as in the paper's code) holds projections of earlier global
crops and joins the Sinkhorn problem from ``queue_start_epoch`` on, so small batches still get a
well-spread equipartition. Prototype count and freeze length should follow the pool size and the run
(:meth:`SwAV.options_for_pool`), not ImageNet's 3000 / 313.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_core.augment import MultiView, swav_views
from ssl_core.backbones import create_backbone, feature_dim
from ssl_core.ct_window import WindowSpec
from ssl_core.distributed import is_distributed, world_size
from ssl_core.heads import MLPHead, Prototypes, swav_head_dims
from ssl_core.losses import swav_swapped_loss
from ssl_core.memory_queue import MemoryQueue
from ssl_core.methods import METHODS
from ssl_core.methods.base import OptimizerDefaults, SSLMethod, StepContext
from ssl_core.methods.common import forward_views
from ssl_core.sinkhorn import sinkhorn_knopp

log = logging.getLogger(__name__)

DEFAULT_PROTOTYPES = 3000  # the paper's, for ImageNet
DEFAULT_FREEZE_ITERS = 313  # the paper's: one ImageNet epoch at batch 4096
MAX_FREEZE_FRACTION = 0.1  # frozen prototypes for longer than a tenth of a short run only waste it


@METHODS.register("swav")
class SwAV(SSLMethod):
    #: the method's default view recipe (``views=`` overrides it); :func:`ssl_core.methods.create_views`
    VIEWS = staticmethod(swav_views)

    def __init__(
        self,
        backbone: str = "resnet50",
        in_chans: int = 1,
        img_size: int = 224,
        windows: Sequence[WindowSpec] | None = None,
        n_local: int = 6,
        local_size: int | None = None,
        n_prototypes: int = DEFAULT_PROTOTYPES,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        epsilon: float = 0.05,
        freeze_prototypes_iters: int = DEFAULT_FREEZE_ITERS,
        freeze_prototypes_fraction: float | None = None,
        queue_length: int = 0,
        queue_start_epoch: int = 15,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        views: MultiView | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if n_prototypes < 2:
            raise ValueError(f"SwAV needs >= 2 prototypes, got {n_prototypes}")
        if freeze_prototypes_fraction is not None and not 0.0 <= freeze_prototypes_fraction < 1.0:
            raise ValueError(f"freeze_prototypes_fraction must be in [0, 1), got {freeze_prototypes_fraction}")
        self.backbone = create_backbone(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
        d = feature_dim(self.backbone)
        h, o = swav_head_dims(d)
        h, o = hidden_dim or h, out_dim or o
        self.projector = MLPHead(d, h, o)
        self.prototypes = Prototypes(o, n_prototypes)
        self.temperature, self.sinkhorn_iterations, self.epsilon = temperature, sinkhorn_iterations, epsilon
        self.freeze_prototypes_iters = int(freeze_prototypes_iters)
        # a share of the run instead of a step count, for runs whose step count is unknown in advance
        # (a time budget): it wins over freeze_prototypes_iters when given
        self.freeze_prototypes_fraction = freeze_prototypes_fraction
        self.queue_start_epoch = int(queue_start_epoch)
        self.views = views or self.VIEWS(img_size, windows, in_chans, n_local=n_local, local_size=local_size)
        self.n_global = self.views.counts[0]
        if self.n_global < 2 or len(self.views) < 2:
            raise ValueError(f"SwAV needs >= 2 global views, the recipe makes counts {self.views.counts}")
        # per-rank queue, like the reference code: queue_length is global, each rank keeps its share
        per_rank = queue_length // world_size() if queue_length > 0 else 0
        self.queues = nn.ModuleList([MemoryQueue(per_rank, o) for _ in range(self.n_global)] if per_rank else [])
        self._pending_z: list[torch.Tensor] | None = None
        frozen_for = (f"{100 * freeze_prototypes_fraction:g} % of the run" if freeze_prototypes_fraction is not None
                      else f"{self.freeze_prototypes_iters} iterations")
        log.info("SwAV: backbone %s (width %d), head %d->%d->%d, %d prototypes frozen for %s, "
                 "views %s, queue %d from epoch %d", backbone, d, d, h, o, n_prototypes,
                 frozen_for, self.views.counts, queue_length, queue_start_epoch)

    def prototypes_frozen(self, step: int, total_steps: int | None = None) -> bool:
        if self.freeze_prototypes_fraction is not None and total_steps:
            return step < self.freeze_prototypes_fraction * total_steps
        return step < self.freeze_prototypes_iters

    def _queue_active(self, epoch: int) -> bool:
        return len(self.queues) > 0 and epoch >= self.queue_start_epoch

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        self.prototypes.normalize_()
        views = self.views(images)
        z = [F.normalize(e, dim=1) for e in forward_views(lambda x: self.projector(self.backbone(x)), views)]
        w = self.prototypes.weight
        frozen = self.prototypes_frozen(ctx.step, ctx.total_steps)
        if frozen:
            # no gradient at all (grad stays None, so no momentum / weight decay either); under DDP a
            # zero-valued dependency keeps the reducer's "every parameter gets a gradient" contract
            w = w.detach() + (0.0 * w if is_distributed() else 0.0)
        scores = [zz.float() @ w.float().t() for zz in z]
        codes = []
        use_queue = self._queue_active(ctx.epoch)
        with torch.no_grad():
            for i in range(self.n_global):
                s = scores[i].detach()
                n = s.shape[0]
                if use_queue and self.queues[i].filled > 0:
                    qz = self.queues[i].filled_entries()
                    s = torch.cat([s, qz.float() @ self.prototypes.weight.detach().float().t()])
                codes.append(sinkhorn_knopp(s, self.sinkhorn_iterations, self.epsilon)[:n])
        loss = swav_swapped_loss(scores, codes, self.temperature)
        self._pending_z = [zz.detach() for zz in z[: self.n_global]] if use_queue else None
        return {"loss": loss, "prototypes_frozen": torch.tensor(float(frozen))}

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.prototypes.normalize_()
        if self._pending_z is not None:
            for queue, zz in zip(self.queues, self._pending_z, strict=True):
                queue.enqueue(zz)
            self._pending_z = None

    def optimizer_defaults(self) -> OptimizerDefaults:
        # paper (batch 256): LARS, lr 0.6, weight decay 1e-6, cosine to 0.0006, no warm-up
        return OptimizerDefaults(name="lars", base_lr=0.6, weight_decay=1e-6, base_batch_size=256,
                                 warmup_epochs=0.0, momentum=0.9)

    #: a step count cannot be honoured by a time-budgeted run (use freeze_prototypes_fraction there)
    step_count_options = ("freeze_prototypes_iters",)

    @classmethod
    def options_for_pool(cls, rows: int, batch_size: int, total_steps: int | None,
                         given: Collection[str] = ()) -> dict[str, Any]:
        """Prototypes and prototype freezing for a pool of ``rows`` slices and a run of ``total_steps``.

        ~1 prototype per 10 slices (at least 10, at most the paper's 3,000): ImageNet's 3,000 for a
        2,000-slice pool would leave most prototypes without a sample. Prototypes stay frozen for
        the paper's 313 iterations but at most a tenth of the run; for a time-budgeted run
        (``total_steps`` None) that is the first 10 % of the budget.
        """
        out: dict[str, Any] = {}
        if "n_prototypes" not in given:
            k = max(10, rows // 10)
            if k < DEFAULT_PROTOTYPES:
                out["n_prototypes"] = k
        if "freeze_prototypes_iters" in given or "freeze_prototypes_fraction" in given:
            return out
        if total_steps is None:
            out["freeze_prototypes_fraction"] = MAX_FREEZE_FRACTION
        elif total_steps // 10 < DEFAULT_FREEZE_ITERS:  # a tenth of the run, in whole steps
            out["freeze_prototypes_iters"] = total_steps // 10
        return out


__all__ = ["SwAV"]

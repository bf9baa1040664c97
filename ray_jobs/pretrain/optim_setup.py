"""Optimiser and per-step LR schedule of a pre-training run, from the method's paper recipe.

The method states its recipe (:class:`ssl_core.methods.OptimizerDefaults`); here it is scaled to the
run's global batch size (linear scaling rule) and turned into a warm-up + cosine schedule stepped once
per optimiser step, so a resumed run continues the schedule exactly where the checkpoint left it.
"""

from __future__ import annotations

import logging
import math

import torch

from ray_jobs.pretrain.config import PretrainConfig

log = logging.getLogger(__name__)


def peak_lr(method, cfg: PretrainConfig) -> float:
    d = method.optimizer_defaults()
    if cfg.lr is not None:
        return cfg.lr
    return d.base_lr * cfg.batch_size / d.base_batch_size


def max_grad_norm(method) -> float | None:
    """Gradient clipping threshold from the method's recipe (SparK clips at 5), None when it has none."""
    extra = method.optimizer_defaults().extra
    v = extra.get("max_grad_norm", extra.get("clip_grad_norm"))
    return float(v) if v else None


def build_optimizer(method, cfg: PretrainConfig, total_steps: int, steps_per_epoch: int):
    """(optimizer, LambdaLR scheduler) for ``method`` following its defaults unless overridden."""
    from timm.optim import create_optimizer_v2

    d = method.optimizer_defaults()
    lr = peak_lr(method, cfg)
    wd = d.weight_decay if cfg.weight_decay is None else cfg.weight_decay
    kwargs = {}
    if d.name in ("sgd", "lars", "momentum", "nesterov"):
        kwargs["momentum"] = d.momentum
    if "betas" in d.extra and d.name in ("adam", "adamw", "lamb", "lambc", "nadam", "adan"):
        kwargs["betas"] = tuple(d.extra["betas"])
    groups = method.param_groups()
    optimizer = create_optimizer_v2(groups, opt=d.name, lr=lr, weight_decay=wd, **kwargs)
    warmup_epochs = d.warmup_epochs if cfg.warmup_epochs is None else cfg.warmup_epochs
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup > total_steps // 2:
        # a short run would otherwise never leave warm-up; say so rather than silently change the recipe
        log.info("warm-up of %.1f epochs (%d steps) exceeds half of this %d-step run; using %d steps",
                 warmup_epochs, warmup, total_steps, total_steps // 2)
        warmup = total_steps // 2

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    log.info("optimiser %s, peak lr %.3g (batch %d), weight decay %.3g, warm-up %d of %d steps",
             d.name, lr, cfg.batch_size, wd, warmup, total_steps)
    return optimizer, scheduler

"""Optimiser and per-step schedule of a pre-training run, from the method's paper recipe.

The method states its recipe (:class:`ssl_core.methods.OptimizerDefaults`); command-line overrides
replace single values of it, ``ssl_core.optim`` scales the lr to the global batch, and the schedule
is a pure function of the global step — so a resumed run continues it exactly by step number, with
no scheduler state to restore.
"""

from __future__ import annotations

import dataclasses
import logging

from ray_jobs.pretrain.config import PretrainConfig

log = logging.getLogger(__name__)


def recipe(method, cfg: PretrainConfig):
    """The method's :class:`OptimizerDefaults` with the run's overrides applied."""
    d = method.optimizer_defaults()
    changes = {}
    if cfg.lr is not None:  # a peak lr for this batch: make the linear scaling an identity
        changes.update(base_lr=cfg.lr, base_batch_size=cfg.batch_size)
    if cfg.weight_decay is not None:
        changes["weight_decay"] = cfg.weight_decay
        if d.weight_decay_end is not None:
            changes["weight_decay_end"] = None  # an explicit value means a constant one
    if cfg.warmup_epochs is not None:
        changes["warmup_epochs"] = cfg.warmup_epochs
    return dataclasses.replace(d, **changes)


def max_grad_norm(method) -> float | None:
    """Gradient clipping threshold from the method's recipe (SparK clips at 5), None when it has none."""
    extra = method.optimizer_defaults().extra
    v = extra.get("max_grad_norm", extra.get("clip_grad_norm"))
    return float(v) if v else None


def build_optimizer(method, cfg: PretrainConfig, total_steps: int, steps_per_epoch: int):
    """(optimizer, schedule) where ``schedule.step(global_step)`` sets lr and weight decay."""
    from ssl_core.optim import build_schedule, create_optimizer

    d = recipe(method, cfg)
    warmup_steps = d.warmup_epochs * steps_per_epoch
    if warmup_steps > total_steps // 2 and total_steps > 1:
        # a short run would otherwise never leave warm-up; say so rather than silently keep it there
        new = (total_steps // 2) / steps_per_epoch
        log.info("warm-up of %.1f epochs exceeds half of this %d-step run; using %.2f epochs",
                 d.warmup_epochs, total_steps, new)
        d = dataclasses.replace(d, warmup_epochs=new)
    optimizer = create_optimizer(method, d, cfg.batch_size)
    schedule = build_schedule(optimizer, d, total_steps, steps_per_epoch)
    return optimizer, schedule

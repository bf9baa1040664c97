"""Optimiser and per-step schedule of a pre-training run, from the method's paper recipe.

The method states its recipe (:class:`ssl_core.methods.OptimizerDefaults`); command-line overrides
replace single values of it, ``ssl_core.optim`` scales the lr to the global batch, and the schedule
is a pure function of the schedule step — the global step, or with a time budget the budget's
schedule step (:mod:`ray_jobs.pretrain.budget`) — so a resumed run continues it exactly, with no
scheduler state to restore.
"""

from __future__ import annotations

import dataclasses
import logging

from ray_jobs.pretrain.budget import Budget
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


def build_optimizer(method, cfg: PretrainConfig, total_steps: int, steps_per_epoch: int,
                    budget: Budget | None = None):
    """(optimizer, schedule) where ``schedule.step(schedule_step)`` sets lr and weight decay.

    ``total_steps`` is the schedules' length; with a ``budget`` it is ``budget.schedule_steps`` and
    the warm-up is placed as a fraction of the run (see :meth:`Budget.warmup_steps`).
    """
    from ssl_core.optim import build_schedule, create_optimizer

    d = recipe(method, cfg)
    if budget is None:
        budget = Budget(step_cap=total_steps)
    warmup = budget.warmup_steps(d.warmup_epochs, steps_per_epoch, explicit=cfg.warmup_epochs is not None)
    if not budget.timed and d.warmup_epochs * steps_per_epoch > total_steps // 2 and total_steps > 1:
        # a short run would otherwise never leave warm-up; say so rather than silently keep it there
        log.info("warm-up of %.1f epochs exceeds half of this %d-step run; using %.2f epochs",
                 d.warmup_epochs, total_steps, warmup / steps_per_epoch)
    elif budget.timed and warmup:
        log.info("warm-up: the first %.1f %% of the run (%s)", 100 * warmup / total_steps, budget.describe())
    # build_schedule takes the warm-up in epochs: this is exactly ``warmup`` schedule steps
    d = dataclasses.replace(d, warmup_epochs=warmup / steps_per_epoch)
    optimizer = create_optimizer(method, d, cfg.batch_size)
    schedule = build_schedule(optimizer, d, total_steps, steps_per_epoch)
    return optimizer, schedule

"""Schedules as pure functions of the optimiser step, plus a scheduler that applies them.

Public API (stable): :func:`scale_lr`, :func:`cosine`, :func:`warmup_cosine`,
:class:`ScheduleConfig`, :class:`ParamScheduler`.

Everything is a function of the global step (not the epoch), so resuming from a checkpoint at any
step reproduces the schedule exactly and DDP ranks never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def scale_lr(base_lr: float, batch_size: int, base_batch_size: int = 256, rule: str = "linear") -> float:
    """``base_lr`` for a global ``batch_size``: the linear rule (Goyal et al.) ``base_lr * batch /
    base_batch``, or ``rule="sqrt"``: ``base_lr * sqrt(batch / base_batch)``."""
    if batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size}, {base_batch_size}")
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / base_batch_size)
    if rule != "linear":
        raise ValueError(f"unknown lr scaling rule {rule!r}; known: linear, sqrt")
    return base_lr * batch_size / base_batch_size


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps``), constant afterwards."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return end + (start - end) * (1.0 + math.cos(math.pi * t)) / 2.0


def warmup_cosine(step: int, total_steps: int, peak: float, warmup_steps: int = 0,
                  end: float = 0.0, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``peak`` over ``warmup_steps``, then cosine to ``end``."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (peak - warmup_start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, end)


@dataclass
class ScheduleConfig:
    """Per-run schedule: peak lr (already batch-scaled), warm-up, final lr, weight-decay start/end."""

    total_steps: int
    peak_lr: float
    warmup_steps: int = 0
    final_lr: float = 0.0
    weight_decay: float = 0.0
    weight_decay_end: float | None = None  # None: constant weight decay


class ParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of every param group from a :class:`ScheduleConfig`.

    Groups created with ``weight_decay=0`` (norms, biases) stay at zero; a group's ``lr_scale``
    (if present) multiplies its lr, for layer-wise decay or frozen-then-trained heads.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: ScheduleConfig):
        self.optimizer, self.config = optimizer, config
        for g in optimizer.param_groups:
            g.setdefault("wd_enabled", g.get("weight_decay", 0.0) != 0.0)

    def lr_at(self, step: int) -> float:
        c = self.config
        return warmup_cosine(step, c.total_steps, c.peak_lr, c.warmup_steps, c.final_lr)

    def weight_decay_at(self, step: int) -> float:
        c = self.config
        if c.weight_decay_end is None:
            return c.weight_decay
        return cosine(step, c.total_steps, c.weight_decay, c.weight_decay_end)

    def step(self, step: int) -> dict[str, float]:
        """Apply the values for ``step``; returns them for logging."""
        lr, wd = self.lr_at(step), self.weight_decay_at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            g["weight_decay"] = wd if g["wd_enabled"] else 0.0
        return {"lr": lr, "weight_decay": wd}


__all__ = ["ParamScheduler", "ScheduleConfig", "cosine", "scale_lr", "warmup_cosine"]

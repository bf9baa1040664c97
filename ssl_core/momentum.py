"""Exponential moving average of weights (BYOL target, MoCo key encoder) and its tau schedule.

Public API (stable): :func:`ema_update_`, :func:`cosine_tau`, :func:`freeze`.

``target <- tau * target + (1 - tau) * online`` for every parameter, done with ``torch._foreach``
kernels so the update is a handful of fused ops rather than one small op per tensor.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients: a momentum network is only ever written by :func:`ema_update_`."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """In-place EMA of parameters (buffers such as BN running stats stay the target's own)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"EMA tau must be in [0, 1], got {tau}")
    t = [p for p in target.parameters()]
    o = [p.detach() for p in online.parameters()]
    if len(t) != len(o):
        raise ValueError("EMA target and online networks have different parameter lists")
    if tau == 1.0:
        return
    # t + (1 - tau) * (o - t): the same average in one pass over both lists (mul_ + add_ is two)
    torch._foreach_lerp_(t, o, 1.0 - tau)


def cosine_tau(step: int, total_steps: int, base: float = 0.99, end: float = 1.0) -> float:
    """BYOL's schedule: ``end - (end - base) * (cos(pi * k / K) + 1) / 2``; ``base`` at step 0 and
    ``end`` at step K (clamped afterwards)."""
    if total_steps <= 0:
        return end
    k = min(max(step, 0), total_steps)
    return end - (end - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


__all__ = ["cosine_tau", "ema_update_", "freeze"]

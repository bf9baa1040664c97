"""Optimisers by name from a method's :class:`~ssl_core.methods.base.OptimizerDefaults`.

Public API (stable): :data:`OPTIMIZERS`, :func:`create_optimizer`, :func:`build_schedule`.

BYOL and SwAV were trained with LARS, SparK with LAMB (both from ``timm.optim``), MoCo v2 with SGD;
AdamW is there for small runs. The lr is scaled linearly by the global batch size against the
recipe's ``base_batch_size``. Param groups whose weight decay is 0 (norms and biases, see
``SSLMethod.param_groups``) are also excluded from LARS's trust-ratio adaptation, as in BYOL.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import Lamb, Lars

from ssl_core.methods.base import OptimizerDefaults
from ssl_core.schedules import ParamScheduler, ScheduleConfig, scale_lr

log = logging.getLogger(__name__)

Builder = Callable[[list[dict[str, Any]], float, OptimizerDefaults], torch.optim.Optimizer]


def fused_kwargs(groups: Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` when every parameter is a float tensor on CPU or CUDA.

    PyTorch's fused SGD/AdamW update all parameters in one kernel instead of a Python loop over the
    tensors; the loop's per-tensor overhead is a visible share of a small network's CPU step (figures
    in docs/benchmarks.md, "Measurements behind choices in the code").
    """
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    ok = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {}


def _sgd(groups: list[dict[str, Any]], lr: float, d: OptimizerDefaults) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=d.momentum, weight_decay=d.weight_decay,
                           nesterov=bool(d.extra.get("nesterov", False)), **fused_kwargs(groups))


def _adamw(groups: list[dict[str, Any]], lr: float, d: OptimizerDefaults) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, weight_decay=d.weight_decay,
                             betas=tuple(d.extra.get("betas", (0.9, 0.999))), **fused_kwargs(groups))


def _lars(groups: list[dict[str, Any]], lr: float, d: OptimizerDefaults) -> torch.optim.Optimizer:
    return Lars(groups, lr=lr, momentum=d.momentum, weight_decay=d.weight_decay,
                trust_coeff=float(d.extra.get("trust_coeff", 0.001)), trust_clip=False, always_adapt=False)


def _lamb(groups: list[dict[str, Any]], lr: float, d: OptimizerDefaults) -> torch.optim.Optimizer:
    # timm picks its per-tensor loop on CPU (as PyTorch does); the multi-tensor path is faster there
    # too (docs/benchmarks.md) and is what CUDA uses anyway
    # (timm releases before the multi-tensor path have no ``foreach`` argument)
    extra = {"foreach": True} if "foreach" in inspect.signature(Lamb.__init__).parameters else {}
    return Lamb(groups, lr=lr, weight_decay=d.weight_decay, betas=tuple(d.extra.get("betas", (0.9, 0.95))),
                max_grad_norm=d.extra.get("max_grad_norm", 1.0), **extra)


OPTIMIZERS: dict[str, Builder] = {"sgd": _sgd, "adamw": _adamw, "lars": _lars, "lamb": _lamb}


#: optimisers whose per-layer trust ratio sets the step size relative to each layer's weights
LAYERWISE = ("lars", "lamb")


def lr_scaling_rule(defaults: OptimizerDefaults, batch_size: int) -> str:
    """How the recipe's lr follows the batch: linear, except for LARS / LAMB below the recipe's batch,
    which scale by the square root. Their per-layer trust ratio already normalises each step, so the
    linear rule shrinks the step a second time: SparK's LAMB recipe (2e-4 at 256) would train at
    2.5e-5 from a batch of 32, and its loss does not move in a short run. ``extra["lr_scaling"]``
    overrides the rule."""
    rule = defaults.extra.get("lr_scaling")
    if rule:
        return str(rule)
    return "sqrt" if defaults.name.lower() in LAYERWISE and batch_size < defaults.base_batch_size else "linear"


def create_optimizer(params: Iterable[dict[str, Any]] | Iterable[torch.nn.Parameter] | torch.nn.Module,
                     defaults: OptimizerDefaults, batch_size: int) -> torch.optim.Optimizer:
    """Optimiser named by ``defaults.name`` with lr = ``base_lr * batch_size / base_batch_size``.

    ``params`` may be a module with ``param_groups()`` (an :class:`SSLMethod`), a list of groups, or
    plain parameters. Groups keep their own ``weight_decay`` when they set one (0 for norms/biases).
    """
    if hasattr(params, "param_groups") and callable(params.param_groups):
        groups = params.param_groups()
    elif isinstance(params, torch.nn.Module):
        groups = [{"params": [p for p in params.parameters() if p.requires_grad]}]
    else:
        items = list(params)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    groups = [dict(g) for g in groups if len(list(g["params"])) > 0]
    try:
        builder = OPTIMIZERS[defaults.name.lower()]
    except KeyError:
        raise ValueError(f"unknown optimiser {defaults.name!r}; known: {', '.join(OPTIMIZERS)}") from None
    rule = lr_scaling_rule(defaults, batch_size)
    lr = scale_lr(defaults.base_lr, batch_size, defaults.base_batch_size, rule)
    log.info("optimizer %s: lr %.3g (base %.3g, batch %d / %d, %s scaling), weight decay %.3g", defaults.name, lr,
             defaults.base_lr, batch_size, defaults.base_batch_size, rule, defaults.weight_decay)
    opt = builder(groups, lr, defaults)
    for g in opt.param_groups:
        g["peak_lr"] = lr
    return opt


def build_schedule(optimizer: torch.optim.Optimizer, defaults: OptimizerDefaults, total_steps: int,
                   steps_per_epoch: int, final_lr: float = 0.0) -> ParamScheduler:
    """Warm-up + cosine lr and (if the recipe has one) the cosine weight-decay schedule."""
    peak = optimizer.param_groups[0].get("peak_lr", optimizer.param_groups[0]["lr"])
    warmup = min(int(round(defaults.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    return ParamScheduler(optimizer, ScheduleConfig(
        total_steps=total_steps, peak_lr=peak, warmup_steps=warmup, final_lr=final_lr,
        weight_decay=defaults.weight_decay, weight_decay_end=defaults.weight_decay_end))


__all__ = ["OPTIMIZERS", "build_schedule", "create_optimizer"]

"""Collective helpers that work with and without a process group.

Public API (stable): :func:`is_distributed`, :func:`world_size`, :func:`rank`,
:func:`gather_with_grad`, :func:`gather_no_grad`, :func:`all_reduce_sum_`, :func:`all_reduce_mean`,
:func:`shuffle_batch`, :func:`unshuffle_batch`, :func:`convert_sync_batchnorm`.

Methods call these unconditionally; in a single process they are identities, so the same method
code runs in a unit test, on a laptop and under Ray Train's DDP. All ranks must call them in the
same order with equally sized batches (the usual DDP contract).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank its slice of the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.batch:(r + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping gradients to the local part."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order), detached."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a detached copy (for logging losses)."""
    y = x.detach().clone()
    if is_distributed():
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        y /= dist.get_world_size()
    return y


@torch.no_grad()
def shuffle_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle-BN: permute the global batch across ranks; returns (local part, unshuffle index).

    Batch-norm statistics of the key encoder then come from a different subset of samples than the
    query's, which stops the network from cheating through BN. Without a process group a local
    permutation is returned (BN stats are unaffected, so this is only for API symmetry).
    """
    n = x.shape[0]
    if not is_distributed():
        perm = torch.randperm(n, device=x.device)
        return x[perm], torch.argsort(perm)
    full = gather_no_grad(x)
    perm = torch.randperm(full.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    r = dist.get_rank()
    return full[perm[r * n:(r + 1) * n]], unshuffle


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_batch` for outputs ``x`` of the local shuffled part."""
    if not is_distributed():
        return x[unshuffle]
    n = x.shape[0]
    full = gather_no_grad(x)
    r = dist.get_rank()
    return full[unshuffle[r * n:(r + 1) * n]]


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm under DDP (whole-batch BN statistics); unchanged in a single process."""
    if is_distributed():
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


__all__ = ["all_reduce_mean", "all_reduce_sum_", "convert_sync_batchnorm", "gather_no_grad",
           "gather_with_grad", "is_distributed", "rank", "shuffle_batch", "unshuffle_batch", "world_size"]

"""Device placement: bf16 autocast and channels_last on CUDA, plain fp32 on CPU.

Public API (stable): :func:`default_device`, :func:`autocast`, :func:`channels_last`,
:func:`to_device_batch`.

On CPU, bf16 autocast is slower than fp32 for small convolutions and channels_last has no fast
kernels for many ops, so both are switched on only where they pay off (CUDA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T", nn.Module, torch.Tensor)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _dev(device: torch.device | str | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


@contextlib.contextmanager
def autocast(device: torch.device | str | None = None, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA; a no-op on CPU (fp32)."""
    d = _dev(device)
    if enabled and d.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def channels_last(x: T, device: torch.device | str | None = None) -> T:
    """``memory_format=torch.channels_last`` for 4-D tensors / modules on CUDA; unchanged elsewhere."""
    d = _dev(device)
    if d.type != "cuda":
        return x
    if isinstance(x, torch.Tensor):
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
    return x.to(memory_format=torch.channels_last)


def to_device_batch(x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Move a batch to ``device`` (non-blocking from pinned memory), as float32."""
    d = _dev(device)
    return x.to(d, non_blocking=True).float()


__all__ = ["autocast", "channels_last", "default_device", "to_device_batch"]

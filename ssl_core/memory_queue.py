"""MoCo's queue of negative keys (and SwAV's feature queue): a ring buffer of unit vectors.

Public API (stable): :class:`MemoryQueue` with ``enqueue(keys)``, ``negatives()``, ``ptr``,
``filled``; :func:`suggest_queue_size`.

Under DDP the caller passes keys already gathered from all ranks (``distributed.gather_no_grad``),
so every rank keeps the same queue. The queue is a module buffer: it moves with ``.to(device)`` and is
saved in checkpoints, so a resumed run keeps its negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def suggest_queue_size(n_images: int, batch_size: int, default: int = 65536, max_fraction: float = 0.25) -> int:
    """A queue that fits the pool: at most ``max_fraction`` of the images, a multiple of the batch.

    The ImageNet default (65,536 keys for 1.28 M images) holds each image's own keys from earlier
    epochs when the pool has a few thousand slices: those stale positives then act as negatives and
    the loss stalls at chance. Keeping the queue well below one epoch of keys avoids that.
    """
    if n_images <= 0 or batch_size <= 0:
        raise ValueError(f"need positive n_images and batch_size, got {n_images}, {batch_size}")
    cap = min(default, int(n_images * max_fraction))
    size = max(batch_size, (cap // batch_size) * batch_size)
    return int(size)


class MemoryQueue(nn.Module):
    """FIFO ring buffer of ``size`` vectors of width ``dim``, initialised with random unit vectors."""

    queue: torch.Tensor
    ptr_buf: torch.Tensor
    filled_buf: torch.Tensor

    def __init__(self, size: int, dim: int, normalize: bool = True):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.size, self.dim, self.normalize = int(size), int(dim), normalize
        init = torch.randn(size, dim)
        self.register_buffer("queue", F.normalize(init, dim=1) if normalize else init)
        self.register_buffer("ptr_buf", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled_buf", torch.zeros((), dtype=torch.long))

    @property
    def ptr(self) -> int:
        """Index the next key will be written to."""
        return int(self.ptr_buf)

    @property
    def filled(self) -> int:
        """How many slots hold real keys (rather than the random initial vectors)."""
        return int(self.filled_buf)

    def negatives(self) -> torch.Tensor:
        """The whole buffer (size, dim), detached."""
        return self.queue.detach()

    def filled_entries(self) -> torch.Tensor:
        """Only slots written by :meth:`enqueue` (SwAV's queue must not use random vectors)."""
        if self.filled >= self.size:
            return self.queue.detach()
        idx = (self.ptr_buf - self.filled_buf + torch.arange(self.filled, device=self.queue.device)) % self.size
        return self.queue.detach()[idx]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B, dim) at the pointer, wrapping around; the oldest keys are overwritten.

        If B exceeds the size only the newest ``size`` keys are kept.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (B, {self.dim}), got {tuple(keys.shape)}")
        keys = keys.detach().to(self.queue.dtype)
        if self.normalize:
            keys = F.normalize(keys, dim=1)
        b = keys.shape[0]
        if b > self.size:
            self.ptr_buf.add_(b - self.size).remainder_(self.size)
            keys, b = keys[-self.size:], self.size
        idx = (self.ptr_buf + torch.arange(b, device=self.queue.device)) % self.size
        self.queue.index_copy_(0, idx, keys)
        self.ptr_buf.add_(b).remainder_(self.size)
        self.filled_buf.add_(b).clamp_(max=self.size)


__all__ = ["MemoryQueue", "suggest_queue_size"]

"""Pieces shared by the joint-embedding methods (BYOL, MoCo v2, SwAV).

:func:`forward_views` runs all views of the same size through a network in one batched forward
(two global views -> one call of batch 2N, six local crops -> one call of batch 6N). Fewer, larger
calls are what make a CPU or GPU step fast; the cost is that batch-norm statistics are shared by the
views of one size, like SimCLR's concatenated batch. :func:`prepare_input` puts views in
channels_last on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ssl_core.device import channels_last


def prepare_input(x: torch.Tensor) -> torch.Tensor:
    return channels_last(x, x.device)


def forward_views(net: Callable[[torch.Tensor], torch.Tensor], views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[net(v) for v in views]``, computed with one call per run of equally shaped views."""
    out: list[torch.Tensor] = []
    i = 0
    while i < len(views):
        j = i + 1
        while j < len(views) and views[j].shape == views[i].shape:
            j += 1
        group = views[i] if j == i + 1 else torch.cat(list(views[i:j]), dim=0)
        y = net(prepare_input(group))
        out.extend(y.chunk(j - i, dim=0) if j - i > 1 else [y])
        i = j
    return out


__all__ = ["forward_views", "prepare_input"]

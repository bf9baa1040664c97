"""Sinkhorn-Knopp equipartition for SwAV codes, distributed over DDP ranks.

Public API (stable): :func:`sinkhorn_knopp`.

Given scores (B, K) of B samples against K prototypes, returns soft codes Q (B, K) whose rows sum to
1 (each sample fully assigned) and whose columns sum to B_total / K (prototypes used equally across
the *global* batch). The global sums come from all-reduces, so each rank only sees its own rows but
the constraint holds for the whole batch. Computed in float32 without gradients, as codes are targets.
"""

from __future__ import annotations

import torch

from ssl_core.distributed import all_reduce_sum_, world_size


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05) -> torch.Tensor:
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, K), got {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"need epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
    q = torch.exp(scores.detach().float() / epsilon).t()  # (K, B)
    k = q.shape[0]
    b_total = q.shape[1] * world_size()
    q /= all_reduce_sum_(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum_(q.sum(dim=1, keepdim=True))  # each prototype row -> 1/K mass ...
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # ... each sample column -> 1/B mass (local: no reduce)
        q /= b_total
    q *= b_total
    return q.t()


__all__ = ["sinkhorn_knopp"]

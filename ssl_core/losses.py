"""Loss functions of the joint-embedding methods, written like the papers' equations.

Public API (stable): :func:`byol_loss`, :func:`info_nce_queue_loss`, :func:`swav_swapped_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``2 - 2 cos(p, z)`` averaged over the batch; ``z`` (target) carries no gradient."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return 2.0 - 2.0 * (p * z).sum(dim=-1).mean()


def info_nce_queue_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                        temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE: the positive key against the queue's negatives, cross-entropy on index 0.

    ``q`` (B, D) queries, ``k`` (B, D) keys (no gradient), ``negatives`` (M, D); all are normalised.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    neg = F.normalize(negatives.detach().float(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ neg.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def swav_swapped_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor],
                      temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction: the codes of global view ``i`` are predicted from every other view.

    ``scores`` holds prototype scores for all views (globals first); ``codes[i]`` are the Sinkhorn
    codes of global view ``i``. Averaged over the other views, then over the global views.
    """
    n_views, n_global = len(scores), len(codes)
    if n_global < 1 or n_views < 2:
        raise ValueError(f"SwAV needs >= 1 code set and >= 2 views, got {n_global}, {n_views}")
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros((), dtype=torch.float32)
    for i, q in enumerate(codes):
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(n_views) if v != i)
        total = total + sub / (n_views - 1)
    return total / n_global


__all__ = ["byol_loss", "info_nce_queue_loss", "swav_swapped_loss"]

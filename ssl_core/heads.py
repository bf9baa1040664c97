"""Projection and prediction heads, scaled to the backbone's feature width.

Public API (stable): :class:`MLPHead`, :class:`Prototypes`, :func:`byol_head_dims`,
:func:`mocov2_head_dims`, :func:`swav_head_dims`.

The papers give head sizes for a ResNet-50 (feature width 2048): BYOL 2048 -> 4096 -> 256, MoCo v2
2048 -> 2048 -> 128, SwAV 2048 -> 2048 -> 128. Copying those numbers onto a ResNet-18 (512) would make
the head four times wider than its input; the ``*_head_dims`` helpers keep the papers' ratios instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLPHead(nn.Sequential):
    """``Linear -> BN -> ReLU`` blocks then a final ``Linear`` (optionally followed by BN)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True, last_bn: bool = False):
        if num_layers < 1:
            raise ValueError(f"an MLP head needs >= 1 layer, got {num_layers}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim


class Prototypes(nn.Module):
    """SwAV's prototype matrix (K, D) used as a bias-free linear layer on unit-norm features."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, dim))
        nn.init.normal_(self.weight, std=dim ** -0.5)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise each prototype (SwAV does this before every forward)."""
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.weight)


def byol_head_dims(feature_dim: int) -> tuple[int, int]:
    """(hidden, out): BYOL's 2048 -> 4096 -> 256, i.e. hidden = 2x width, out = width / 8 (>= 128)."""
    return 2 * feature_dim, max(128, feature_dim // 8)


def mocov2_head_dims(feature_dim: int) -> tuple[int, int]:
    """(hidden, out): MoCo v2's 2048 -> 2048 -> 128, i.e. hidden = width, out = 128."""
    return feature_dim, 128


def swav_head_dims(feature_dim: int) -> tuple[int, int]:
    """(hidden, out): SwAV's 2048 -> 2048 -> 128."""
    return feature_dim, 128


__all__ = ["MLPHead", "Prototypes", "byol_head_dims", "mocov2_head_dims", "swav_head_dims"]

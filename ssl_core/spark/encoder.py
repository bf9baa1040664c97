"""SparK's encoder: an unmodified timm CNN run as a sparse CNN, returning its stage features.

The timm model is converted in place by :func:`ssl_core.spark.sparse.sparsify_`, so its state_dict stays in
timm layout and :func:`ssl_core.backbones.export_encoder_state_dict` exports it as-is. Stage features
come from timm's own ``forward_intermediates`` and ``feature_info`` — no per-architecture forward
code — so any ResNet / ConvNeXt variant that timm builds works unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ssl_core.spark.sparse import MaskContext, sparsify_


def _stage_indices(feature_info: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """Pick one feature per power-of-two reduction >= 4 (the deepest module at each reduction).

    The stem output at reduction 2 (ResNet's ``act1``) is skipped: SparK's hierarchy starts at the
    first stage, as in the paper's ResNet and ConvNeXt encoders.
    """
    by_reduction: dict[int, int] = {}
    for i, info in enumerate(feature_info):
        r = int(info["reduction"])
        if r >= 4:
            by_reduction[r] = i  # later entries at the same reduction win
    if not by_reduction:
        raise ValueError("the backbone reports no features at reduction >= 4; is it a timm CNN?")
    reductions = sorted(by_reduction)
    for r in reductions:
        if r & (r - 1):
            raise ValueError(f"SparK needs power-of-two feature reductions, got {reductions}")
    idx = [by_reduction[r] for r in reductions]
    chans = [int(feature_info[i]["num_chs"]) for i in idx]
    return idx, chans, reductions


class SparseEncoder(nn.Module):
    """Wraps a timm CNN; ``forward(x, active)`` returns stage features, finest first.

    ``active`` is the bool patch-grid mask (B, 1, H/r, W/r) with r = :attr:`downsample_ratio`.
    Masked input pixels are zeroed here as well, so callers may pass the raw image.
    """

    def __init__(self, backbone: nn.Module, sync_bn: bool = False):
        super().__init__()
        info = getattr(backbone, "feature_info", None)
        if not isinstance(info, list) or not hasattr(backbone, "forward_intermediates"):
            raise TypeError(f"{type(backbone).__name__} is not a timm model with feature_info and "
                            "forward_intermediates")
        self.backbone = backbone
        self.mask_ctx = MaskContext()
        cls_name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or "fc"
        sparsify_(backbone, self.mask_ctx, sync_bn=sync_bn, skip=(cls_name, "head", "fc", "classifier"))
        self.feature_indices, self.channels, self.reductions = _stage_indices(info)
        self.downsample_ratio = self.reductions[-1]

    @property
    def levels(self) -> int:
        """Number of 2x upsamplings from the coarsest feature map back to the input resolution."""
        return int(math.log2(self.downsample_ratio))

    def check_input(self, x: torch.Tensor) -> None:
        r = self.downsample_ratio
        h, w = x.shape[-2:]
        if h % r or w % r:
            raise ValueError(f"SparK input {h}x{w} must be a multiple of the encoder's downsample ratio {r}")

    def forward(self, x: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        r = self.downsample_ratio
        if self.mask_ctx.active is active:  # the caller already holds the mask (and its cache)
            feats = self._forward_masked(x)
        else:
            with self.mask_ctx.masked(active):
                feats = self._forward_masked(x)
        if feats[-1].shape[-1] != x.shape[-1] // r:
            raise RuntimeError(f"deepest feature {tuple(feats[-1].shape)} does not match downsample ratio {r}")
        return list(feats)

    def _forward_masked(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x * self.mask_ctx.at(x.shape[-2], x.shape[-1], x.dtype)
        return self.backbone.forward_intermediates(
            x, indices=self.feature_indices, intermediates_only=True, stop_early=True)


__all__ = ["SparseEncoder"]

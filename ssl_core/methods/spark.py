"""SparK (Tian et al., ICLR 2023): masked image modelling for CNNs via sparse convolution.

Per step: crop + flip the HU slices and window them to ``in_chans`` channels; mask 60 % of the
patches (patch = the encoder's downsample ratio, 32 for ResNet and ConvNeXt); run the encoder as a
sparse CNN on the visible patches only; densify its stage features with mask tokens; decode with a
light UNet; and regress the per-patch-normalised pixels of the *masked* patches.

Optimiser (official ``pretrain/`` code): LAMB, lr = 2e-4 x batch / 256, betas (0.9, 0.95) for
ResNets and (0.9, 0.999) for ConvNeXts, gradient-norm clip 5, weight decay cosine 0.04 -> 0.2,
40 warmup epochs (of 1600).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ssl_core.augment import MultiView, spark_views
from ssl_core.backbones import create_backbone
from ssl_core.ct_window import WindowSpec
from ssl_core.methods import METHODS
from ssl_core.methods.base import OptimizerDefaults, SSLMethod, StepContext
from ssl_core.methods.common import prepare_input
from ssl_core.spark.decoder import Densify, LightDecoder
from ssl_core.spark.encoder import SparseEncoder
from ssl_core.spark.sparse import random_mask

log = logging.getLogger(__name__)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C*p*p), patches in row-major order of the patch grid."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, chans: int, hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    gh, gw = hw[0] // p, hw[1] // p
    x = x.reshape(b, gh, gw, chans, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, chans, gh * p, gw * p)


def masked_patch_loss(target: torch.Tensor, recon: torch.Tensor, active: torch.Tensor, patch: int,
                      eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error on per-patch-normalised pixels, averaged over masked patches only.

    Each target patch is normalised by its own mean and (unbiased) std, so the loss rewards structure
    rather than a patch's brightness. ``active`` (B, 1, h, w) is True for visible patches; those
    contribute nothing, whatever ``recon`` holds there.
    """
    t = patchify(target.float(), patch)
    r = patchify(recon.float(), patch)
    mean = t.mean(dim=-1, keepdim=True)
    std = (t.var(dim=-1, keepdim=True) + eps).sqrt()
    t = (t - mean) / std
    per_patch = (r - t).pow(2).mean(dim=-1)  # (B, L)
    masked = (~active).flatten(1).to(per_patch.dtype)  # (B, L)
    # where(), not a multiplication: a visible patch must not leak in even through inf/nan
    per_patch = torch.where(masked > 0, per_patch, torch.zeros_like(per_patch))
    return per_patch.sum() / masked.sum().clamp(min=1.0)


#: how far the mask ratio a patch grid realises may be from the requested one before a run is refused
MASK_RATIO_TOLERANCE = 0.05


def masked_patches(cells: int, mask_ratio: float) -> int:
    """Patches :func:`ssl_core.spark.sparse.random_mask` masks on a grid of ``cells``: it keeps
    ``round(cells x (1 - ratio))`` visible, at least one and at most ``cells - 1``."""
    keep = min(max(round(cells * (1.0 - mask_ratio)), 1), cells - 1)
    return cells - keep


def effective_mask_ratio(grid: int, mask_ratio: float) -> float:
    """The share of a ``grid x grid`` patch grid that is masked at ``mask_ratio``: a small grid can only
    mask whole patches (2x2 at 0.6 masks 2 of 4, i.e. 0.5)."""
    cells = grid * grid
    return masked_patches(cells, mask_ratio) / cells


def mask_grid_problem(img_size: int, patch: int, mask_ratio: float, backbone: str = "the encoder",
                      tolerance: float = MASK_RATIO_TOLERANCE) -> str | None:
    """One line naming the realised mask ratio and image sizes that realise the requested one, or None
    when the grid realises it within ``tolerance``.

    A mask ratio that silently becomes another changes the pretext task (SparK's ablation: 0.6 is
    the sweet spot); at 64 px a ResNet's 32-px patches make a 2x2 grid where 0.6 means 0.5.
    """
    grid = img_size // patch
    eff = effective_mask_ratio(grid, mask_ratio)
    if abs(eff - mask_ratio) <= tolerance:
        return None
    ok = [g for g in range(2, max(4 * grid, 16) + 1)
          if abs(effective_mask_ratio(g, mask_ratio) - mask_ratio) <= tolerance]
    picks: list[int] = []
    below = [g for g in ok if g < grid]
    above = [g for g in ok if g > grid]
    if below:
        picks.append(below[-1])
    if above:
        picks.append(above[0])
        exact = [g for g in above if abs(effective_mask_ratio(g, mask_ratio) - mask_ratio) < 0.005]
        if exact and exact[0] not in picks:
            picks.append(exact[0])
    sizes = " or ".join(f"{g * patch} ({g}x{g}: {effective_mask_ratio(g, mask_ratio):.2f})" for g in picks)
    cells = grid * grid
    return (f"{backbone}'s {patch}-px patches make a {grid}x{grid} grid, so mask ratio {mask_ratio:g} would mask "
            f"{masked_patches(cells, mask_ratio)} of {cells} patches ({eff:.2f}); use "
            + (f"--img-size {sizes}, or " if sizes else "")
            + f"--method-option mask_ratio={round(eff, 2):g}")


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def _uses_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@METHODS.register("spark")
class SparK(SSLMethod):
    """Sparse masked modelling around any timm ResNet / ConvNeXt.

    ``densify_norm="auto"`` picks batch norm for BN backbones (ResNets) and layer norm otherwise
    (ConvNeXts), as the official code does.
    """

    #: the method's default view recipe (``views=`` overrides it); :func:`ssl_core.methods.create_views`
    VIEWS = staticmethod(spark_views)

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        in_chans: int = 1,
        img_size: int = 224,
        mask_ratio: float = 0.6,
        decoder_width: int = 768,
        densify_norm: str = "auto",
        windows: Sequence[WindowSpec] | None = None,
        sync_bn: bool = False,
        views: MultiView | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        net = (create_backbone(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
               if isinstance(backbone, str) else backbone)
        self.backbone_name = backbone if isinstance(backbone, str) else type(backbone).__name__
        self.in_chans = in_chans
        self.img_size = img_size
        self.mask_ratio = mask_ratio
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        is_bn = _uses_batch_norm(net)
        self.sparse_encoder = SparseEncoder(net, sync_bn=sync_bn)
        self.patch = self.sparse_encoder.downsample_ratio
        if img_size % self.patch:
            raise ValueError(f"img_size {img_size} must be a multiple of the patch size {self.patch} "
                             f"(the downsample ratio of {self.backbone_name})")
        if (img_size // self.patch) ** 2 < 2:
            raise ValueError(f"img_size {img_size} gives a single {self.patch}-px patch; use >= {2 * self.patch}")
        if densify_norm == "auto":
            densify_norm = "bn" if is_bn else "ln"
        self.densify = Densify(self.sparse_encoder.channels, self.sparse_encoder.reductions, decoder_width,
                               self.sparse_encoder.mask_ctx, norm=densify_norm, sync_bn=sync_bn)
        self.decoder = LightDecoder(self.sparse_encoder.levels, out_chans=in_chans, width=decoder_width)
        self.views = views or self.VIEWS(img_size, windows, in_chans)
        if len(self.views) != 1:
            raise ValueError(f"SparK takes exactly 1 view, the recipe makes {len(self.views)}")
        self._uses_bn = is_bn
        self._freeze_unused_head(net)
        # the ratio the patch grid realises is stated here; the pre-training driver refuses a large
        # difference (check_setup), a library user may mean it
        grid = img_size // self.patch
        realised = effective_mask_ratio(grid, mask_ratio)
        log.info("SparK: backbone %s, patch %d px, mask ratio %.2f%s, densify norm %s, decoder width %d, "
                 "stage widths %s", self.backbone_name, self.patch, mask_ratio,
                 "" if abs(realised - mask_ratio) < 0.005 else f" ({realised:.2f} on the {grid}x{grid} patch grid)",
                 densify_norm, decoder_width, self.sparse_encoder.channels)

    @staticmethod
    def _freeze_unused_head(net: nn.Module) -> None:
        """Head parameters (e.g. ConvNeXt's ``head.norm``) are never reached by the stage features;
        freezing them keeps DDP from waiting for their gradients. They are still exported."""
        cls_name = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or "fc"
        prefixes = {cls_name.split(".")[0], "head", "fc", "classifier"}
        for n, p in net.named_parameters():
            if n.split(".")[0] in prefixes:
                p.requires_grad_(False)

    # ---------------------------------------------------------------- model
    def grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        return hw[0] // self.patch, hw[1] // self.patch

    def make_mask(self, batch: int, hw: tuple[int, int], device: torch.device,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        return random_mask(batch, self.grid(hw), self.mask_ratio, device=device, generator=generator)

    def reconstruct(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, in_chans, H, W) for windowed images ``x`` and patch mask ``active``."""
        ctx = self.sparse_encoder.mask_ctx
        with ctx.masked(active):
            feats = self.sparse_encoder(x, active)
            dense = self.densify(feats)
        return self.decoder(dense)

    def masked_loss(self, x: torch.Tensor, active: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss on windowed images ``x`` (B, in_chans, H, W); a random mask unless ``active`` is given.

        Returns ``loss``, the reconstruction ``recon`` (normalised-patch units) and the mask ``active``.
        """
        x = prepare_input(x)
        if active is None:
            active = self.make_mask(x.shape[0], (x.shape[-2], x.shape[-1]), x.device, generator)
        recon = self.reconstruct(x, active)
        if recon.requires_grad:
            # The loss patchifies with a permute, so the gradient reaching the decoder would arrive with
            # permuted strides, and oneDNN's convolution backward on such a tensor is several times
            # slower (figures in docs/benchmarks.md).
            recon.register_hook(_contiguous)
        loss = masked_patch_loss(x, recon, active, self.patch)
        return {"loss": loss, "recon": recon, "active": active}

    # ---------------------------------------------------------------- SSLMethod
    def training_step(self, images: torch.Tensor, ctx: StepContext,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        (view,) = self.views(images, generator=generator)
        out = self.masked_loss(view, generator=generator)
        return {"loss": out["loss"], "visible_fraction": out["active"].float().mean()}

    def encoder(self) -> nn.Module:
        return self.sparse_encoder.backbone

    def optimizer_defaults(self) -> OptimizerDefaults:
        return OptimizerDefaults(
            name="lamb", base_lr=2e-4, weight_decay=0.04, weight_decay_end=0.2, base_batch_size=256,
            warmup_epochs=40.0,
            extra={"betas": (0.9, 0.95 if self._uses_bn else 0.999), "max_grad_norm": 5.0},
        )

    def check_setup(self) -> None:
        """Refuse a mask ratio the patch grid cannot realise (see :func:`mask_grid_problem`)."""
        problem = mask_grid_problem(self.img_size, self.patch, self.mask_ratio, self.backbone_name)
        if problem:
            raise ValueError(problem)

    def param_groups(self) -> list[dict[str, Any]]:
        """Mask tokens, norms and biases get no weight decay (the official recipe)."""
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or n.endswith(".bias") or "mask_tokens" in n or n.endswith("gamma"):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["SparK", "effective_mask_ratio", "mask_grid_problem", "masked_patch_loss", "masked_patches", "patchify",
           "unpatchify"]

"""SparK's decoder side: densify the sparse stage features, then a light UNet back to pixels.

Densify (per level, coarsest first): normalise the sparse feature over visible positions only,
fill masked positions with a learnable mask token, and project to the decoder's width at that level.
The decoder is a stack of 2x-upsampling blocks whose width halves at every level (768 -> 24 for a
32x-downsampling encoder); each block adds the densified feature of its resolution before upsampling,
and a 1x1 convolution maps the full-resolution map to the image's channels.
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_core.spark.sparse import MaskContext, sparsify_


class UpBlock(nn.Module):
    """2x transposed-conv upsampling, then two 3x3 conv + BN (ReLU6 between them)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


def decoder_widths(width: int, levels: int) -> list[int]:
    """Widths from the coarsest level to full resolution: ``width, width/2, ...`` (``levels + 1`` values)."""
    widths = [width // 2**i for i in range(levels + 1)]
    if widths[-1] < 1:
        raise ValueError(f"decoder width {width} is too small for {levels} upsampling levels")
    return widths


class LightDecoder(nn.Module):
    """``levels`` upsampling blocks; ``forward(feats)`` takes densified features, coarsest first."""

    def __init__(self, levels: int, out_chans: int, width: int = 768):
        super().__init__()
        self.width = width
        widths = decoder_widths(width, levels)
        self.blocks = nn.ModuleList(UpBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.proj = nn.Conv2d(widths[-1], out_chans, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[torch.Tensor | None]) -> torch.Tensor:
        x: torch.Tensor | int = 0
        for i, block in enumerate(self.blocks):
            if i < len(feats) and feats[i] is not None:
                x = x + feats[i]
            x = block(x)
        return self.proj(x)


class Densify(nn.Module):
    """Sparse encoder features (finest first) -> dense decoder inputs (coarsest first).

    ``norm="bn"`` (ResNets, as in the paper) normalises with batch statistics of visible positions
    only; ``"ln"`` (ConvNeXts) normalises each position; ``"none"`` skips it. The norm layers are
    sparse layers bound to the encoder's :class:`MaskContext`, so call this inside ``mask_ctx.masked``.
    """

    def __init__(self, enc_channels: list[int], enc_reductions: list[int], dec_width: int,
                 mask_ctx: MaskContext, norm: str = "bn", sync_bn: bool = False):
        super().__init__()
        coarsest = enc_reductions[-1]
        levels = []
        for r in reversed(enc_reductions):
            level = (coarsest // r).bit_length() - 1
            if coarsest // r != 2**level:
                raise ValueError(f"feature reductions {enc_reductions} are not powers of two apart")
            levels.append(level)
        self.levels = levels  # decoder level of each feature, coarsest first
        self.mask_tokens = nn.ParameterList()
        self.norms = nn.ModuleList()
        self.projs = nn.ModuleList()
        for level, ch in zip(levels, reversed(enc_channels), strict=True):
            token = nn.Parameter(torch.zeros(1, ch, 1, 1))
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.norms.append(_make_norm(norm, ch))
            out = dec_width // 2**level
            if level == 0 and ch == out:
                self.projs.append(nn.Identity())
            else:
                k = 1 if level == 0 else 3
                self.projs.append(nn.Conv2d(ch, out, kernel_size=k, padding=k // 2, bias=True))
        for p in self.projs:
            if isinstance(p, nn.Conv2d):
                nn.init.trunc_normal_(p.weight, std=0.02)
                nn.init.zeros_(p.bias)
        sparsify_(self.norms, mask_ctx, sync_bn=sync_bn)
        self.mask_ctx = mask_ctx

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor | None]:
        active = self.mask_ctx.active
        if active is None:
            raise RuntimeError("Densify must run inside the encoder's mask context")
        n_levels = max(self.levels) + 1
        out: list[torch.Tensor | None] = [None] * n_levels
        for i, f in enumerate(reversed(feats)):
            f = self.norms[i](f)
            m = self.mask_ctx.at(f.shape[-2], f.shape[-1], f.dtype)
            f = torch.where(m > 0, f, self.mask_tokens[i].to(f.dtype))
            out[self.levels[i]] = self.projs[i](f)
        return out


def _make_norm(kind: str, ch: int) -> nn.Module:
    from timm.layers import LayerNorm2d

    factories = {"bn": lambda: nn.BatchNorm2d(ch), "ln": lambda: LayerNorm2d(ch, eps=1e-6),
                 "none": nn.Identity}
    try:
        return factories[kind]()
    except KeyError:
        raise ValueError(f"unknown densify norm {kind!r}; choose one of {', '.join(factories)}") from None


__all__ = ["Densify", "LightDecoder", "UpBlock", "decoder_widths"]

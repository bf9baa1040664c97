"""Sparse versions of dense CNN layers, for SparK's masked image modelling on ordinary timm CNNs.

SparK treats the visible patches of a masked image as a sparse point set. A dense CNN only respects
that if every layer that can move information between positions, or compute statistics over them,
ignores masked positions:

* convolutions and pooling keep their dense kernels but zero their output at masked positions, so a
  masked position is always exactly 0 (a constant) when the next layer reads it — nothing of the
  masked pixels can reach a visible position;
* batch norm computes its batch statistics (and running statistics) over visible positions only;
* layer norm and channel-wise linear layers are per-position already, so they only need their
  output (e.g. the bias) zeroed at masked positions.

Layers are converted *in place* by swapping each module's class for a subclass (``Conv2d`` ->
:class:`SparseConv2d` ...). Parameters and buffers stay where they were, so the model's state_dict
keeps exactly the timm layout and the pre-trained encoder is exported without any key mapping. With no
mask set, every sparse layer behaves exactly like its dense parent, so the same object still works as
a normal encoder (e.g. for a kNN probe during pre-training).

Supported: ResNet-style (Conv2d, BatchNorm2d, MaxPool2d, AvgPool2d) and ConvNeXt-style (Conv2d,
LayerNorm2d, channels-last LayerNorm + Linear) timm models. Layers that mix positions in ways these
rules do not cover (GroupNorm, instance norm, ...) raise an error at conversion time instead of
silently leaking masked content.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from timm.layers import BatchNormAct2d, LayerNorm, LayerNorm2d
from torch import nn

from ssl_core.spark.bn import masked_batch_stats, sparse_batch_norm


class MaskContext:
    """The visible-patch mask shared by all sparse layers of one encoder.

    ``active`` is a bool tensor (B, 1, h, w) on the patch grid: True = visible. Layers ask for the
    mask at their own resolution; each resolution is expanded once per forward and cached.
    """

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None
        self._cache: dict[tuple, torch.Tensor] = {}

    def set(self, active: torch.Tensor | None) -> None:
        if active is not None and (active.ndim != 4 or active.shape[1] != 1):
            raise ValueError(f"mask must be shaped (B, 1, h, w), got {tuple(active.shape)}")
        self.active = active
        self._cache = {}

    @contextmanager
    def masked(self, active: torch.Tensor) -> Iterator[None]:
        """Make the sparse layers use ``active`` inside the ``with`` block, and dense behaviour after."""
        self.set(active)
        try:
            yield
        finally:
            self.set(None)

    def at(self, h: int, w: int, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor | None:
        """Float mask (B, 1, h, w) — or (B, h, w, 1) with ``channels_last`` — or None when unmasked."""
        if self.active is None:
            return None
        key = (h, w, dtype, channels_last)
        m = self._cache.get(key)
        if m is None:
            gh, gw = self.active.shape[-2:]
            if h % gh or w % gw:
                raise ValueError(
                    f"feature map {h}x{w} is not a whole multiple of the {gh}x{gw} mask grid; "
                    f"the input size must be a multiple of the encoder's downsample ratio"
                )
            m = self.active.to(dtype)
            if h != gh:
                m = m.repeat_interleave(h // gh, dim=2)
            if w != gw:
                m = m.repeat_interleave(w // gw, dim=3)
            if channels_last:
                m = m.permute(0, 2, 3, 1)
            self._cache[key] = m
        return m


def _mask_nchw(ctx: MaskContext, y: torch.Tensor) -> torch.Tensor:
    m = ctx.at(y.shape[-2], y.shape[-1], y.dtype)
    # in place: conv / pooling / norm backward never reads its own output (autograd would refuse if so)
    return y if m is None else y.mul_(m)


def _mask_nhwc(ctx: MaskContext, y: torch.Tensor) -> torch.Tensor:
    if y.ndim != 4:
        return y  # e.g. (N, C) in a classifier head: no spatial positions to mask
    m = ctx.at(y.shape[1], y.shape[2], y.dtype, channels_last=True)
    return y if m is None else y.mul_(m)


class _SparseLayer:
    """Mixin marker; ``_sparse_ctx`` is attached by :func:`sparsify_`."""

    _sparse_ctx: MaskContext


class SparseConv2d(nn.Conv2d, _SparseLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_nchw(self._sparse_ctx, super().forward(x))


class SparseMaxPool2d(nn.MaxPool2d, _SparseLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_nchw(self._sparse_ctx, super().forward(x))


class SparseAvgPool2d(nn.AvgPool2d, _SparseLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_nchw(self._sparse_ctx, super().forward(x))


class SparseLayerNorm2d(LayerNorm2d, _SparseLayer):
    """timm's channels-first LayerNorm: per position, so only the output needs masking."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_nchw(self._sparse_ctx, super().forward(x))


class SparseLayerNorm(LayerNorm, _SparseLayer):
    """timm's LayerNorm over the last dim, applied to (N, H, W, C) inside ConvNeXt blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_nhwc(self._sparse_ctx, super().forward(x))


class SparseTorchLayerNorm(nn.LayerNorm, _SparseLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_nhwc(self._sparse_ctx, super().forward(x))


class SparseLinear(nn.Linear, _SparseLayer):
    """Channel-wise linear layer on (N, H, W, C): its bias would otherwise fill masked positions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_nhwc(self._sparse_ctx, super().forward(x))


class SparseBatchNorm2d(nn.BatchNorm2d, _SparseLayer):
    """BatchNorm2d over visible positions only (optionally synchronised across DDP ranks).

    Note: ``nn.SyncBatchNorm.convert_sync_batchnorm`` would replace this layer with a dense SyncBN;
    use ``sync=True`` (set by :func:`sparsify_`) instead.
    """

    sparse_sync: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._sparse_ctx.at(x.shape[-2], x.shape[-1], x.dtype)
        if m is None:
            return super().forward(x)
        return sparse_batch_norm(self, x, m, self.sparse_sync)


class SparseBatchNormAct2d(BatchNormAct2d, _SparseLayer):
    """timm's fused BN + activation, with SparK's visible-only statistics."""

    sparse_sync: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._sparse_ctx.at(x.shape[-2], x.shape[-1], x.dtype)
        if m is None:
            return super().forward(x)
        y = self.act(self.drop(sparse_batch_norm(self, x, m, self.sparse_sync)))
        return y * m


#: exact dense type -> its sparse counterpart (exact types: a subclass may change the maths)
SPARSE_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: SparseConv2d,
    nn.MaxPool2d: SparseMaxPool2d,
    nn.AvgPool2d: SparseAvgPool2d,
    nn.BatchNorm2d: SparseBatchNorm2d,
    BatchNormAct2d: SparseBatchNormAct2d,
    LayerNorm2d: SparseLayerNorm2d,
    LayerNorm: SparseLayerNorm,
    nn.LayerNorm: SparseTorchLayerNorm,
    nn.Linear: SparseLinear,
}

#: layers that mix positions and have no sparse rule here: converting them would leak masked content
_UNSUPPORTED = (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
                nn.MultiheadAttention, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
                nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)


def sparsify_(model: nn.Module, ctx: MaskContext, sync_bn: bool = False,
              skip: tuple[str, ...] = ()) -> nn.Module:
    """Convert ``model``'s layers in place to their sparse versions, all reading masks from ``ctx``.

    ``skip`` lists module-name prefixes left dense (e.g. a classifier head never run on sparse maps).
    Raises ``ValueError`` naming the first layer that cannot be made sparse.
    """
    for name, mod in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(mod, _SparseLayer):
            mod._sparse_ctx = ctx
            continue
        sparse_type = SPARSE_TYPES.get(type(mod))
        if sparse_type is None:
            if isinstance(mod, _UNSUPPORTED):
                raise ValueError(
                    f"layer {name or '<root>'} ({type(mod).__module__}.{type(mod).__name__}) has no "
                    f"sparse version; SparK supports {', '.join(t.__name__ for t in SPARSE_TYPES)}"
                )
            continue
        mod.__class__ = sparse_type
        mod._sparse_ctx = ctx
        if hasattr(sparse_type, "sparse_sync"):
            mod.sparse_sync = sync_bn
    return model


def densify_(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify_`: every sparse layer goes back to its dense class (weights untouched)."""
    inverse = {v: k for k, v in SPARSE_TYPES.items()}
    for mod in model.modules():
        if type(mod) in inverse:
            mod.__class__ = inverse[type(mod)]
            for attr in ("_sparse_ctx", "sparse_sync"):
                mod.__dict__.pop(attr, None)
    return model


def upsample_mask(active: torch.Tensor, factor: int) -> torch.Tensor:
    """Patch-grid mask (B, 1, h, w) -> pixel mask (B, 1, h*factor, w*factor)."""
    return active.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def random_mask(batch: int, grid: tuple[int, int], mask_ratio: float, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool (B, 1, h, w): True for the ``round(h*w*(1-mask_ratio))`` visible patches of each sample.

    At least one patch stays visible and at least one is masked, so the loss and the sparse
    statistics are always defined.
    """
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    h, w = grid
    n = h * w
    if n < 2:
        raise ValueError(f"a {h}x{w} patch grid cannot be masked; use an input of at least 2 patches")
    keep = min(max(round(n * (1.0 - mask_ratio)), 1), n - 1)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.rand(batch, n, generator=generator, device=gen_device).argsort(dim=1)[:, :keep]
    active = torch.zeros(batch, n, dtype=torch.bool, device=gen_device)
    active.scatter_(1, order, True)
    return active.view(batch, 1, h, w).to(device)


__all__ = ["SPARSE_TYPES", "MaskContext", "SparseBatchNorm2d", "SparseBatchNormAct2d", "SparseConv2d",
           "SparseLayerNorm", "SparseLayerNorm2d", "SparseLinear", "SparseMaxPool2d", "SparseAvgPool2d",
           "densify_", "masked_batch_stats", "random_mask", "sparsify_", "upsample_mask"]

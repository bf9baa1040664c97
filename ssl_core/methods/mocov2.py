"""MoCo v2 (Chen et al. 2020): contrast a query against its momentum-encoded key and a queue.

    q = normalize(head(backbone(v1)))                        # with gradients
    k = normalize(key_head(key_backbone(shuffle(v2))))       # momentum copy, no gradients, shuffle-BN
    loss = CE([q.k, q.queue] / T, label 0)                   # T = 0.2
    after the optimiser step: key <- m * key + (1 - m) * online (m = 0.999);
                              queue.enqueue(gather(k) over all DDP ranks)

The queue is sized from the data when the caller knows the pool (see :meth:`MoCoV2.options_for_pool`):
ImageNet's 65,536 keys would hold every image of a small CT pool several times over, so an image's
own older keys would be its negatives; a queue of a single batch, on the other hand, gives too few
negatives for the loss to leave chance.

Batch-norm cheating is prevented with shuffle-BN (the default) or SyncBN (``bn_mode="sync"``). The
cheat: a query and its key computed with batch norm over the same group of samples share that
group's statistics, and the network learns to spot the key of its own group among the queue's keys
of older groups instead of learning features. Under DDP shuffle-BN permutes the key batch across
ranks, so each rank's key BN sees another group than its queries. A single process has nothing to
shuffle across, so it emulates that: the key batch is permuted and the key encoder's batch norm
layers normalise ``shuffle_bn_groups`` sub-batches of it (default 4, 8 from a batch of 256), each
with its own statistics, in one forward; then the keys are put back in order. The query encoder keeps
whole-batch statistics. (The key encoder's running statistics are not updated while it does so; it
only ever runs in training mode.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

from ssl_core.augment import MultiView, mocov2_views
from ssl_core.backbones import create_backbone, feature_dim
from ssl_core.ct_window import WindowSpec
from ssl_core.distributed import (
    convert_sync_batchnorm,
    gather_no_grad,
    is_distributed,
    shuffle_batch,
    unshuffle_batch,
)
from ssl_core.heads import MLPHead, mocov2_head_dims
from ssl_core.losses import info_nce_queue_loss
from ssl_core.memory_queue import MemoryQueue
from ssl_core.methods import METHODS
from ssl_core.methods.base import OptimizerDefaults, SSLMethod, StepContext
from ssl_core.methods.common import prepare_input
from ssl_core.momentum import ema_update_, freeze

log = logging.getLogger(__name__)

BN_MODES = ("auto", "shuffle", "sync", "none")
DEFAULT_QUEUE_SIZE = 65536  # the paper's, for ImageNet's 1.28 M images
#: a queue shorter than this many batches gives too few negatives for a small batch (MoCo's point is
#: that the queue, not the batch, supplies them)
MIN_QUEUE_BATCHES = 4


def sub_batch_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    """Batch norm of ``x`` (N, C, H, W) with separate statistics for each of ``groups`` consecutive
    sub-batches of N / groups samples, in one pass: what ``groups`` forwards of N / groups samples
    each would compute, without running every convolution at a small batch: separate forwards of the
    sub-batches cost about twice this one-pass split on a GPU (docs/benchmarks.md). Statistics in
    float32; the output keeps ``x``'s dtype and
    memory format. Running statistics are not touched.

    On the CPU, for a contiguous float32 batch, each sub-batch (a contiguous slice of the batch) goes
    through PyTorch's own batch-norm kernel instead: the same statistics and output, and a CPU MoCo
    v2 key forward close to the cost of whole-batch batch norm (docs/benchmarks.md).
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        return torch.cat([F.batch_norm(part, None, None, weight, bias, True, 0.0, eps) for part in x.chunk(groups)])
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        xr = x.permute(0, 2, 3, 1).reshape(groups, -1, c)  # a view: (G, N/G*H*W, C)
        dims: tuple[int, ...] = (1,)
        per_channel = (1, 1, c)
    else:
        xr = x.reshape(groups, n // groups, c, h * w)
        dims, per_channel = (1, 3), (1, 1, c, 1)
    var, mean = torch.var_mean(xr.float(), dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float().view(per_channel)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float().view(per_channel)
    y = torch.addcmul(shift.to(x.dtype), xr, scale.to(x.dtype))
    if xr.dim() == 3:  # back from (G, N/G*H*W, C) to channels_last (N, C, H, W), no copy
        return y.view(n, h, w, c).permute(0, 3, 1, 2)
    return y.view(n, c, h, w)


class SubBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, while ``sub_batches > 1`` in training mode, normalises each of that many
    consecutive sub-batches with its own statistics (:func:`sub_batch_norm`)."""

    sub_batches: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sub_batches <= 1 or not self.training:
            return super().forward(x)
        return sub_batch_norm(x, self.sub_batches, self.weight, self.bias, self.eps)


class SubBatchNormAct2d(BatchNormAct2d):
    """timm's ``BatchNormAct2d`` (norm + activation in one module) with :class:`SubBatchNorm2d`'s rule."""

    sub_batches: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sub_batches <= 1 or not self.training:
            return super().forward(x)
        return self.act(self.drop(sub_batch_norm(x, self.sub_batches, self.weight, self.bias, self.eps)))


def enable_sub_batch_norm(module: nn.Module) -> list[nn.Module]:
    """Swap the batch-norm layers of ``module`` for their sub-batch versions in place (parameters and
    buffers stay, so the state_dict is unchanged); returns them. Other norm types are left alone."""
    swapped = []
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SubBatchNorm2d
        elif type(m) is BatchNormAct2d:
            m.__class__ = SubBatchNormAct2d
        elif not isinstance(m, SubBatchNorm2d | SubBatchNormAct2d):
            continue
        swapped.append(m)
    return swapped


def auto_shuffle_bn_groups(batch: int) -> int:
    """Sub-batches of a single process's emulated shuffle-BN: 4 (8 from a batch of 256, like the
    paper's 8 GPUs x 32), and 1 (no split) below 8 samples, where groups of one or two would make the
    key's BN statistics mostly noise."""
    if batch < 8:
        return 1
    return min(8, max(4, batch // 32))


@METHODS.register("mocov2")
class MoCoV2(SSLMethod):
    #: the method's default view recipe (``views=`` overrides it); :func:`ssl_core.methods.create_views`
    VIEWS = staticmethod(mocov2_views)

    def __init__(
        self,
        backbone: str = "resnet50",
        in_chans: int = 1,
        img_size: int = 224,
        windows: Sequence[WindowSpec] | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        temperature: float = 0.2,
        momentum: float = 0.999,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        bn_mode: str = "auto",
        shuffle_bn_groups: int | None = None,
        symmetric: bool = False,
        views: MultiView | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if shuffle_bn_groups is not None and shuffle_bn_groups < 1:
            raise ValueError(f"shuffle_bn_groups must be >= 1 (1 = no split), got {shuffle_bn_groups}")
        self.backbone = create_backbone(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
        d = feature_dim(self.backbone)
        h, o = mocov2_head_dims(d)
        h, o = hidden_dim or h, out_dim or o
        self.projector = MLPHead(d, h, o, batch_norm=False)  # MoCo v2: fc-ReLU-fc
        self.bn_mode = "shuffle" if bn_mode == "auto" else bn_mode
        self.shuffle_bn_groups = shuffle_bn_groups
        self._logged_groups: int | None = None
        if self.bn_mode == "sync":
            self.backbone = convert_sync_batchnorm(self.backbone)
        self.key_backbone = freeze(copy.deepcopy(self.backbone))
        # the key encoder's BN layers can normalise sub-batches (one-process shuffle-BN, see _key)
        self._key_bns = enable_sub_batch_norm(self.key_backbone) if self.bn_mode == "shuffle" else []
        self.key_projector = freeze(copy.deepcopy(self.projector))
        self.queue = MemoryQueue(queue_size, o)
        self.temperature, self.momentum, self.symmetric = temperature, momentum, symmetric
        self.views = views or self.VIEWS(img_size, windows, in_chans)
        if len(self.views) != 2:
            raise ValueError(f"MoCo v2 needs exactly 2 views, the recipe makes {len(self.views)}")
        self._pending_keys: torch.Tensor | None = None
        log.info("MoCo v2: backbone %s (width %d), head %d->%d->%d, queue %d keys, T=%.3g, m=%.4g, BN %s%s",
                 backbone, d, d, h, o, queue_size, temperature, momentum, self.bn_mode,
                 "" if self.bn_mode != "shuffle" else " across ranks" if is_distributed() else
                 f" emulated in {shuffle_bn_groups or 'auto'} sub-batches")

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(prepare_input(x))), dim=1)

    def key_bn_groups(self, batch: int) -> int:
        """Sub-batches the key encoder's batch norm is computed over for a local batch of ``batch``.

        Under DDP the cross-rank shuffle already separates the groupings, so the default is 1 there;
        an explicit ``shuffle_bn_groups`` applies in both cases. Never more groups than leave 2
        samples in each, and a divisor of the batch (equal sub-batches).
        """
        if self.bn_mode != "shuffle" or not self._key_bns:
            return 1
        g = self.shuffle_bn_groups
        if g is None:
            g = 1 if is_distributed() else auto_shuffle_bn_groups(batch)
        g = max(1, min(g, batch // 2))
        while batch % g:
            g -= 1
        return g

    def _key_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_backbone(prepare_input(x)))

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn_mode == "shuffle":
            xs, unshuffle = shuffle_batch(x)
            groups = self.key_bn_groups(xs.shape[0])
            if groups != self._logged_groups:
                log.info("MoCo v2 key encoder: batch norm over %d sub-batch(es) of a shuffled batch of %d%s",
                         groups, xs.shape[0], " per rank" if is_distributed() else "")
                self._logged_groups = groups
            # consecutive sub-batches of the shuffled batch: each gets its own BN statistics, a random
            # grouping of samples unlike the query encoder's whole batch
            for bn in self._key_bns:
                bn.sub_batches = groups
            try:
                k = self._key_encoder(xs)
            finally:
                for bn in self._key_bns:
                    bn.sub_batches = 1
            k = unshuffle_batch(k, unshuffle)
        else:
            k = self._key_encoder(x)
        return F.normalize(k.float(), dim=1)

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        v1, v2 = self.views(images)
        negatives = self.queue.negatives()
        if self.symmetric:
            q = self._query(torch.cat([v1, v2]))
            k = torch.cat([self._key(v2), self._key(v1)])
        else:
            q, k = self._query(v1), self._key(v2)
        loss = info_nce_queue_loss(q, k, negatives, self.temperature)
        self._pending_keys = k[: v1.shape[0]] if self.symmetric else k
        return {"loss": loss}

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        ema_update_(self.key_backbone, self.backbone, self.momentum)
        ema_update_(self.key_projector, self.projector, self.momentum)
        if self._pending_keys is not None:
            self.queue.enqueue(gather_no_grad(self._pending_keys))  # every rank's keys, rank order
            self._pending_keys = None

    def optimizer_defaults(self) -> OptimizerDefaults:
        # paper: SGD momentum 0.9, lr 0.03 x batch/256, weight decay 1e-4, cosine, no warm-up
        return OptimizerDefaults(name="sgd", base_lr=0.03, weight_decay=1e-4, base_batch_size=256,
                                 warmup_epochs=0.0, momentum=0.9)

    @classmethod
    def options_for_pool(cls, rows: int, batch_size: int, total_steps: int | None,
                         given: Collection[str] = ()) -> dict[str, Any]:
        """The queue for a pool of ``rows`` slices and a global ``batch_size``.

        A quarter of the pool (keys younger than a quarter epoch: an image's own previous key is
        rarely among its negatives), but at least :data:`MIN_QUEUE_BATCHES` batches where the pool
        holds more than that (one batch of negatives keeps the loss at chance), always fewer keys
        than the pool has slices, whole batches, at most the paper's 65,536. Returned only when it
        differs from the paper's default.
        """
        if "queue_size" in given:
            return {}
        size = moco_queue_size(rows, batch_size)
        return {"queue_size": size} if size < DEFAULT_QUEUE_SIZE else {}


def moco_queue_size(rows: int, batch_size: int, default: int = DEFAULT_QUEUE_SIZE) -> int:
    """See :meth:`MoCoV2.options_for_pool`."""
    if rows < 2 or batch_size < 1:
        raise ValueError(f"need at least 2 slices and a positive batch, got {rows}, {batch_size}")
    below_pool = rows - 1
    quarter = (rows // 4) // batch_size * batch_size
    several = min(MIN_QUEUE_BATCHES * batch_size, below_pool // batch_size * batch_size)
    size = min(max(quarter, several, batch_size), default, below_pool)
    return int(size)


__all__ = ["MoCoV2", "SubBatchNorm2d", "SubBatchNormAct2d", "auto_shuffle_bn_groups", "enable_sub_batch_norm",
           "moco_queue_size", "sub_batch_norm"]

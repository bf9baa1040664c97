"""The one interface every pre-training method implements.

A method owns its networks (online/target encoders, heads, prototypes, queues) and turns a batch of
*un-augmented* slices into a loss; augmentation lives inside the method because each method has its
own view recipe (two views, multi-crop, or SparK's crop + flip). Slices arrive in Hounsfield units and
the method's augmentation windows them (with window jitter where the recipe has it) into ``in_chans``
channels in [0, 1], so HU-window jitter is a real change of window, not a brightness trick. The training loop
therefore never changes when a method is added: it calls :meth:`SSLMethod.training_step` (the module's ``forward``, so
calling the method or its DDP wrapper is a step), steps the optimiser, then
:meth:`SSLMethod.after_optimizer_step` for EMA / queue / prototype work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ssl_core.augment import MultiView


@dataclass
class StepContext:
    """Where training is, so schedules (EMA tau, frozen prototypes, queue start) can depend on it."""

    step: int  # schedule step, 0-based: the global optimiser step, or a time budget's scaled position
    total_steps: int  # the schedules' length in the same unit
    epoch: int = 0
    total_epochs: int = 1  # 0 when a budget, not an epoch count, ends the run

    @property
    def progress(self) -> float:
        """Fraction of the run done, in [0, 1]: what a schedule given as a share of the run reads."""
        return min(max(self.step / self.total_steps, 0.0), 1.0) if self.total_steps > 0 else 1.0


@dataclass
class OptimizerDefaults:
    """The optimiser recipe from the method's paper, scaled later by batch size."""

    name: str  # "lars" | "lamb" | "sgd" | "adamw"
    base_lr: float  # lr for a batch of ``base_batch_size``
    weight_decay: float
    base_batch_size: int = 256
    warmup_epochs: float = 10.0
    momentum: float = 0.9
    weight_decay_end: float | None = None  # cosine weight-decay schedule end value (SparK 0.2)
    extra: dict[str, Any] = field(default_factory=dict)


class SSLMethod(nn.Module, ABC):
    """Base class: a pre-training method around a timm backbone."""

    #: registry name, set by ``@METHODS.register(name)`` (:data:`ssl_core.methods.METHODS`)
    name: str = ""
    #: constructor options counted in optimiser steps: a time-budgeted run cannot honour them, as its
    #: step count is unknown until it ends (its schedules see a scaled step, not the real one)
    step_count_options: tuple[str, ...] = ()
    #: the default view recipe, ``VIEWS(img_size, windows, in_chans, **options)`` -> MultiView
    #: (:mod:`ssl_core.augment`); each method sets its own
    VIEWS: Callable[..., MultiView]

    @classmethod
    def options_for_pool(cls, rows: int, batch_size: int, total_steps: int | None,
                         given: Collection[str] = ()) -> dict[str, Any]:
        """Constructor options sized from the pool, where the stock defaults assume ImageNet.

        ``rows`` slices, global ``batch_size``, ``total_steps`` schedule steps of the run (None when
        a time budget ends it and the step count is unknown). Options in ``given`` were set by the
        user and must not be suggested (the caller merges the user's on top anyway; ``given`` lets a
        method skip a suggestion that would contradict one). Default: nothing depends on the pool.
        """
        return {}

    def check_setup(self) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` for settings that build but would train something other than asked
        (SparK: a mask ratio its patch grid cannot realise). Called once before a run starts."""

    @abstractmethod
    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Augment ``images`` (N, 1, H, W float32 in HU, un-windowed) and return losses.

        The dict must hold ``"loss"`` (the scalar to back-propagate); other entries are logged.
        """

    def forward(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """:meth:`training_step`: calling the method (or its DDP wrapper) is a training step, which is
        what DistributedDataParallel needs to see to reduce the gradients of the loss."""
        return self.training_step(images, ctx)

    def after_optimizer_step(self, ctx: StepContext) -> None:  # noqa: B027 - optional hook
        """Momentum updates, queue pushes, prototype normalisation. Default: nothing."""

    def encoder(self) -> nn.Module:
        """The backbone whose weights are the product of pre-training (timm layout).

        Most methods keep it as ``self.backbone``; methods that wrap it (SparK's sparse encoder) override.
        """
        backbone = getattr(self, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise NotImplementedError(f"{type(self).__name__} has no `backbone` module: override encoder()")
        return backbone

    def optimizer_defaults(self) -> OptimizerDefaults:
        return OptimizerDefaults(name="adamw", base_lr=1e-3, weight_decay=0.05)

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameter groups; norm and bias parameters get no weight decay."""
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

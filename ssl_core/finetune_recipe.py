"""The settings of one fine-tuning run, kept free of torch so the CLI and the study file can read
their defaults without importing it (``ctssl --help`` stays quick)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: ct_window imports torch
    from ssl_core.ct_window import WindowSpec


@dataclass
class FineTuneRecipe:
    """How one fine-tuning run trains: the papers' recipe by default (70 epochs, the first 10 with the
    backbone frozen, Adam lr 1e-4, batch 64). ``select_metric`` picks the best epoch on validation
    data. Configs that expose these settings (a CLI, a study file) take their defaults from here, so
    each default is written once."""

    epochs: int = 70
    frozen_epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 5e-4
    batch_size: int = 64
    img_size: int | None = None  # None: keep the input size
    windows: Sequence[WindowSpec] | None = None  # None: default windows for the model's in_chans
    augment: bool = True
    crop_scale: tuple[float, float] = (0.85, 1.0)
    max_rotation_deg: float = 10.0
    train_bn_when_frozen: bool = False
    select_metric: str = "auc"  # any key of classification_metrics, or "loss" (lower is better)
    seed: int = 0
    #: re-estimate batch-norm running statistics on the (unaugmented) training images before every
    #: evaluation. With a few dozen labelled images an epoch is one or two batches, so the running
    #: averages never settle and evaluation runs on statistics of a network that no longer exists;
    #: exact statistics of the current weights fix that (for pre-trained encoders too: they adapt
    #: the encoder's statistics to the labelled data, as AdaBN does).
    bn_recalibrate: bool = False
    bn_recalibrate_max_images: int = 2048
    #: None: train exactly ``epochs`` (the papers' protocol). A number: ``epochs`` is the maximum and
    #: training stops after this many epochs without a validation improvement above ``min_delta``,
    #: counted from the first epoch with the backbone unfrozen (a frozen head-only phase often
    #: plateaus before unfreezing lifts it again)
    patience: int | None = None
    min_delta: float = 0.0
    #: with ``patience``: a run that reaches ``epochs`` while still improving continues once, for at
    #: most this many more epochs (0: never). Adam at a constant learning rate has no schedule tied to
    #: the maximum, so continuing equals re-running with the larger maximum, at half the cost
    extend_epochs: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or not 0 <= self.frozen_epochs <= self.epochs:
            raise ValueError(f"need epochs >= 1 and 0 <= frozen_epochs <= epochs, got "
                             f"epochs={self.epochs}, frozen_epochs={self.frozen_epochs}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None for a fixed epoch count), got {self.patience}")
        if not self.min_delta >= 0 or self.extend_epochs < 0:
            raise ValueError(f"need min_delta >= 0 and extend_epochs >= 0, got min_delta={self.min_delta}, "
                             f"extend_epochs={self.extend_epochs}")
        if self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"invalid lr={self.lr} or batch_size={self.batch_size}")

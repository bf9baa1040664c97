"""Fine-tuning a classifier on a pre-trained (or random) encoder, as in Wolf et al. (2023).

The recipe: Adam, lr 1e-4, weight decay 5e-4, batch 64, 70 epochs, with the backbone frozen for the
first 10 so the new, randomly initialised classifier settles before its gradients reach (and disturb)
the pre-trained features. With ``patience`` set, ``epochs`` is a maximum instead: training stops once
validation has not improved for ``patience`` epochs after the backbone unfreezes (:func:`should_stop`),
and a run still improving at the maximum can be continued once (``extend_epochs``), so the answer does
not depend on an epoch count chosen for speed. While frozen, the backbone's batch-norm layers also
stay in eval mode by default: their running statistics are part of the pre-trained encoder, and
letting them drift would change the frozen features under the classifier's feet.

Pure PyTorch: batches are any re-iterable of ``(images, labels)`` — in-memory tensors via
:class:`TensorBatches`, a DataLoader, a list — so Ray Tune trials, tests and notebooks all call the
same :meth:`FineTuner.fit`. Images arrive as HU slices (N, 1, H, W) and are windowed here to the
model's channels (with a light crop / flip / rotation for training), like pre-training.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ssl_core.augment import Compose, RandomResizedCrop, Window
from ssl_core.backbones import classifier_keys, load_encoder_state_dict
from ssl_core.ct_window import default_windows
from ssl_core.device import autocast, channels_last, default_device
from ssl_core.finetune_recipe import FineTuneRecipe
from ssl_core.metrics import classification_metrics
from ssl_core.optim import fused_kwargs

log = logging.getLogger(__name__)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def create_classifier(backbone: str, num_classes: int, in_chans: int = 1,
                      encoder_state: dict[str, torch.Tensor] | None = None, **timm_kwargs: Any) -> nn.Module:
    """A timm classifier; with ``encoder_state`` (an exported encoder) everything but the new
    classifier is loaded, otherwise it is randomly initialised (the from-scratch baseline)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if encoder_state is not None:
        return load_encoder_state_dict(backbone, encoder_state, in_chans=in_chans, num_classes=num_classes,
                                       **timm_kwargs)
    return timm.create_model(backbone, pretrained=False, in_chans=in_chans, num_classes=num_classes,
                             **timm_kwargs)


class TensorBatches:
    """Re-iterable mini-batches over in-memory tensors; reshuffled (seeded) on every pass."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("no images")
        self.images, self.labels = images, torch.as_tensor(labels).long()
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self._gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = torch.randperm(n, generator=self._gen) if self.shuffle else torch.arange(n)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for i in range(0, stop, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.images[idx], self.labels[idx]


def last_improvement(values: Sequence[float], min_delta: float = 0.0, lower_better: bool = False) -> int | None:
    """Epoch (index) of the last value that beat the reference by more than ``min_delta``; the
    reference is the value at the previous such improvement (the first finite value is one). NaN
    never improves; None when no value is finite. Small gains below ``min_delta`` do not move the
    reference, so a slow creep of noise-sized steps does not count as progress."""
    last, ref = None, math.nan
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        gain = (ref - v) if lower_better else (v - ref)
        if not math.isfinite(ref) or gain > min_delta:
            last, ref = i, v
    return last


def should_stop(values: Sequence[float], patience: int, min_delta: float = 0.0, frozen_epochs: int = 0,
                lower_better: bool = False) -> bool:
    """The early-stopping rule on the validation curve so far (one value per epoch): stop once
    ``patience`` epochs have passed without an improvement above ``min_delta``, counting from the
    later of the last improvement and the first unfrozen epoch. A flat curve from the start stops
    after ``frozen_epochs + patience`` epochs."""
    last = last_improvement(values, min_delta, lower_better)
    ref = max(-1 if last is None else last, frozen_epochs - 1)
    return len(values) - 1 - ref >= patience


def still_improving(values: Sequence[float], window: int, min_delta: float = 0.0,
                    lower_better: bool = False) -> bool:
    """True when the curve improved by more than ``min_delta`` within its last ``window`` epochs:
    a run ending like that was cut off by its maximum, not finished."""
    last = last_improvement(values, min_delta, lower_better)
    return last is not None and len(values) - 1 - last < window


def late_window(epochs: int) -> int:
    """The last 10 % of a fixed-length run (at least one epoch): where a best epoch means the run
    was still improving when it ended."""
    return max(1, math.ceil(epochs * 0.1))


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one entry per epoch: train and validation metrics
    best_epoch: int
    best_metrics: dict[str, float]
    best_state: dict[str, torch.Tensor] = field(repr=False)
    #: the early-stopping rule fired (validation stopped improving) rather than the maximum ending the run
    stopped_early: bool = False
    #: the run reached its maximum while still improving and was continued once (``extend_epochs``)
    extended: bool = False
    #: False when the run ended at its (extended) maximum with validation still improving: its best
    #: epoch is a lower bound on what more training gives, so comparisons resting on it are unsafe
    converged: bool = True
    max_epochs: int = 0  # the maximum in force when the run ended (config.epochs, plus any extension)

    @property
    def epochs_run(self) -> int:
        return len(self.history)


class FineTuner:
    """Owns model, optimiser and the freeze schedule; one instance per fine-tuning run."""

    def __init__(self, model: nn.Module, config: FineTuneRecipe | None = None,
                 device: torch.device | str | None = None):
        self.config = cfg = config or FineTuneRecipe()
        self.device = torch.device(device) if device is not None else default_device()
        self.model = channels_last(model.to(self.device), self.device)
        head = classifier_keys(model)
        if not head:
            raise ValueError(f"{type(model).__name__} has no classifier (build it with num_classes >= 2)")
        self.head_params = {n for n, _ in model.named_parameters() if n in head}
        self.backbone_modules = self._backbone_modules(model, head)
        in_chans = self._in_chans(model)
        windows = list(cfg.windows) if cfg.windows is not None else default_windows(in_chans)
        if len(windows) != in_chans:
            raise ValueError(f"{len(windows)} CT windows for a model with in_chans={in_chans}")
        self._window = Window(windows, None)
        self._gen = torch.Generator().manual_seed(cfg.seed)
        # Adam skips parameters without gradients, so one optimiser covers both phases
        params = list(model.parameters())
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused_kwargs(params))
        self.frozen = False

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _in_chans(model: nn.Module) -> int:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        raise ValueError(f"{type(model).__name__} has no Conv2d stem")

    @staticmethod
    def _backbone_modules(model: nn.Module, head_keys: set[str]) -> list[nn.Module]:
        head_prefixes = {k.rsplit(".", 1)[0] for k in head_keys}
        return [m for n, m in model.named_modules() if n and not any(
            n == p or n.startswith(p + ".") for p in head_prefixes)]

    def set_backbone_frozen(self, frozen: bool) -> None:
        for n, p in self.model.named_parameters():
            if n not in self.head_params:
                p.requires_grad_(not frozen)
        self.frozen = frozen

    def _train_mode(self) -> None:
        self.model.train()
        if self.frozen and not self.config.train_bn_when_frozen:
            for m in self.backbone_modules:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _prepare(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        cfg = self.config
        x = images.to(self.device, non_blocking=True).float()
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"fine-tuning expects HU slices (N, 1, H, W), got {tuple(images.shape)}")
        size = cfg.img_size or x.shape[-1]
        if train and cfg.augment:
            crop = RandomResizedCrop(size, scale=cfg.crop_scale, ratio=(0.9, 1.1), hflip_p=0.5,
                                     max_rotation_deg=cfg.max_rotation_deg)
            x = Compose([crop, self._window])(x, generator=self._gen)
        else:
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            x = self._window(x)
        return channels_last(x, self.device)

    @staticmethod
    def _check_reiterable(batches: Batches, what: str) -> None:
        if iter(batches) is batches:
            raise ValueError(f"{what} batches must be re-iterable (a list, DataLoader or TensorBatches), "
                             "not a one-shot iterator, since every epoch reads them again")

    # ------------------------------------------------------------ API
    def batches(self, images: torch.Tensor, labels: torch.Tensor, train: bool) -> TensorBatches:
        """In-memory batches of ``config.batch_size``; shuffled (seeded) for training."""
        return TensorBatches(images, labels, self.config.batch_size, shuffle=train, seed=self.config.seed)

    def train_one_epoch(self, batches: Batches, epoch: int) -> dict[str, float]:
        """One pass; the backbone is frozen iff ``epoch < frozen_epochs`` (epochs count from 0)."""
        self.set_backbone_frozen(epoch < self.config.frozen_epochs)
        self._train_mode()
        total, n, t0 = 0.0, 0, time.perf_counter()
        for images, labels in batches:
            x = self._prepare(images, train=True)
            y = torch.as_tensor(labels).long().to(self.device)
            with autocast(self.device):
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        if n == 0:
            raise ValueError("training batches were empty")
        dt = time.perf_counter() - t0
        return {"train_loss": total / n, "frozen": float(self.frozen), "train_images": float(n),
                "train_images_per_s": n / max(dt, 1e-9)}

    @torch.no_grad()
    def predict(self, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (N,), class probabilities (N, K))`` in batch order."""
        self.model.eval()
        ys, ps = [], []
        for images, labels in batches:
            x = self._prepare(images, train=False)
            with autocast(self.device):
                logits = self.model(x)
            ps.append(logits.float().softmax(dim=1).cpu())
            ys.append(torch.as_tensor(labels).long().cpu())
        if not ys:
            raise ValueError("evaluation batches were empty")
        return torch.cat(ys).numpy(), torch.cat(ps).numpy()

    def evaluate(self, batches: Batches, prefix: str = "val_") -> dict[str, float]:
        return self.metrics(*self.predict(batches), prefix=prefix)

    @torch.no_grad()
    def recalibrate_bn(self, batches: Batches) -> int:
        """Set every batch-norm layer's running mean / variance to the exact average over ``batches``
        (evaluation-time preprocessing, no augmentation); returns the number of images used.

        Uses a cumulative average (``momentum=None``), so the result does not depend on batch order,
        and restores each layer's momentum afterwards; at most ``bn_recalibrate_max_images`` images
        are read, so the cost stays below one training epoch on large sets."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        if not bns:
            return 0
        was_training = self.model.training
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        self.model.eval()
        for m in bns:
            m.train()
        n = 0
        try:
            for images, _ in batches:
                if n >= self.config.bn_recalibrate_max_images:
                    break
                if len(images) < 2 and n:  # a lone last image adds noise and can break 1x1 feature maps
                    continue
                x = self._prepare(images, train=False)
                with autocast(self.device):
                    self.model(x)
                n += len(images)
        finally:
            for m, mom in zip(bns, momenta, strict=True):
                m.momentum = mom
            self.model.train(was_training)
        return n

    @staticmethod
    def metrics(y: np.ndarray, p: np.ndarray, prefix: str = "val_") -> dict[str, float]:
        """Metrics and mean negative log-likelihood of predictions from :meth:`predict`."""
        out = {f"{prefix}{k}": v for k, v in classification_metrics(y, p).items()}
        nll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()
        out[f"{prefix}loss"] = float(nll)
        return out

    def fit(self, train: Batches, val: Batches, epochs: int | None = None,
            on_epoch: Callable[[dict[str, float]], None] | None = None) -> FitResult:
        """Train for ``epochs`` (default: config), evaluating on ``val`` after every epoch.

        The best epoch maximises ``val_<select_metric>`` (minimises for ``loss``; the earliest wins a
        tie, and a NaN never wins); its weights are kept on CPU in :attr:`FitResult.best_state`.
        ``on_epoch`` receives each epoch's record (e.g. to report to Ray Tune or MLflow).
        With ``config.patience`` the run stops early on validation (:func:`should_stop`) and, still
        improving at the maximum, continues once by up to ``config.extend_epochs``; without it exactly
        ``epochs`` are trained. :attr:`FitResult.converged` says whether the run ended improving.
        """
        self._check_reiterable(train, "training")
        self._check_reiterable(val, "validation")
        cfg = self.config
        epochs = epochs or cfg.epochs
        key = f"val_{cfg.select_metric}"
        lower_better = cfg.select_metric == "loss"
        history: list[dict[str, float]] = []
        curve: list[float] = []
        best_epoch, best_val, best_state = -1, math.nan, None
        stopped, extended, limit = False, False, epochs
        t_start = time.perf_counter()
        epoch = -1
        while epoch + 1 < limit:
            epoch += 1
            rec = {"epoch": float(epoch), **self.train_one_epoch(train, epoch)}
            if self.config.bn_recalibrate:
                self.recalibrate_bn(train)
            rec.update(self.evaluate(val))
            if key not in rec:
                raise ValueError(f"select_metric {self.config.select_metric!r} is not one of "
                                 f"{sorted(k[4:] for k in rec if k.startswith('val_'))}")
            history.append(rec)
            v = rec[key]
            better = math.isfinite(v) and (not math.isfinite(best_val) or
                                           (v < best_val if lower_better else v > best_val))
            if better or best_state is None:
                best_epoch, best_val = epoch, v
                best_state = {k: t.detach().to("cpu", copy=True) for k, t in self.model.state_dict().items()}
            curve.append(v)
            elapsed = time.perf_counter() - t_start
            eta = elapsed / (epoch + 1) * (limit - epoch - 1)
            log.info("fine-tune epoch %d/%d%s: train_loss %.4f, %s %.4f (best %.4f @ %d), "
                     "%.1f img/s, ETA %.0fs%s", epoch + 1, limit, " [frozen]" if rec["frozen"] else "",
                     rec["train_loss"], key, v, best_val, best_epoch, rec["train_images_per_s"], eta,
                     "" if cfg.patience is None else " at most")
            if on_epoch is not None:
                on_epoch(rec)
            if cfg.patience is None:
                continue
            if should_stop(curve, cfg.patience, cfg.min_delta, cfg.frozen_epochs, lower_better):
                stopped = True
                log.info("fine-tuning stopped after %d epochs: no %s gain above %g in %d epochs", epoch + 1,
                         key, cfg.min_delta, cfg.patience)
                break
            if (epoch + 1 == limit and not extended and cfg.extend_epochs > 0
                    and still_improving(curve, cfg.patience, cfg.min_delta, lower_better)):
                extended, limit = True, limit + cfg.extend_epochs
                log.info("still improving at the maximum of %d epochs: continuing once, to at most %d",
                         epochs, limit)
        assert best_state is not None
        window = cfg.patience if cfg.patience is not None else late_window(limit)
        converged = stopped or not still_improving(curve, window, cfg.min_delta, lower_better)
        return FitResult(history, best_epoch, history[best_epoch], best_state, stopped_early=stopped,
                         extended=extended, converged=converged, max_epochs=limit)


__all__ = ["FineTuneRecipe", "FineTuner", "FitResult", "TensorBatches", "create_classifier", "last_improvement",
           "late_window", "should_stop", "still_improving"]

"""The computation of one study cell — one encoder, one training subset, one seed — without Ray or MLflow.

A Tune trial (:mod:`ray_jobs.finetune.trial`) wraps :func:`fit_cell` with its bookkeeping (MLflow child
run, Tune reports, predictions artifact); the fine-tuning benchmark runs the very same function back to
back in one process as the peer, and the real-data benchmark uses it for its few-label table. One
definition of "train every recipe, keep the best on validation, test that one" keeps the three equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_jobs.finetune.config import Recipe

#: the validation metric that picks the best epoch and the recipe
SELECT_METRIC = "val_auc"


def choose_recipe(fits: list[tuple[Recipe, float]]) -> int:
    """Index of the recipe with the highest best-epoch validation AUC; the first listed wins a tie and a
    NaN never wins (index 0 when every value is NaN). The test split is not an argument on purpose."""
    best, best_v = 0, float("nan")
    for i, (_, v) in enumerate(fits):
        if np.isfinite(v) and (not np.isfinite(best_v) or v > best_v):
            best, best_v = i, v
    return best


def late_best(best_epoch: int, epochs: int) -> bool:
    """True when the best validation epoch lies in the last 10 % of training (at least the last epoch):
    the curve was still rising, so the cell may be under-trained."""
    last = max(1, math.ceil(epochs * 0.1))
    return best_epoch >= epochs - last


@dataclass
class CellResult:
    """What :func:`fit_cell` found: the chosen recipe, every recipe's best validation AUC, the chosen
    fit (its per-epoch history and best epoch) and the test split's labels and class probabilities."""

    recipe: Recipe
    index: int
    fits: list[tuple[Recipe, float]]
    fit: Any  # ssl_core.finetune.FitResult of the chosen recipe
    y_test: np.ndarray
    p_test: np.ndarray

    @property
    def best_val(self) -> float:
        return float(self.fit.best_metrics.get(SELECT_METRIC, float("nan")))


def fit_cell(images: Any, labels: Any, train: np.ndarray, val: np.ndarray, test: np.ndarray, *,
             recipes: Sequence[Recipe], make_model: Callable[[], Any], epochs: int, seed: int, init_seed: int,
             finetune_kwargs: dict[str, Any],
             on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> CellResult:
    """Train every recipe on ``train`` from the same head initialisation (``init_seed``), keep the one
    whose best epoch has the highest validation AUC, and predict ``test`` with its best-epoch weights.

    ``images`` is an (N, H, W) float tensor of HU (or standardised grey) slices, ``labels`` (N,) class
    indices; the index arrays pick rows. ``finetune_kwargs`` are the remaining
    :class:`ssl_core.finetune.FineTuneRecipe` fields (batch size, windows, weight decay, ...).
    ``on_epoch(recipe_index, record)`` sees every epoch of every recipe. Only the chosen recipe's model
    is kept alive, so memory holds at most two models at a time."""
    import torch

    from ssl_core.finetune import FineTuner, FineTuneRecipe

    def part(ft: FineTuner, idx: np.ndarray, is_train: bool):
        ix = torch.tensor(np.asarray(idx))  # a copy: split indices may be read-only views (object store)
        return ft.batches(images[ix].unsqueeze(1), labels[ix], train=is_train)

    fits: list[tuple[Recipe, float]] = []
    best: tuple[Any, Any] | None = None  # (FineTuner, FitResult) of the best recipe so far
    for i, recipe in enumerate(recipes):
        torch.manual_seed(init_seed)  # every recipe starts from the same head initialisation
        ft = FineTuner(make_model(), FineTuneRecipe(epochs=epochs, frozen_epochs=recipe.frozen_epochs, lr=recipe.lr,
                                                    select_metric="auc", seed=seed, **finetune_kwargs))
        cb = None if on_epoch is None else (lambda rec, i=i: on_epoch(i, rec))
        fit = ft.fit(part(ft, train, True), part(ft, val, False), on_epoch=cb)
        fits.append((recipe, float(fit.best_metrics.get(SELECT_METRIC, float("nan")))))
        if choose_recipe(fits) == i:
            best = (ft, fit)
        del ft
    chosen = choose_recipe(fits)
    assert best is not None
    ft, fit = best
    ft.model.load_state_dict(fit.best_state)
    y, p = ft.predict(part(ft, test, False))
    return CellResult(recipe=recipes[chosen], index=chosen, fits=fits, fit=fit, y_test=y, p_test=p)


__all__ = ["SELECT_METRIC", "CellResult", "choose_recipe", "fit_cell", "late_best"]

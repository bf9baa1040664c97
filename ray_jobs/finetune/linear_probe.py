"""Linear-probe evaluation of frozen encoders on the fine-tuning study's cells.

What most SSL papers report next to fine-tuning: the encoder is frozen, every labelled slice is embedded
once, and a logistic regression is fitted per (size, fold, seed) cell on exactly the training rows the
fine-tuning study uses (:func:`ray_jobs.finetune.folds.nested_subset` of the fold's training part). It
takes seconds where fine-tuning takes minutes, so it is a cheap second view of the same encoders.

The regularisation strength C is chosen on the fold's validation rows only (by AUC); the test rows are
scored once with the chosen model, with the AUC function the fine-tuning study uses.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ray_jobs.finetune.data import LabelledData
from ray_jobs.finetune.encoders import EncoderSpec
from ray_jobs.finetune.folds import FoldSplit, nested_subset
from ray_jobs.trial_record import SizeSpec
from ssl_core.ct_window import dataset_windows
from ssl_core.probe import auc_ovr

C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)


def embed_labelled(spec: EncoderSpec, data: LabelledData, *, batch: int = 128, img_size: int | None = None,
                   device: str | None = None) -> np.ndarray:
    """(N, D) pooled backbone features of every labelled slice, encoder frozen.

    The input is prepared as fine-tuning prepares it: the encoder's pre-training windows, else the
    labelled set's (8-bit data standardised by its own statistics), resized to ``img_size`` (None: the
    slices' own size). A random-init encoder is seeded so its features are reproducible.
    """
    from ssl_core.finetune import create_classifier
    from ssl_core.probe import embed

    windows = spec.config.get("windows") or dataset_windows(data.intensity, data.intensity_stats, spec.in_chans)
    torch.manual_seed(0)
    model = create_classifier(spec.backbone, num_classes=2, in_chans=spec.in_chans, encoder_state=spec.state)
    model.reset_classifier(0)  # pooled features, the input fine-tuning's new head sees
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    return embed(model, np.asarray(data.images, np.float32), img_size=img_size, windows=windows,
                 in_chans=spec.in_chans, batch_size=batch, device=dev)


def _scores(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) probabilities; classes absent from the training rows get zero."""
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def fit_probe(emb: np.ndarray, labels: np.ndarray, train: np.ndarray, val: np.ndarray, test: np.ndarray,
              n_classes: int, grid: Sequence[float] = C_GRID) -> dict:
    """Standardise on ``train``, choose C on ``val`` by AUC (ties: the smaller C), score ``test`` once."""
    from sklearn.linear_model import LogisticRegression

    mu = emb[train].mean(0)
    sd = emb[train].std(0)
    sd[sd < 1e-8] = 1.0
    z = (emb - mu) / sd
    best: tuple[float, float, object] | None = None
    # one model refitted along the grid from the previous solution (warm start): the same optimum per C,
    # a fraction of the iterations
    m = LogisticRegression(C=grid[0], max_iter=2000, warm_start=True)
    for c in sorted(grid):
        m.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings at large C are expected and harmless
            m.fit(z[train], labels[train])
        v = auc_ovr(labels[val], _scores(m, z[val], n_classes))
        v = v if np.isfinite(v) else -np.inf
        if best is None or v > best[0]:
            best = (v, c, copy.deepcopy(m))
    v, c, m = best
    return {"auc": auc_ovr(labels[test], _scores(m, z[test], n_classes)),
            "val_auc": float(v) if np.isfinite(v) else float("nan"), "C": float(c), "n_train": int(len(train))}


def probe_cells(emb: np.ndarray, data: LabelledData, folds: list[FoldSplit], sizes: list[SizeSpec],
                seeds: list[int]) -> list[dict]:
    """One row per (size, fold, seed): {size, fold, seed, auc, val_auc, C, n_train, train_per_class_min};
    training rows are the fine-tuning study's nested subset of the fold's training part."""
    emb = np.asarray(emb, np.float64)
    labels = np.asarray(data.labels)
    n_classes = len(data.classes)
    rows = []
    for size in sizes:
        for fold in folds:
            for seed in seeds:
                train = nested_subset(fold.train, labels, size, seed)  # as trial.py calls it
                r = fit_probe(emb, labels, train, fold.val, fold.test, n_classes)
                per_class = np.bincount(labels[train], minlength=n_classes)
                rows.append({"size": size.label, "fold": fold.fold, "seed": seed, **r,
                             "train_per_class_min": int(per_class.min())})
    return rows

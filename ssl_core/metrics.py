"""Classification metrics for the fine-tuning study, with bootstrap confidence intervals.

Metrics (the ones Wolf et al. report): ``auc`` (binary ROC AUC; multi-class: macro average of
one-vs-rest AUCs), ``f1_macro``, ``f1_micro``, ``accuracy``, ``balanced_accuracy``. Point estimates
equal scikit-learn's (``roc_auc_score(multi_class="ovr", average="macro")``, ``f1_score`` with
``zero_division=0``, ``accuracy_score``, ``balanced_accuracy_score``).

Every metric is written in terms of per-sample *weights*: a bootstrap replicate is the same data
with multiplicities (how often each sample was drawn), so all replicates are computed at once as
matrix products and one sort of the scores, instead of re-running scikit-learn a thousand times.

Bootstrap and missing classes: a replicate that lacks a class present in the full sample would make
AUC undefined and change what "macro" averages over. Such replicates are **rejected and redrawn**
(up to ``max_draws_factor`` times the requested number), so every replicate estimates the same
quantity over the same classes; the number rejected is reported. Intervals are percentile intervals
over the accepted replicates. The generator is seeded, so results are reproducible per seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

ArrayLike = np.ndarray | Sequence


def _as_probs(y_score: ArrayLike) -> np.ndarray:
    """Scores as (N, K): a 1-D binary score s becomes columns (1 - s, s)."""
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim == 1:
        s = np.stack([1.0 - s, s], axis=1)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"scores must be (N,) for binary or (N, K>=2), got shape {s.shape}")
    return s


def _check(y_true: ArrayLike, probs: np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or len(y) != len(probs):
        raise ValueError(f"labels must be (N,) matching scores {probs.shape}, got shape {y.shape}")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1] - 1}] (one score column per class), "
                         f"got range [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- weighted kernels
def _weighted_auc(score: np.ndarray, pos: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for the binary labels ``pos`` under sample weights ``w`` (B, N) -> (B,).

    AUC = P(score_pos > score_neg) + P(tie) / 2, which is exactly the trapezoidal ROC area.
    Ties are grouped once; NaN where a replicate has no positive or no negative weight.
    """
    order = np.argsort(score, kind="mergesort")
    s, p = score[order], pos[order]
    ws = w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos_w = np.add.reduceat(ws * p, starts, axis=1)
    neg_w = np.add.reduceat(ws * (~p), starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w
    num = (pos_w * (below + 0.5 * neg_w)).sum(axis=1)
    den = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _auc(y: np.ndarray, probs: np.ndarray, w: np.ndarray) -> np.ndarray:
    k = probs.shape[1]
    if k == 2:
        return _weighted_auc(probs[:, 1], y == 1, w)
    per_class = np.stack([_weighted_auc(probs[:, c], y == c, w) for c in range(k)], axis=1)
    return per_class.mean(axis=1)  # NaN if any class lacks positives (sklearn raises there)


def _confusion(y: np.ndarray, pred: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """Weighted confusion matrices (B, K, K): rows = true class, columns = predicted class."""
    onehot = np.zeros((len(y), k * k))
    onehot[np.arange(len(y)), y * k + pred] = 1.0
    return (w @ onehot).reshape(-1, k, k)


def _accuracy(cm: np.ndarray) -> np.ndarray:
    return np.trace(cm, axis1=1, axis2=2) / cm.sum(axis=(1, 2))


def _balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    rows = cm.sum(axis=2)
    diag = np.diagonal(cm, axis1=1, axis2=2)
    present = rows > 0
    recall = np.where(present, diag / np.where(present, rows, 1.0), 0.0)
    return recall.sum(axis=1) / present.sum(axis=1)


def _f1_macro(cm: np.ndarray) -> np.ndarray:
    rows, cols = cm.sum(axis=2), cm.sum(axis=1)
    diag = np.diagonal(cm, axis1=1, axis2=2)
    labels = (rows + cols) > 0  # sklearn's default label set: classes in y_true or y_pred
    f1 = np.where(labels, 2.0 * diag / np.where(labels, rows + cols, 1.0), 0.0)
    return f1.sum(axis=1) / labels.sum(axis=1)


#: name -> f(labels, probs, confusion matrices, weights) -> per-replicate values (B,)
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "auc": lambda y, p, cm, w: _auc(y, p, w),
    "f1_macro": lambda y, p, cm, w: _f1_macro(cm),
    "f1_micro": lambda y, p, cm, w: _accuracy(cm),  # single-label: micro F1 == accuracy
    "accuracy": lambda y, p, cm, w: _accuracy(cm),
    "balanced_accuracy": lambda y, p, cm, w: _balanced_accuracy(cm),
}


def _evaluate(y: np.ndarray, probs: np.ndarray, w: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    pred = probs.argmax(axis=1)
    cm = _confusion(y, pred, probs.shape[1], w)
    return {n: METRICS[n](y, probs, cm, w) for n in names}


# ----------------------------------------------------------------------------- public API
def classification_metrics(y_true: ArrayLike, y_score: ArrayLike,
                           metrics: Sequence[str] = tuple(METRICS)) -> dict[str, float]:
    """Point estimates. ``y_score``: (N,) positive-class scores (binary) or (N, K) class scores;
    the predicted class is the arg-max. AUC is NaN when a class has no positive or no negative."""
    probs = _as_probs(y_score)
    y = _check(y_true, probs)
    vals = _evaluate(y, probs, np.ones((1, len(y))), metrics)
    return {n: float(v[0]) for n, v in vals.items()}


@dataclass(frozen=True)
class MetricCI:
    value: float  # point estimate on the full sample
    low: float
    high: float

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: self.value, f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high}


@dataclass
class BootstrapResult:
    metrics: dict[str, MetricCI]
    n_boot: int  # accepted replicates
    n_rejected: int  # replicates redrawn because a class was missing
    confidence: float
    seed: int
    extra: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """``{"auc": .., "auc_ci_low": .., "auc_ci_high": .., ...}`` for logging to MLflow."""
        out: dict[str, float] = {}
        for name, ci in self.metrics.items():
            out.update(ci.as_dict(name))
        return out


def _draw_weights(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    idx = rng.integers(0, n, size=(b, n))
    flat = (np.arange(b)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def bootstrap_metrics(
    y_true: ArrayLike,
    y_score: ArrayLike,
    metrics: Sequence[str] = tuple(METRICS),
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    max_draws_factor: int = 100,
    chunk: int = 256,
) -> BootstrapResult:
    """Point estimates with percentile bootstrap intervals (see the module docstring for the
    handling of replicates that miss a class)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    probs = _as_probs(y_score)
    y = _check(y_true, probs)
    n, k = len(y), probs.shape[1]
    point = classification_metrics(y, probs, metrics)
    present = np.bincount(y, minlength=k) > 0
    onehot_y = np.eye(k)[y][:, present]  # (N, K_present)

    rng = np.random.default_rng(seed)
    accepted: list[dict[str, np.ndarray]] = []
    n_acc = n_rej = drawn = 0
    while n_acc < n_boot:
        if drawn >= max_draws_factor * n_boot:
            raise ValueError(
                f"bootstrap could not draw {n_boot} replicates containing every class "
                f"(class counts {np.bincount(y, minlength=k).tolist()}); too few samples of a class")
        b = min(chunk, max(n_boot - n_acc, 1) * 2)
        w = _draw_weights(rng, n, b)
        drawn += b
        ok = ((w @ onehot_y) > 0).all(axis=1)
        n_rej += int((~ok).sum())
        w = w[ok][: n_boot - n_acc]
        if len(w):
            accepted.append(_evaluate(y, probs, w, metrics))
            n_acc += len(w)

    lo_q, hi_q = (1.0 - confidence) / 2.0, 1.0 - (1.0 - confidence) / 2.0
    out: dict[str, MetricCI] = {}
    for name in metrics:
        vals = np.concatenate([a[name] for a in accepted])
        vals = vals[np.isfinite(vals)]
        if len(vals) == 0:
            out[name] = MetricCI(point[name], float("nan"), float("nan"))
            continue
        lo, hi = np.quantile(vals, [lo_q, hi_q])
        out[name] = MetricCI(point[name], float(lo), float(hi))
    return BootstrapResult(out, n_boot=n_acc, n_rejected=n_rej, confidence=confidence, seed=seed)


__all__ = ["METRICS", "BootstrapResult", "MetricCI", "bootstrap_metrics", "classification_metrics"]

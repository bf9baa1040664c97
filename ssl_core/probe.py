"""An online probe of an encoder while it pre-trains: k-NN AUC on labelled slices and embedding health.

A pre-training loss says little about whether the features are getting useful, and nothing about a
collapse (every slice mapped to nearly the same vector, which some losses reach at a low value). The
probe answers both at a cost of one forward pass over a small labelled set:

* **k-NN AUC.** The training slices of one patient-level fold are the memory bank, its validation
  slices the queries. Each query's ``k`` most cosine-similar bank embeddings vote for their class
  with weight ``exp(sim / T)`` (the weighted k-NN of Wu et al., *Instance discrimination*, 2018, that
  solo-learn and most SSL code bases use online); the normalised votes are class scores, and their
  ROC AUC (binary; multi-class: macro one-vs-rest over the classes the queries hold) is the metric.
  No training, so it measures the features as they are. Defaults ``k=20``, ``T=0.07``.
* **Embedding health** of the L2-normalised embeddings of all probe slices: ``emb_std``, the mean over
  dimensions of the per-dimension standard deviation, and ``eff_rank``, the effective rank (Roy &
  Vetterli, 2007): ``exp`` of the entropy of the normalised singular values of the centred
  embedding matrix. Centring matters: features after a ReLU and average pooling share a large mean
  direction, which would make every uncentred matrix look rank one.

Collapse thresholds (:data:`COLLAPSE_STD_FACTOR`, :data:`COLLAPSE_RANK`): embeddings spread evenly
over the unit sphere in ``d`` dimensions have a per-dimension std of about ``1 / sqrt(d)``, but
backbone features of a CNN are far from even: those of a randomly initialised ResNet on CT slices
measure 0.004-0.06 x ``1 / sqrt(d)`` (all slices share one dominant direction), with an effective
rank of 10-120. A collapse is therefore flagged when ``emb_std < 0.001 / sqrt(d)`` (no spread left
beyond float noise) or ``eff_rank < 2`` (what variation is left lies along one direction). A
constant-output encoder has ``emb_std = 0`` and ``eff_rank = 0`` and trips both; a random
initialisation trips neither, so the flag does not fire at the start of a healthy run.

Inputs are prepared exactly as fine-tuning evaluates (:class:`ssl_core.finetune.FineTuner`): HU
slices resized with antialiasing to the training size, then windowed (and standardised) with the
encoder's windows; the encoder runs in eval mode without gradients, batch-wise, with bf16 autocast and
channels-last on CUDA. The training state of every module is restored afterwards, so calling the
probe inside a training loop changes nothing the loop depends on (it draws no random numbers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_core.ct_window import WindowSpec, apply_window, default_windows

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
#: collapse when the mean per-dimension std of the normalised embeddings is below this / sqrt(d)
COLLAPSE_STD_FACTOR = 1e-3
#: collapse when the effective rank of the centred normalised embeddings is below this
COLLAPSE_RANK = 2.0


@dataclass(frozen=True)
class Health:
    """Spread of a set of embeddings (see the module docstring)."""

    emb_std: float
    eff_rank: float
    dim: int

    @property
    def std_threshold(self) -> float:
        return COLLAPSE_STD_FACTOR / math.sqrt(max(self.dim, 1))

    def collapse_reason(self) -> str | None:
        """Why the embeddings count as collapsed, or None when they do not."""
        why = []
        if not self.emb_std >= self.std_threshold:  # NaN counts as collapsed
            why.append(f"emb_std {self.emb_std:.4g} < {COLLAPSE_STD_FACTOR:g}/sqrt({self.dim}) = "
                       f"{self.std_threshold:.4g}")
        if not self.eff_rank >= COLLAPSE_RANK:
            why.append(f"eff_rank {self.eff_rank:.3g} < {COLLAPSE_RANK:g}")
        return "; ".join(why) or None


@dataclass(frozen=True)
class ProbeResult:
    knn_auc: float
    health: Health
    n_train: int
    n_val: int

    def metrics(self, prefix: str = "probe.") -> dict[str, float]:
        """The step metrics a run logs."""
        return {f"{prefix}knn_auc": self.knn_auc, f"{prefix}emb_std": self.health.emb_std,
                f"{prefix}eff_rank": self.health.eff_rank}


def _features(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, D) from a backbone's output: pooled features as they are, feature maps averaged over space."""
    if isinstance(out, list | tuple):
        out = out[-1]
    if out.ndim > 2:
        out = out.flatten(2).mean(-1) if out.ndim == 4 else out.flatten(1)
    return out


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def embed(encoder: nn.Module, hu: np.ndarray, *, img_size: int | None = None,
          windows: Sequence[WindowSpec] | None = None, in_chans: int = 1, batch_size: int = 128,
          device: torch.device | str | None = None) -> np.ndarray:
    """(N, H, W) HU slices -> (N, D) float32 L2-normalised embeddings of ``encoder`` in eval mode.

    ``windows`` are the encoder's input windows (None: the defaults for ``in_chans``), ``img_size`` its
    training resolution (None: the slices' own). Every module's train/eval flag is restored after.
    """
    if hu.ndim != 3:
        raise ValueError(f"the probe expects HU slices (N, H, W), got shape {hu.shape}")
    wins = list(windows) if windows is not None else default_windows(in_chans)
    dev = torch.device(device) if device is not None else _module_device(encoder)
    on_cuda = dev.type == "cuda"
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    outs = []
    try:
        for s in range(0, hu.shape[0], batch_size):
            x = torch.from_numpy(np.array(hu[s:s + batch_size], copy=True)).to(dev).float()[:, None]  # writable
            size = img_size or x.shape[-1]
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            x = apply_window(x, wins)
            if on_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_cuda):
                z = _features(encoder(x)).float()
            outs.append(F.normalize(z, dim=1).cpu())
    finally:
        for m, was in modes:
            m.training = was
    if not outs:
        return np.zeros((0, 0), np.float32)
    return torch.cat(outs).numpy().astype(np.float32, copy=False)


def knn_scores(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, n_classes: int, *,
               k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, chunk: int = 1024) -> np.ndarray:
    """(Q, C) class scores of temperature-weighted k-NN votes (rows sum to 1).

    ``bank`` and ``queries`` are L2-normalised, so their dot product is the cosine similarity; each
    query's ``k`` nearest bank rows add ``exp(sim / temperature)`` to their class.
    """
    if k < 1 or not temperature > 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if len(bank) == 0:
        raise ValueError("the k-NN memory bank is empty")
    kk = min(k, len(bank))
    b = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    y = torch.from_numpy(np.asarray(bank_labels, dtype=np.int64))
    out = []
    for s in range(0, len(queries), chunk):
        q = torch.from_numpy(np.ascontiguousarray(queries[s:s + chunk], dtype=np.float32))
        sim, idx = (q @ b.T).topk(kk, dim=1)
        w = (sim / temperature).exp()
        votes = torch.zeros(len(q), n_classes, dtype=torch.float64)
        votes.scatter_add_(1, y[idx], w.double())
        out.append(votes / votes.sum(1, keepdim=True).clamp_min(1e-300))
    return torch.cat(out).numpy() if out else np.zeros((0, n_classes))


def _binary_auc(score: np.ndarray, pos: np.ndarray) -> float:
    """ROC AUC with ties counted half (the Mann-Whitney statistic): scikit-learn's where installed."""
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        roc_auc_score = None
    if roc_auc_score is not None:
        return float(roc_auc_score(pos.astype(int), score))
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), np.float64)
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, e in zip(starts, ends, strict=True):
        ranks[order[a:e]] = (a + e + 1) / 2.0  # mean 1-based rank of the tie group
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_ovr(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUC of the positive-class score; multi-class: the macro mean of one-vs-rest AUCs over
    the classes that have both positives and negatives among ``labels``. NaN when none has."""
    labels = np.asarray(labels)
    if scores.shape[1] == 2:
        pos = labels == 1
        return _binary_auc(scores[:, 1], pos) if 0 < pos.sum() < len(pos) else float("nan")
    per_class = [_binary_auc(scores[:, c], labels == c) for c in range(scores.shape[1])
                 if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(per_class)) if per_class else float("nan")


def knn_auc(train_emb: np.ndarray, train_labels: np.ndarray, val_emb: np.ndarray, val_labels: np.ndarray,
            n_classes: int | None = None, *, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE) -> float:
    """AUC of the weighted k-NN classifier with the training embeddings as its memory bank."""
    n = n_classes or int(max(np.max(train_labels), np.max(val_labels))) + 1
    return auc_ovr(val_labels, knn_scores(train_emb, train_labels, val_emb, max(n, 2), k=k,
                                          temperature=temperature))


def embedding_health(emb: np.ndarray) -> Health:
    """Mean per-dimension std and effective rank of L2-normalised embeddings (N, D)."""
    z = np.asarray(emb, dtype=np.float64)
    n, d = z.shape
    if n < 2:
        return Health(float("nan"), float("nan"), d)
    std = float(z.std(axis=0).mean())
    centred = z - z.mean(axis=0, keepdims=True)
    sv = np.linalg.svd(centred, compute_uv=False)
    total = sv.sum()
    if not total > 1e-6 * math.sqrt(n):  # no spread at all (a constant output): rank 0
        return Health(std, 0.0, d)
    p = sv / total
    p = p[p > 0]
    return Health(std, float(math.exp(-(p * np.log(p)).sum())), d)


@dataclass
class ProbeSet:
    """The labelled slices a probe embeds: training (memory bank) and validation (queries) slices of
    one patient-level fold. ``*_rows`` are their rows in the labelled table, so a caller can show
    which rows were used (and that none of a test split is among them)."""

    train_images: np.ndarray  # (N, H, W) int16 HU
    train_labels: np.ndarray  # (N,) int64
    val_images: np.ndarray
    val_labels: np.ndarray
    classes: list[str]
    train_rows: np.ndarray
    val_rows: np.ndarray

    def __post_init__(self) -> None:
        if len(self.train_images) == 0 or len(self.val_images) == 0:
            raise ValueError(f"the probe needs training and validation slices, got {len(self.train_images)} "
                             f"and {len(self.val_images)}")
        if len(self.train_images) != len(self.train_labels) or len(self.val_images) != len(self.val_labels):
            raise ValueError("probe images and labels differ in length")

    @property
    def size(self) -> int:
        return len(self.train_images) + len(self.val_images)


def run_probe(encoder: nn.Module, data: ProbeSet, *, img_size: int | None = None,
              windows: Sequence[WindowSpec] | None = None, in_chans: int = 1, k: int = DEFAULT_K,
              temperature: float = DEFAULT_TEMPERATURE, batch_size: int = 128,
              device: torch.device | str | None = None) -> ProbeResult:
    """Embed ``data`` with ``encoder`` and measure k-NN AUC and embedding health."""
    opts = {"img_size": img_size, "windows": windows, "in_chans": in_chans, "batch_size": batch_size,
            "device": device}
    tr = embed(encoder, data.train_images, **opts)
    va = embed(encoder, data.val_images, **opts)
    auc = knn_auc(tr, data.train_labels, va, data.val_labels, len(data.classes), k=k, temperature=temperature)
    return ProbeResult(knn_auc=auc, health=embedding_health(np.concatenate([tr, va])), n_train=len(tr),
                       n_val=len(va))


__all__ = ["COLLAPSE_RANK", "COLLAPSE_STD_FACTOR", "DEFAULT_K", "DEFAULT_TEMPERATURE", "Health", "ProbeResult",
           "ProbeSet", "auc_ovr", "embed", "embedding_health", "knn_auc", "knn_scores", "run_probe"]

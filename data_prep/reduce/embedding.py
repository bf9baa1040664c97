"""Deep-embedding similarity: cosine similarity of encoder features (any timm CNN, or a ctssl
pre-trained encoder state_dict), with the last-kept rule or k-center-greedy diversity selection.

The encoder is not built here: the caller loads it (``ssl_core.slice_embedder.SliceEmbedder``, which
``ctssl reduce`` builds from the options below) and hands it in as ``embedder``. The data layer thus
imports neither torch nor the model code, and the options recorded in the selection manifest stay
plain values.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ctssl_base.errors import UserError
from data_prep.reduce.base import STRATEGIES, Selection, SliceSet
from data_prep.reduce.progress import progress_bar
from data_prep.reduce.sequential import LastKeptSimilarity, gather_features

MODES = ("threshold", "kcenter")


class Embedder(Protocol):
    """What the strategy needs from an encoder: HU slices in, one unit vector per slice out."""

    in_chans: int

    def __call__(self, hu: np.ndarray, windows: Sequence[str]) -> np.ndarray: ...


@STRATEGIES.register("embedding")
class EmbeddingStrategy(LastKeptSimilarity):
    help = ("cosine similarity of encoder embeddings: drop a slice too similar to the last kept one "
            "(--mode threshold) or keep a k-center-greedy diverse subset (--mode kcenter)")
    threshold_name = "cosine similarity"
    default_threshold = 0.95
    lower = -1.0
    upper = 1.0

    def __init__(self, model: str = "resnet18", checkpoint: str | None = None, mode: str = "threshold",
                 size: int = 128, batch_size: int = 64, windows: list[str] | None = None,
                 embedder: Embedder | None = None, **options: Any) -> None:
        super().__init__(model=model, checkpoint=checkpoint, mode=mode, size=size, batch_size=batch_size,
                         windows=windows, **options)
        self.embedder = embedder
        if mode not in MODES:
            raise UserError(f"--mode {mode!r}: must be one of {', '.join(MODES)}")
        if size < 16:
            raise UserError(f"--size {size}: must be >= 16 for a CNN encoder")
        # model, checkpoint, size and batch size describe the encoder the caller builds (and are
        # recorded in options); the strategy itself needs only the mode and the windows
        self.mode, self.windows = mode, windows
        if mode == "kcenter":
            self.lower, self.upper = 0.0, 1.0
            self.threshold_name = "kept fraction (k-center greedy)"
            self.default_threshold = 0.5

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        super().add_arguments(parser)
        from data_prep.reduce.image_similarity import add_size_argument

        add_size_argument(parser)
        parser.add_argument("--model", default="resnet18",
                            help="embedding: timm encoder name (default resnet18; random weights unless "
                                 "--checkpoint is given, since nothing is downloaded)")
        parser.add_argument("--checkpoint", default=None,
                            help="embedding: a ctssl encoder state_dict file (timm layout) for --model")
        parser.add_argument("--mode", choices=MODES, default="threshold",
                            help="embedding: 'threshold' = last-kept cosine rule; 'kcenter' = k-center "
                                 "greedy, the threshold is then the kept fraction")
        parser.add_argument("--batch-size", type=int, default=64, help="embedding: encoder batch size")
        parser.add_argument("--windows", nargs="+", default=None,
                            help="embedding: CT windows as input channels (default: lung, or gray8 for "
                                 "8-bit image sets)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {**super().options_from_args(args), "model": args.model, "checkpoint": args.checkpoint,
                "mode": args.mode, "size": args.size, "batch_size": args.batch_size, "windows": args.windows}

    # -- features
    def compute_features(self, data: SliceSet, progress: bool) -> np.ndarray:
        if self.embedder is None:
            raise UserError("strategy 'embedding' needs its encoder handed in (embedder=...): "
                            "ctssl reduce builds it from --model/--checkpoint")
        if self.windows is None:
            self.windows = ["gray8"] if data.intensity == "gray8" else ["lung"]
            self.options["windows"] = self.windows  # the manifest records the windows used
        windows, embedder = list(self.windows), self.embedder
        return gather_features(data, lambda hu: embedder(hu, windows), progress, self.name)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))

    def prepare(self, data: SliceSet, progress: bool = False) -> None:
        if self.mode == "threshold":
            super().prepare(data, progress)
            return
        self.data = data
        self.feats = self.compute_features(data, progress)

    @property
    def threshold_for_fraction(self):
        """k-center's threshold *is* the kept fraction: no search needed."""
        if self.mode == "kcenter":
            return lambda fraction: fraction
        return None

    def select(self, threshold: float) -> Selection:
        if self.mode == "threshold":
            return super().select(threshold)
        keep, cause = kcenter_greedy(self.feats, int(round(threshold * len(self.data))))
        return Selection(keep, cause, threshold, {"mode": "kcenter"})


def kcenter_greedy(feats: np.ndarray, k: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Farthest-point (k-center greedy) selection of ``k`` rows under cosine distance.

    Starts from row 0 (deterministic) and repeatedly adds the row farthest from all chosen rows
    (ties: lowest index). A dropped row's cause is its nearest chosen row.
    """
    n = feats.shape[0]
    keep = np.zeros(n, bool)
    cause = np.full(n, -1, np.int64)
    if n == 0 or k <= 0:
        return keep, cause
    k = min(k, n)
    x = feats.astype(np.float32)
    min_dist = np.full(n, np.inf, np.float32)
    nearest = np.zeros(n, np.int64)
    nxt = 0
    with progress_bar(k, "kcenter", progress, unit="center") as bar:
        for _ in range(k):
            keep[nxt] = True
            d = 1.0 - x @ x[nxt]
            closer = d < min_dist
            min_dist[closer] = d[closer]
            nearest[closer] = nxt
            min_dist[keep] = -np.inf
            nxt = int(np.argmax(min_dist))
            bar.update(1)
    cause[~keep] = nearest[~keep]
    return keep, cause

"""Strategies of the form "drop a slice whose similarity to the last kept slice is above the
threshold" (SSIM, mutual information, embeddings), sharing one precomputation.

Why a band: the last kept slice is almost always a few slices back, so the similarities of every
slice to its ``window`` predecessors are computed once, vectorised over all pairs. A threshold
search then replays the greedy many times from that table; the rare pair further apart than the
window is computed on demand and cached.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from data_prep.reduce.base import Selection, SliceSet, Strategy
from data_prep.reduce.greedy import last_kept_greedy
from data_prep.reduce.progress import progress_bar

PAIR_BATCH = 256


class LastKeptSimilarity(Strategy):
    """Subclasses provide ``features`` (per slice) and ``similarity`` (per pair, batched)."""

    larger_keeps_fewer = False  # a higher similarity threshold drops fewer slices

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        if any(a.dest == "window" for a in parser._group_actions):
            return
        parser.add_argument("--window", type=int, default=8,
                            help="ssim/mutual_info/embedding: precompute similarities to the previous N "
                                 "slices (pairs further apart are computed on demand; default 8)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {"window": args.window}

    def __init__(self, window: int = 8, **options: Any) -> None:
        super().__init__(window=window, **options)
        if window < 1:
            from ctssl_base.errors import UserError

            raise UserError(f"--window {window}: must be >= 1")
        self.window = window

    # -- to implement
    def compute_features(self, data: SliceSet, progress: bool) -> np.ndarray:
        raise NotImplementedError

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- shared
    def prepare(self, data: SliceSet, progress: bool = False) -> None:
        super().prepare(data, progress)
        self.feats = self.compute_features(data, progress)
        n = len(data)
        self.band = np.full((n, self.window + 1), np.nan)
        self._extra: dict[tuple[int, int], float] = {}
        later, earlier = [], []
        for start, stop in data.series_bounds():
            for w in range(1, min(self.window, stop - start - 1) + 1):
                i = np.arange(start + w, stop)
                later.append(i)
                earlier.append(i - w)
        if not later:
            return
        later_a, earlier_a = np.concatenate(later), np.concatenate(earlier)
        with progress_bar(later_a.size, f"{self.name}: pair similarities", progress, unit="pair") as bar:
            for s in range(0, later_a.size, PAIR_BATCH):
                li, ei = later_a[s:s + PAIR_BATCH], earlier_a[s:s + PAIR_BATCH]
                self.band[li, li - ei] = self.similarity(self.feats[li], self.feats[ei])
                bar.update(li.size)

    def _pair(self, i: int, j: int) -> float:
        gap = i - j
        if gap <= self.window:
            return float(self.band[i, gap])
        key = (i, j)
        if key not in self._extra:
            self._extra[key] = float(self.similarity(self.feats[i:i + 1], self.feats[j:j + 1])[0])
        return self._extra[key]

    def select(self, threshold: float) -> Selection:
        n = len(self.data)
        keep = np.zeros(n, bool)
        cause = np.full(n, -1, np.int64)
        for start, stop in self.data.series_bounds():
            k, c = last_kept_greedy(stop - start, lambda i, j, s=start: self._pair(s + i, s + j), threshold)
            keep[start:stop] = k
            cause[start:stop] = np.where(c >= 0, c + start, -1)
        return Selection(keep, cause, threshold)


def gather_features(data: SliceSet, fn, progress: bool, label: str) -> np.ndarray:
    """Run ``fn(hu batch) -> features`` over all slices (streamed once) into one array."""
    if data.iter_pixels is None:
        raise ValueError(f"{label}: this strategy needs the slices' pixels")
    out: np.ndarray | None = None
    with progress_bar(len(data), f"{label}: features", progress, unit="slice") as bar:
        for pos, hu in data.iter_pixels():
            f = fn(hu)
            if out is None:
                out = np.zeros((len(data), *f.shape[1:]), f.dtype)
            out[pos] = f
            bar.update(len(pos))
    if out is None:
        out = np.zeros((0,), np.float32)
    return out

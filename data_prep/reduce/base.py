"""What every reduction strategy shares: the input (:class:`SliceSet`), the result
(:class:`Selection`), the strategy interface and the registry the CLI looks names up in.

A strategy is a *rule with one threshold*. Keeping the threshold separate from the (expensive)
per-slice features lets ``--target-fraction`` search thresholds without recomputing features.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ctssl_base.errors import UserError
from ctssl_base.registry import Registry


@dataclass
class SliceSet:
    """The slices to reduce, in processing order: by series, then by ``slice_index`` (z order).

    ``series`` holds 0-based series numbers, contiguous runs in this order. ``load_pixels`` returns
    the HU slices of the given positions (only strategies that look at pixels call it).
    """

    slice_id: np.ndarray  # (n,) str
    series: np.ndarray  # (n,) int64, non-decreasing
    series_name: list[str]  # series number -> series_id
    slice_index: np.ndarray  # (n,) int
    dhash: np.ndarray | None = None  # (n,) uint64, from the prep output when present
    load_pixels: Callable[[np.ndarray], np.ndarray] | None = None
    iter_pixels: Callable[[], Any] | None = None  # yields (positions, hu batch) over all slices once
    intensity: str = "hu"  # "hu" (CT) or "gray8" (8-bit image sets), from the prep manifest

    def __post_init__(self) -> None:
        if len(self.series) and np.any(np.diff(self.series) < 0):
            raise ValueError("SliceSet rows must be sorted by series")

    def __len__(self) -> int:
        return len(self.slice_id)

    def series_bounds(self) -> list[tuple[int, int]]:
        """[start, stop) of each series' rows."""
        if len(self) == 0:
            return []
        cuts = np.flatnonzero(np.diff(self.series)) + 1
        starts = np.concatenate([[0], cuts])
        stops = np.concatenate([cuts, [len(self)]])
        return list(zip(starts.tolist(), stops.tolist(), strict=True))

    @classmethod
    def from_arrays(cls, series_ids: np.ndarray, slice_index: np.ndarray, slice_id: np.ndarray | None = None,
                    **kw: Any) -> tuple[SliceSet, np.ndarray]:
        """Sort rows by (series_id, slice_index); return the set and the permutation applied."""
        series_ids = np.asarray(series_ids).astype(str)
        slice_index = np.asarray(slice_index)
        n = len(series_ids)
        if slice_id is None:
            slice_id = np.array([f"s{i}" for i in range(n)], dtype=object)
        order = np.lexsort((np.arange(n), slice_index, series_ids)) if n else np.zeros(0, np.int64)
        names, codes = np.unique(series_ids[order], return_inverse=True)
        extra = {k: (v[order] if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        return cls(np.asarray(slice_id)[order], codes.astype(np.int64), [str(s) for s in names],
                   slice_index[order], **extra), order


@dataclass
class Selection:
    """Which rows are kept, and for each dropped row the kept row that made it redundant."""

    keep: np.ndarray  # (n,) bool
    cause: np.ndarray  # (n,) int64: index of the kept slice that caused the drop, -1 when kept
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    @property
    def fraction(self) -> float:
        return float(self.keep.mean()) if len(self.keep) else 1.0


class Strategy:
    """A reduction rule. Subclasses set the class attributes and implement ``prepare``/``select``.

    ``larger_keeps_fewer`` says how the threshold steers the kept count (distance-like thresholds:
    True; similarity-like thresholds: False); the target-fraction search relies on it.
    """

    name: ClassVar[str]  # set by ``@STRATEGIES.register(name)``
    help: ClassVar[str]
    threshold_name: ClassVar[str]
    default_threshold: ClassVar[float]
    lower: ClassVar[float]  # inclusive range of valid thresholds
    upper: ClassVar[float]
    larger_keeps_fewer: ClassVar[bool]
    integer: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = options

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        """Strategy-specific CLI options (names must not clash with other strategies')."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {}

    def check_threshold(self, value: float) -> float:
        if not np.isfinite(value) or not (self.lower <= value <= self.upper):
            raise UserError(f"--threshold {value!r} is out of range for strategy {self.name!r}: "
                            f"{self.threshold_name} must lie in [{self.lower:g}, {self.upper:g}]")
        if self.integer and value != int(value):
            raise UserError(f"--threshold {value!r}: {self.threshold_name} of strategy {self.name!r} "
                            "must be a whole number")
        return int(value) if self.integer else float(value)

    def prepare(self, data: SliceSet, progress: bool = False) -> None:
        """Compute the per-slice features once (hashes, thumbnails, embeddings)."""
        self.data = data

    def select(self, threshold: float) -> Selection:
        raise NotImplementedError

    def search_bounds(self) -> tuple[float, float]:
        """The threshold interval ``--target-fraction`` searches."""
        return float(self.lower), float(self.upper)


#: the strategies by name; their modules register them when imported (``data_prep.reduce`` imports all)
STRATEGIES: Registry[type[Strategy]] = Registry(
    "reduction strategy", error=UserError,
    modules=[f"data_prep.reduce.{m}" for m in ("embedding", "every_n", "hashing", "image_similarity")])


def get_strategy(name: str) -> type[Strategy]:
    return STRATEGIES.get(name)


def empty_selection(n: int, threshold: float) -> Selection:
    return Selection(np.ones(n, bool), np.full(n, -1, np.int64), threshold)

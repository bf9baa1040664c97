"""Difference-hash reduction: the paper's best strategy (dhash, Hamming distance <= 6)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from ctssl_base.errors import UserError
from data_prep.dhash import dhash64_hu
from data_prep.reduce.base import STRATEGIES, Selection, SliceSet, Strategy
from data_prep.reduce.greedy import reference_greedy
from data_prep.reduce.mih import global_reference_greedy
from data_prep.reduce.progress import progress_bar

log = logging.getLogger(__name__)

SCOPES = ("volume", "global")
GLOBAL_PROGRESS_MIN = 200_000  # below this the global pass takes seconds: no bar


@STRATEGIES.register("hash")
class HashStrategy(Strategy):
    help = "dhash (64 bits) + Hamming distance, greedy per volume or across the dataset"
    threshold_name = "maximum Hamming distance"
    default_threshold = 6
    lower = 0
    upper = 64
    larger_keeps_fewer = True
    integer = True

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        parser.add_argument("--scope", choices=SCOPES, default="volume",
                            help="hash: 'volume' = the paper's greedy within each series (default); "
                                 "'global' = near-duplicates across the whole dataset (multi-index hash)")
        parser.add_argument("--mih-blocks", type=int, default=None,
                            help="hash --scope global: number of index blocks (default: chosen from the "
                                 "data size; any value gives the same, exact result)")

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {"scope": args.scope, "mih_blocks": args.mih_blocks}

    def __init__(self, scope: str = "volume", mih_blocks: int | None = None, **options: Any) -> None:
        super().__init__(scope=scope, mih_blocks=mih_blocks, **options)
        if scope not in SCOPES:
            raise UserError(f"--scope {scope!r}: must be one of {', '.join(SCOPES)}")
        self.scope = scope
        self.mih_blocks = mih_blocks

    def prepare(self, data: SliceSet, progress: bool = False) -> None:
        super().prepare(data, progress)
        self.progress = progress
        if data.dhash is not None:
            self.codes = np.asarray(data.dhash, np.uint64)
            return
        if data.iter_pixels is None:
            raise UserError("hash strategy: the input has no dhash column and no pixels to compute it from")
        log.info("input has no dhash column: computing dhash from the pixels")
        self.codes = np.zeros(len(data), np.uint64)
        with progress_bar(len(data), "dhash", progress, unit="slice") as bar:
            for pos, hu in data.iter_pixels():
                self.codes[pos] = dhash64_hu(hu)
                bar.update(len(pos))

    def select(self, threshold: float) -> Selection:
        t = int(threshold)
        n = len(self.data)
        if self.scope == "global":
            show = getattr(self, "progress", False) and n >= GLOBAL_PROGRESS_MIN
            with progress_bar(n, f"hash global (t={t})", show, unit="slice") as bar:
                keep, cause = global_reference_greedy(self.codes, t, blocks=self.mih_blocks, progress=bar.update)
            return Selection(keep, cause, t, {"scope": "global"})
        keep = np.zeros(n, bool)
        cause = np.full(n, -1, np.int64)
        for start, stop in self.data.series_bounds():
            k, c = reference_greedy(self.codes[start:stop], t)
            keep[start:stop] = k
            cause[start:stop] = np.where(c >= 0, c + start, -1)
        return Selection(keep, cause, t, {"scope": "volume"})

"""Every n-th slice of each series: the paper's simplest baseline."""

from __future__ import annotations

import numpy as np

from data_prep.reduce.base import STRATEGIES, Selection, Strategy
from data_prep.reduce.greedy import every_nth


@STRATEGIES.register("every_n")
class EveryN(Strategy):
    help = "keep slices 0, n, 2n, ... of each series (n may be fractional, >= 1)"
    threshold_name = "n (stride)"
    default_threshold = 2.0
    lower = 1.0
    upper = 1e6
    larger_keeps_fewer = True

    def search_bounds(self) -> tuple[float, float]:
        longest = max((b - a for a, b in self.data.series_bounds()), default=1)
        return 1.0, float(max(longest, 1) + 1)

    def select(self, threshold: float) -> Selection:
        n = len(self.data)
        keep = np.zeros(n, bool)
        cause = np.full(n, -1, np.int64)
        for start, stop in self.data.series_bounds():
            local = every_nth(stop - start, threshold)
            keep[start:stop] = local
            # a dropped slice is "covered" by the kept slice before it
            last_kept = np.maximum.accumulate(np.where(local, np.arange(stop - start), 0))
            cause[start:stop] = np.where(local, -1, start + last_kept)
        return Selection(keep, cause, threshold)

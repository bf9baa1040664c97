"""``--target-fraction``: find the threshold whose kept fraction is closest to a target, so that
strategies can be compared at equal data size.

The kept fraction is a step function of the threshold, (almost) monotone in the direction each
strategy declares. Continuous thresholds are found by bisection (each step replays the greedy on
precomputed features); integer thresholds (Hamming distances) by bisection plus a look at the
neighbours of the crossing. The result is accepted when ``|kept - target| <= tolerance`` (absolute
fraction, default 0.01 = one percentage point). Otherwise - a target between two steps, e.g. one
slice of a tiny set, or the 65 possible Hamming thresholds - the closest threshold found is used and
``info["target_reached"]`` is False with a warning saying which fractions were reachable.

Note: the greedy rules are not monotone in general (a larger threshold changes which slices become
references); on real data they are, and the search never assumes more than "crosses the target".
"""

from __future__ import annotations

import logging
import math

from ctssl_base.errors import UserError
from data_prep.reduce.base import Selection, Strategy

log = logging.getLogger(__name__)
MAX_STEPS = 60


def search_threshold(strategy: Strategy, target: float, tolerance: float = 0.01) -> Selection:
    if not (0.0 < target <= 1.0) or not math.isfinite(target):
        raise UserError(f"--target-fraction {target!r}: must be in (0, 1]")
    direct = getattr(strategy, "threshold_for_fraction", None)
    if direct is not None:
        sel = strategy.select(direct(target))
        return _finish(sel, target, tolerance, {}, strategy)

    tried: dict[float, Selection] = {}

    def run(t: float) -> Selection:
        if t not in tried:
            tried[t] = strategy.select(t)
        return tried[t]

    lo, hi = strategy.search_bounds()
    # orient so that f(threshold) increases from lo to hi
    increasing = not strategy.larger_keeps_fewer
    def frac(t: float) -> float:
        return run(t).fraction

    if strategy.integer:
        a, b = int(lo), int(hi)
        while b - a > 1:
            mid = (a + b) // 2
            f = frac(mid)
            if abs(f - target) <= tolerance / 4:
                a = b = mid
                break
            if (f < target) == increasing:
                a = mid
            else:
                b = mid
        for t in range(max(int(lo), a - 2), min(int(hi), b + 2) + 1):
            frac(t)
    else:
        a, b = float(lo), float(hi)
        for _ in range(MAX_STEPS):
            mid = (a + b) / 2
            f = frac(mid)
            if abs(f - target) <= tolerance / 4:
                break
            if (f < target) == increasing:
                a = mid
            else:
                b = mid
        frac(a)
        frac(b)
    # closest; ties -> the one keeping more data
    best_t = min(tried, key=lambda t: (abs(tried[t].fraction - target), -tried[t].fraction))
    return _finish(tried[best_t], target, tolerance, tried, strategy)


def _finish(sel: Selection, target: float, tolerance: float, tried: dict[float, Selection],
            strategy: Strategy) -> Selection:
    reached = abs(sel.fraction - target) <= tolerance + 1e-9
    sel.info.update({"target_fraction": target, "target_tolerance": tolerance, "target_reached": bool(reached),
                     "thresholds_tried": len(tried)})
    if not reached:
        below = [s.fraction for s in tried.values() if s.fraction < target]
        above = [s.fraction for s in tried.values() if s.fraction > target]
        msg = (f"{strategy.name}: no threshold keeps {target:.3f} +- {tolerance:.3f} of the slices; using "
               f"{strategy.threshold_name} = {sel.threshold:g}, which keeps {sel.fraction:.4f}"
               + (f" (nearest reachable: {max(below):.4f} below, {min(above):.4f} above)" if below and above else ""))
        log.warning(msg)
        sel.info["target_warning"] = msg
    return sel



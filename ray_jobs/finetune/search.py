"""Searching the size axis: the smallest samples-per-class at which an encoder is good enough.

"Good enough" is a mean test AUC over folds (and seeds) of at least ``target`` — or, with a margin,
at least the encoder's full-data AUC minus ``margin``. Assuming AUC grows with the training set,
the smallest passing count on a ladder of candidates is found by bisection: each round evaluates the
middle candidate of every unresolved encoder (all folds x seeds, as extra Tune trials run together),
so ~log2(len(ladder)) rounds replace a full grid. Sizes already evaluated by the grid are reused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_LADDER = (5, 8, 12, 18, 27, 40, 60, 90, 135, 200)


@dataclass
class SearchState:
    encoder: str
    candidates: list[int]
    threshold: float | None
    lo: int = -1  # largest candidate index known to fail
    hi: int = -1  # smallest candidate index known to pass (len(candidates) = only "all" passes)
    evaluated: dict[int, float] = field(default_factory=dict)  # samples per class -> mean AUC

    @property
    def done(self) -> bool:
        return self.threshold is None or self.lo + 1 >= self.hi

    def next_candidate(self) -> int | None:
        if self.done:
            return None
        return self.candidates[(self.lo + self.hi) // 2]

    def record(self, n: int, auc: float) -> None:
        self.evaluated[n] = auc
        i = self.candidates.index(n)
        if math.isfinite(auc) and self.threshold is not None and auc >= self.threshold:
            self.hi = min(self.hi, i)
        else:
            self.lo = max(self.lo, i)

    def result(self, full_passes: bool) -> int | str | None:
        """Minimal samples per class; "all" when only the full set passes; None when nothing does."""
        if self.threshold is None:
            return None
        if self.hi < len(self.candidates):
            return self.candidates[self.hi]
        return "all" if full_passes else None


def ladder(candidates: list[int] | None, max_per_class: int) -> list[int]:
    """Candidates strictly below the smallest class's training count (at or above it equals "all")."""
    vals = sorted(set(candidates or DEFAULT_LADDER))
    return [v for v in vals if 1 <= v < max_per_class]


def threshold_for(full_auc: float | None, target: float | None, margin: float | None) -> float | None:
    if target is not None:
        return target
    if margin is not None and full_auc is not None and math.isfinite(full_auc):
        return full_auc - margin
    return None


def bisect_sizes(states: list[SearchState], evaluate: Callable[[dict[str, int]], dict[str, float]],
                 max_rounds: int = 32) -> list[SearchState]:
    """Run rounds until every state is resolved. ``evaluate({encoder: n})`` -> {encoder: mean AUC}."""
    for st in states:
        st.hi = len(st.candidates)
        for n, auc in sorted(st.evaluated.items()):  # reuse grid results
            if n in st.candidates:
                st.record(n, auc)
    for _ in range(max_rounds):
        todo = {st.encoder: st.next_candidate() for st in states if not st.done}
        todo = {k: v for k, v in todo.items() if v is not None}
        if not todo:
            break
        got = evaluate(todo)
        for st in states:
            if st.encoder in todo:
                st.record(todo[st.encoder], got.get(st.encoder, float("nan")))
    return states

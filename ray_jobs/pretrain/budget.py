"""How long a pre-training run trains, and where in its schedules each step is.

Without a budget a run is ``epochs x steps_per_epoch`` optimiser steps and every schedule (lr, weight
decay, EMA momentum, warm-up, SwAV's prototype freezing) is a function of ``(step, total_steps)``.
A time budget (``--time-budget``) has no step count known in advance: how many steps fit depends on
the machine. So the schedules keep their ``(step, total_steps)`` form but are fed a *schedule step*
on a fixed scale of :data:`SCHEDULE_STEPS`: ``floor(progress x SCHEDULE_STEPS)``, where progress is
the fraction of the budget spent. Every schedule then runs from its start to its end over the
budget, however many real steps that turns out to be, while the real step counter keeps counting
real steps for logs and checkpoints.

Progress is the largest of the bounds' fractions: training-loop time over the time budget, steps
over ``--max-steps``, steps over ``--epochs x steps_per_epoch``. Whichever bound ends the run, the
schedules have just reached their end. A step budget alone (``--max-steps``) needs no scale: its
schedule step *is* the real step.

Everything here is pure (the clock is an argument), so stopping and the schedule mapping are tested
without Ray; the training loop supplies rank 0's clock so all DDP ranks agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ray_jobs.pretrain.config import format_duration

#: schedule steps of a time-budgeted run: fine enough that consecutive real steps of a long run still
#: see distinct lr values, coarse enough to stay an exact int in float arithmetic
SCHEDULE_STEPS = 100_000

#: warm-up of a time-budgeted run whose recipe has one, as a fraction of the run at most: a recipe's
#: warm-up is given in epochs of a long run (BYOL 10 of 1,000, SparK 40 of 1,600, i.e. 1-2.5 %); a
#: budget of minutes must not spend most of it warming up
MAX_BUDGET_WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class Budget:
    """When a run stops and how its schedules are scaled.

    ``step_cap`` is the step bound (``min(--max-steps, epochs x steps_per_epoch)``, None when only the
    clock bounds the run); ``time_s`` the training-loop seconds (None without a time budget).
    """

    step_cap: int | None
    time_s: float | None = None

    def __post_init__(self) -> None:
        if self.step_cap is None and self.time_s is None:
            raise ValueError("a run needs a step bound or a time budget")
        if self.step_cap is not None and self.step_cap < 1:
            raise ValueError(f"step_cap must be >= 1, got {self.step_cap}")
        if self.time_s is not None and not self.time_s > 0:
            raise ValueError(f"time_s must be > 0, got {self.time_s}")

    @classmethod
    def plan(cls, steps_per_epoch: int, epochs: int | None, max_steps: int | None = None,
             time_s: float | None = None) -> Budget:
        """The bounds of a run from its settings (``epochs`` None: unlimited)."""
        caps = [c for c in (max_steps, epochs * steps_per_epoch if epochs is not None else None) if c is not None]
        return cls(step_cap=min(caps) if caps else None, time_s=time_s)

    @property
    def timed(self) -> bool:
        return self.time_s is not None

    @property
    def schedule_steps(self) -> int:
        """The ``total_steps`` every schedule is built with."""
        if self.time_s is None:
            assert self.step_cap is not None
            return self.step_cap
        return SCHEDULE_STEPS

    def fraction(self, elapsed_s: float, step: int) -> float:
        """Share of the run done after ``step`` real steps and ``elapsed_s`` training-loop seconds."""
        f = 0.0
        if self.time_s is not None:
            f = max(f, elapsed_s / self.time_s)
        if self.step_cap is not None:
            f = max(f, step / self.step_cap)
        return f

    def done(self, elapsed_s: float, step: int) -> bool:
        return self.fraction(elapsed_s, step) >= 1.0

    def schedule_step(self, elapsed_s: float, step: int) -> int:
        """The step the schedules see for the step about to run (``0 <= s < schedule_steps``)."""
        if self.time_s is None:
            return min(step, self.schedule_steps - 1)  # exact: a step budget's schedule is the real step
        f = self.fraction(elapsed_s, step)
        return min(max(math.floor(f * SCHEDULE_STEPS), 0), SCHEDULE_STEPS - 1)

    def eta_s(self, elapsed_s: float, step: int, steps_per_s: float) -> float:
        """Seconds left: whichever bound ends the run first, at the current rate."""
        left = []
        if self.time_s is not None:
            left.append(max(self.time_s - elapsed_s, 0.0))
        if self.step_cap is not None:
            left.append(max(self.step_cap - step, 0) / max(steps_per_s, 1e-9))
        return min(left)

    def warmup_steps(self, warmup_epochs: float, steps_per_epoch: int, explicit: bool) -> int:
        """Warm-up in schedule steps.

        Without a time budget: ``warmup_epochs x steps_per_epoch``, at most half the run (as without
        budgets). With one, the warm-up is a fraction of the run: the recipe's epochs over the step
        bound when there is one, at most :data:`MAX_BUDGET_WARMUP_FRACTION` (an explicit
        ``--warmup-epochs`` at most half the run); with no step bound, the recipe's warm-up becomes
        :data:`MAX_BUDGET_WARMUP_FRACTION` of the budget (none when the recipe has none).
        """
        total = self.schedule_steps
        if warmup_epochs <= 0 or total <= 1:
            return 0
        if self.time_s is None:
            return min(int(round(warmup_epochs * steps_per_epoch)), total // 2)
        cap = 0.5 if explicit else MAX_BUDGET_WARMUP_FRACTION
        if self.step_cap is not None:
            frac = min(warmup_epochs * steps_per_epoch / self.step_cap, cap)
        elif explicit:
            raise ValueError("an explicit warm-up in epochs needs a step bound to be placed in a time budget")
        else:
            frac = cap
        return int(round(frac * total))

    def describe(self) -> str:
        """``12m time budget``, ``500 steps``, ``12m time budget or 500 steps``: for log lines."""

        parts = []
        if self.time_s is not None:
            parts.append(f"{format_duration(self.time_s)} time budget")
        if self.step_cap is not None:
            parts.append(f"{self.step_cap} steps")
        return " or ".join(parts)


__all__ = ["MAX_BUDGET_WARMUP_FRACTION", "SCHEDULE_STEPS", "Budget"]

"""Progress of a fine-tuning sweep as one bar (or periodic log line) with rate and ETA.

Tune's own status table lists every trial, which is unreadable for a 45-trial study and says nothing
about when it ends. Trials report once per epoch, so the bar counts *trial-epochs*: that moves every
few seconds and gives a steady ETA even when only a handful of trials run at once; a trial that
ends early (ASHA, an error) is credited with all its epochs.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from ctssl_base.progress import Progress


class StudyProgress(Callback):
    def __init__(self, name: str, trials: int, epochs_per_trial: int, enabled: bool = True) -> None:
        self.name = name
        self.trials = trials
        self.epochs = max(1, epochs_per_trial)
        self.enabled = enabled
        self._seen: dict[str, int] = {}
        self._finished = 0
        self._failed = 0
        self._bar: Progress | None = None

    # The bar is created lazily: the callback object is built (and may be pickled) before fit().
    def _progress(self) -> Progress:
        if self._bar is None:
            self._bar = Progress(total=self.trials * self.epochs, unit="epochs", desc=self._desc(),
                                 enabled=self.enabled, every_s=10.0)
        return self._bar

    def _desc(self) -> str:
        failed = f", {self._failed} failed" if self._failed else ""
        return f"{self.name}: {self._finished}/{self.trials} trials{failed}"

    def _advance(self, trial_id: str, epochs_done: int) -> None:
        bar = self._progress()
        done = min(self.epochs, max(self._seen.get(trial_id, 0), epochs_done))
        step = done - self._seen.get(trial_id, 0)
        self._seen[trial_id] = done
        bar.set_description(self._desc())
        if step > 0:
            bar.update(step)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._progress()  # the clock starts with the first trial, not with its first epoch

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._advance(trial.trial_id, int(result.get("epoch", result.get("training_iteration", 0)) or 0))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished += 1
        self._advance(trial.trial_id, self.epochs)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished += 1
        self._failed += 1
        self._advance(trial.trial_id, self.epochs)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

"""The study's progress line: counts trial-epochs, credits early-stopped trials, names failures."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from ctssl_base.progress import format_rate
from ray_jobs.finetune.progress import StudyProgress


def _trial(i: int) -> SimpleNamespace:
    return SimpleNamespace(trial_id=f"t{i}")


def test_progress_counts_epochs_and_credits_trials_that_end_early(caplog):
    caplog.set_level(logging.INFO, logger="ctssl.progress")
    p = StudyProgress("finetune demo", trials=3, epochs_per_trial=4, enabled=True)
    p._progress().every_s = 0.0  # a line per update, so the test sees each one
    for e in (1, 2):
        p.on_trial_result(0, [], _trial(0), {"epoch": e})
    p.on_trial_result(0, [], _trial(0), {"epoch": 2})  # a repeated report does not count twice
    assert p._progress().n == 2
    p.on_trial_complete(0, [], _trial(0))  # stopped early (ASHA): credited with all 4 epochs
    assert p._progress().n == 4
    p.on_trial_result(0, [], _trial(1), {"epoch": 9})  # the final report's epoch never overshoots
    assert p._progress().n == 8
    p.on_trial_error(0, [], _trial(2))
    assert p._progress().n == 12
    last = caplog.records[-1].getMessage()
    assert last.startswith("finetune demo: 2/3 trials, 1 failed: 12/12 epochs (100%)"), last
    assert "ETA" in last


def test_slow_rates_read_per_minute():
    assert format_rate(0.05, "trials") == "3.0 trials/min"
    assert format_rate(12.0, "slices") == "12.0 slices/s"

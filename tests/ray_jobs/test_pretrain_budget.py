"""Budget-aware pre-training without Ray: the budget's stop and schedule mapping on a fake clock, the
pool-sized batch, the budget in the run identity, and the values refused before Ray starts."""

from __future__ import annotations

import math

import pytest

from ctssl_base.errors import UserError
from ray_jobs.pretrain import resume_guard
from ray_jobs.pretrain.budget import MAX_BUDGET_WARMUP_FRACTION, SCHEDULE_STEPS, Budget
from ray_jobs.pretrain.config import PretrainConfig, format_duration, parse_duration
from ray_jobs.pretrain.data import DataInfo
from ray_jobs.pretrain.sizing import auto_batch_size, method_options, resolve
from ssl_core.momentum import cosine_tau
from ssl_core.schedules import warmup_cosine


def _cfg(method: str = "byol", **kw) -> PretrainConfig:
    return PretrainConfig(method=method, data="/d", storage="/s", experiment="e", **kw)


def _info(rows: int) -> DataInfo:
    return DataInfo(read_url="/d", base_url="/d", dataset="ct", rows=rows, height=64, width=64, intensity="hu",
                    selection=None)


def _simulate(budget: Budget, step_times, time_before: float = 0.0, step_before: int = 0):
    """The training loop's use of a budget (see loop.py) on a fake clock: returns the schedule step of
    every step run, the loop time when it stopped, and the loop time at each step's start."""
    clock, step = time_before, step_before
    seen, starts = [], []
    times = iter(step_times)
    while not budget.done(clock, step):
        seen.append(budget.schedule_step(clock, step))
        starts.append(clock)
        clock += next(times)
        step += 1
    return seen, clock, starts


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("12m", 720), ("1.5h", 5400), ("600", 600),
                                                ("20", 20), ("0.5m", 30), (" 2 min ", 120)])
def test_durations_read_like_a_user_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["12 minutes", "m", "-5s", "0", "1e3", ""])
def test_a_duration_that_is_not_one_names_the_flag(text):
    with pytest.raises(UserError, match="--time-budget"):
        parse_duration(text)


def test_durations_are_shown_the_way_they_were_given():
    assert [format_duration(s) for s in (720, 90, 5400, 20, 61.5)] == ["12m", "90s", "1.5h", "20s", "61.5s"]


def test_a_time_budget_stops_within_one_step_of_the_budget_and_every_schedule_spans_it():
    budget = Budget.plan(steps_per_epoch=6, epochs=None, time_s=720.0)
    assert budget.schedule_steps == SCHEDULE_STEPS and budget.step_cap is None
    # uneven steps (a slow first step with the data pipeline's start-up, then ~2.4-3.9 s)
    step_times = [9.0] + [2.4 + (i % 7) * 0.25 for i in range(10_000)]
    seen, stopped_at, starts = _simulate(budget, step_times)
    assert 720.0 <= stopped_at <= 720.0 + max(step_times)  # at most one step past the budget
    assert len(seen) == sum(1 for t in starts if t < 720.0) and 200 < len(seen) < 260  # ~711 s / 3.15 s
    assert seen[0] == 0 and seen == sorted(seen) and seen[-1] < SCHEDULE_STEPS
    # progress = elapsed / budget for every schedule: the schedule step is its share of the scale
    for s, t in zip(seen, starts, strict=True):
        assert s == math.floor(t / 720.0 * SCHEDULE_STEPS)
    # so the lr's cosine and BYOL's EMA momentum reach their ends with the budget, however many steps fit
    assert warmup_cosine(seen[-1], SCHEDULE_STEPS, peak=1.0) < 1e-3
    assert cosine_tau(seen[len(seen) // 2], SCHEDULE_STEPS) == pytest.approx(0.995, abs=0.002)
    assert cosine_tau(seen[-1], SCHEDULE_STEPS) > 0.99999


def test_a_resumed_time_budget_continues_from_the_time_in_its_checkpoint():
    budget = Budget.plan(steps_per_epoch=6, epochs=None, time_s=100.0)
    full, end, _ = _simulate(budget, [1.0] * 1000)
    assert len(full) == 100 and end == 100.0
    # a crash after 40 s of loop time with a checkpoint at step 40: the rerun starts at 40 s, step 40
    rest, end2, _ = _simulate(budget, [1.0] * 1000, time_before=40.0, step_before=40)
    assert rest == full[40:] and end2 == 100.0
    # a finished budget resumed: nothing more to train
    assert _simulate(budget, [1.0], time_before=100.0, step_before=100)[0] == []


def test_a_step_budget_is_the_real_step_and_the_earlier_bound_ends_the_run():
    steps = Budget.plan(steps_per_epoch=6, epochs=None, max_steps=50)
    assert (steps.schedule_steps, steps.timed) == (50, False)
    seen, _, _ = _simulate(steps, [1.0] * 100)
    assert seen == list(range(50))
    # --epochs is an upper bound of a budget: 3 epochs x 6 steps end a 1-hour budget after 18 steps, and
    # the schedules end there too
    both = Budget.plan(steps_per_epoch=6, epochs=3, time_s=3600.0)
    seen, _, _ = _simulate(both, [1.0] * 100)
    assert len(seen) == 18 and seen[-1] == math.floor(17 / 18 * SCHEDULE_STEPS)
    assert both.describe() == "1h time budget or 18 steps"
    # the clock ends it when it comes first
    seen, end, _ = _simulate(both, [500.0] * 100)
    assert len(seen) == 8 and 3600.0 <= end < 4100.0
    assert both.eta_s(1800.0, 9, steps_per_s=0.1) == pytest.approx(90.0)  # 9 steps at 0.1/s before 30 min
    assert both.eta_s(1800.0, 9, steps_per_s=0.001) == pytest.approx(1800.0)


def test_warmup_is_a_share_of_a_time_budget_and_unchanged_without_one():
    timed = Budget.plan(steps_per_epoch=6, epochs=None, time_s=600.0)
    # BYOL's 10 warm-up epochs: 10 % of an open-ended budget; MoCo's / SwAV's none stay none
    assert timed.warmup_steps(10.0, 6, explicit=False) == MAX_BUDGET_WARMUP_FRACTION * SCHEDULE_STEPS
    assert timed.warmup_steps(0.0, 6, explicit=False) == 0
    with pytest.raises(ValueError, match="step bound"):
        timed.warmup_steps(2.0, 6, explicit=True)
    capped = Budget.plan(steps_per_epoch=6, epochs=1000, time_s=600.0)  # the recipe's share of the bound
    assert capped.warmup_steps(10.0, 6, explicit=False) == round(0.01 * SCHEDULE_STEPS)
    assert capped.warmup_steps(400.0, 6, explicit=True) == round(0.4 * SCHEDULE_STEPS)
    # no time budget: warm-up epochs x steps per epoch, at most half the run (as before budgets)
    plain = Budget.plan(steps_per_epoch=6, epochs=100)
    assert plain.warmup_steps(10.0, 6, explicit=False) == 60
    assert Budget.plan(steps_per_epoch=6, epochs=8).warmup_steps(40.0, 6, explicit=False) == 24


def test_the_optimiser_schedule_of_a_time_budget_warms_up_then_anneals_over_the_budget():
    from ray_jobs.pretrain.optim_setup import build_optimizer
    from ssl_core.methods import create_method

    method = create_method("byol", backbone="test_resnet", img_size=32, hidden_dim=32, out_dim=16)
    cfg = _cfg("byol", batch_size=32, time_budget_s=600.0)
    budget = Budget.plan(6, None, time_s=600.0)
    opt, sched = build_optimizer(method, cfg, budget.schedule_steps, 6, budget)
    peak = opt.param_groups[0]["peak_lr"]
    assert peak == pytest.approx(0.2 * (32 / 256) ** 0.5)  # BYOL's LARS lr, square-root scaled below 256
    warm = int(MAX_BUDGET_WARMUP_FRACTION * SCHEDULE_STEPS)
    assert sched.lr_at(warm // 2) == pytest.approx(peak / 2)
    assert sched.lr_at(warm) == pytest.approx(peak)
    assert sched.lr_at(SCHEDULE_STEPS - 1) < 1e-6 * peak
    # without a budget the schedule is what it always was: 100 epochs x 6 steps, 10 epochs of warm-up
    plain = _cfg("byol", batch_size=32, epochs=100)
    opt, sched = build_optimizer(method, plain, 600, 6)
    assert sched.config.total_steps == 600 and sched.config.warmup_steps == 60


@pytest.mark.parametrize(("rows", "workers", "batch"), [
    (536, 1, 32), (20_000, 1, 256), (1736, 1, 32), (5000, 1, 128), (1736, 3, 30), (20_000, 3, 255),
    (100, 8, 32), (16, 1, 16), (12, 5, 5), (3, 4, 4),
])
def test_the_default_batch_is_sized_from_the_pool_and_the_workers(rows, workers, batch):
    b, why = auto_batch_size(rows, workers)
    assert b == batch and b % workers == 0 and b >= workers
    assert why.startswith(f"{rows} slices / 32")


def test_an_explicit_batch_is_kept_and_the_epoch_limit_depends_on_a_budget():
    cfg, why = resolve(_cfg(batch_size=256), _info(1736))
    assert (cfg.batch_size, cfg.epochs, why) == (256, 100, None)
    cfg, why = resolve(_cfg(), _info(536))
    assert cfg.batch_size == 32 and why
    cfg, _ = resolve(_cfg(time_budget_s=60.0), _info(536))
    assert cfg.epochs is None  # a budget: epochs only bound it when given
    cfg, _ = resolve(_cfg(time_budget_s=60.0, epochs=5), _info(536))
    assert cfg.epochs == 5


def test_swav_freezes_prototypes_for_a_share_of_a_time_budget_and_refuses_a_step_count():
    opts = method_options(_cfg("swav", batch_size=32, time_budget_s=600.0), _info(1700), None)
    assert opts["freeze_prototypes_fraction"] == 0.1 and "freeze_prototypes_iters" not in opts
    with pytest.raises(UserError, match="--method-option freeze_prototypes_iters counts optimiser steps"):
        method_options(_cfg("swav", batch_size=32, time_budget_s=600.0,
                            method_options={"freeze_prototypes_iters": 50}), _info(1700), None)
    # a step budget knows its steps: a tenth of 200
    opts = method_options(_cfg("swav", batch_size=32, max_steps=200), _info(1700), 200)
    assert opts["freeze_prototypes_iters"] == 20


def test_the_queue_of_moco_holds_several_batches_of_a_small_pool():
    # batch 256 on 1,736 slices: a quarter of the pool was one batch (loss at chance); now four
    assert method_options(_cfg("mocov2", batch_size=256), _info(1736))["queue_size"] == 1024
    assert method_options(_cfg("mocov2"), _info(1736))["queue_size"] == 416  # auto batch 32: a quarter


def test_the_budget_is_part_of_the_run_identity(tmp_path):
    storage = str(tmp_path / "runs")
    first = PretrainConfig(method="byol", data="/d", storage=storage, experiment="e", batch_size=32,
                           time_budget_s=720.0)
    ident = resume_guard.identity(first, 64, 54, {})
    assert ident["time_budget_s"] == 720.0 and ident["epochs"] is None
    resume_guard.record(first, ident)
    (tmp_path / "runs" / "e" / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    assert resume_guard.check(first, ident)  # same budget: a resume
    longer = PretrainConfig(**{**first.to_dict(), "time_budget_s": 1800.0})
    with pytest.raises(UserError, match=r"time_budget_s: 720\.0 -> 1800\.0"):
        resume_guard.check(longer, resume_guard.identity(longer, 64, 54, {}))


def test_settings_recorded_before_budgets_existed_still_match():
    old = {"method": "byol", "epochs": 100, "batch_size": 256}  # no budget keys in the file
    cfg = _cfg(batch_size=256)
    ident = resume_guard.identity(cfg, 64, 6, {})
    assert ident["epochs"] == 100  # the default epochs without a budget, as before
    assert all(old.get(k) == ident.get(k) for k in ("time_budget_s", "max_steps"))


@pytest.mark.parametrize(("kw", "message"), [
    ({"log_every": 0}, "--log-every must be >= 1, got 0"),
    ({"shuffle_buffer": -1}, "--shuffle-buffer must be >= 0"),
    ({"cache_mb": -5}, "--cache-mb must be >= 0"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"lr": float("nan")}, "--lr must be > 0"),
    ({"weight_decay": -1e-4}, "--weight-decay must be >= 0"),
    ({"warmup_epochs": -1.0}, "--warmup-epochs must be >= 0"),
    ({"time_budget_s": 0.0}, "--time-budget must be > 0"),
    ({"time_budget_s": float("inf")}, "--time-budget must be > 0"),
    ({"max_steps": 0}, "--max-steps must be >= 1"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"cpus_per_worker": 0.0}, "--cpus-per-worker must be > 0"),
    ({"gpus_per_worker": -1.0}, "--gpus-per-worker must be >= 0"),
    ({"seed": -1}, "--seed must be >= 0"),
    ({"batch_size": 0}, "--batch-size 0 is smaller than --workers 1"),
    ({"time_budget_s": 60.0, "warmup_epochs": 5.0}, "--warmup-epochs 5 cannot be placed in a --time-budget run"),
])
def test_every_number_is_checked_before_ray_starts(kw, message):
    with pytest.raises(UserError) as e:
        _cfg(**kw).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_values_that_are_fine_pass():
    _cfg(time_budget_s=60.0, warmup_epochs=0.0).validate()  # no warm-up needs no step bound
    _cfg(time_budget_s=60.0, warmup_epochs=5.0, epochs=50).validate()
    _cfg(shuffle_buffer=0, cache_mb=0, max_steps=1, lr=1e-3, weight_decay=0.0).validate()

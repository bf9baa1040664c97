"""The report reads a study in a fixed number of MLflow client calls, however many trials it has.

Why: a paper-sized study has hundreds of trials; a call (or three) per trial made its report take
minutes against a remote tracking server. The trials' rows come from paged searches and their
predictions from one file request each, outside the client."""

from __future__ import annotations

from ray_jobs import tracking
from ray_jobs.report.collect import load_study
from ray_jobs.report.pooled import load_predictions
from tests.bench.test_bench_study_trials import log_study
from tests.ray_jobs.tracking_calls import count_tracking_calls


def _calls(tmp_path, monkeypatch, grid: tuple[int, int, int, int], name: str) -> tuple[int, int, int]:
    """(client calls, trials read, trials with predictions) of reading a study of ``grid``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    n = log_study(uri, name, grid, tmp_path)
    with monkeypatch.context() as mp:
        calls = count_tracking_calls(mp)
        study = load_study(uri, name)
        preds = load_predictions(tracking.client(uri), study.trials["run_id"].tolist())
        total = sum(calls.values())
    assert len(study.trials) == n
    return total, len(study.trials), len(preds)


def test_client_calls_do_not_grow_with_the_trials(tmp_path, monkeypatch) -> None:
    small, n_small, p_small = _calls(tmp_path, monkeypatch, (2, 1, 2, 1), "small")
    large, n_large, p_large = _calls(tmp_path, monkeypatch, (2, 3, 2, 2), "large")
    assert (n_small, n_large) == (4, 24)
    assert (p_small, p_large) == (4, 24)  # every trial's predictions were read
    assert large == small, f"{small} client calls for {n_small} trials but {large} for {n_large}"


def test_a_trial_without_predictions_is_left_out(tmp_path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_study(uri, "s", (1, 1, 2, 1), tmp_path)
    cl = tracking.client(uri)
    exp = cl.get_experiment_by_name("s").experiment_id
    bare = cl.create_run(exp).info.run_id
    ids = [*load_study(uri, "s").trials["run_id"], bare]
    assert sorted(load_predictions(cl, ids)) == sorted(ids[:-1])

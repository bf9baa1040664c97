"""Reading a study back from MLflow: the parent run and one row per finished trial.

Only MLflow is read — no Ray results, no local files — so a study run on Kubernetes can be reported
from a laptop that can reach its tracking server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ctssl_base.errors import UserError
from ray_jobs import tracking

METRIC_KEYS = ("test_auc", "test_f1_macro", "test_accuracy", "best_val_auc", "best_epoch", "trial_time_s",
               "n_train", "train_per_class_min", "late_best", "epochs_run", "max_epochs", "stopped_early",
               "extended", "converged")
TRIAL_COLUMNS = ["run_id", "encoder", "size", "size_kind", "size_value", "fold", "seed", "phase", "status",
                 "recipe", *METRIC_KEYS]
UNFINISHED_COLUMNS = ["encoder", "size", "fold", "seed", "status"]


@dataclass
class Study:
    parent_run_id: str
    params: dict[str, str]
    tags: dict[str, str]
    trials: pd.DataFrame
    #: child runs that did not finish (stopped early by ASHA or a user, failed, still running):
    #: encoder, size, fold, seed, status; they are in no table, so the report names them
    unfinished: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=UNFINISHED_COLUMNS))
    experiment_id: str = ""  # the MLflow experiment the study run is in (a study's pre-training runs too)


def find_study_run(cl, experiment: str, study_run: str | None = None):
    exp = cl.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"--experiment {experiment!r}: no such MLflow experiment at "
                        f"{tracking.redact_uri(cl.tracking_uri)}")
    if study_run:
        try:
            run = cl.get_run(study_run)
        except Exception as e:  # noqa: BLE001 - MlflowException for unknown ids
            raise UserError(f"--study-run {study_run}: {e}") from None
        kind = run.data.tags.get(tracking.TAG_KIND)
        if kind not in (None, "study"):  # a study's experiment also holds its pre-training runs
            raise UserError(f"--study-run {study_run} is a {kind} run, not a fine-tuning study run "
                            f"(tag {tracking.TAG_KIND}=study)")
        return run
    runs = cl.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'study'",
                          order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise UserError(f"--experiment {experiment!r} has no fine-tuning study run (tag {tracking.TAG_KIND}=study)")
    return runs[0]


def _all_runs(cl, exp_id: str, flt: str) -> list:
    out, token = [], None
    while True:
        page = cl.search_runs([exp_id], filter_string=flt, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def collect_trials(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
                   include_unfinished: bool = False) -> pd.DataFrame:
    """One row per trial (child run) of the study: tags + final metrics."""
    return load_study(tracking_uri, experiment, parent_run_id, include_unfinished).trials


def load_study(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
               include_unfinished: bool = False) -> Study:
    cl = tracking.client(tracking_uri)
    parent = find_study_run(cl, experiment, parent_run_id)
    pid = parent.info.run_id
    runs = _all_runs(cl, parent.info.experiment_id, f"tags.`{tracking.PARENT_TAG}` = '{pid}'")
    rows: list[dict[str, Any]] = []
    unfinished: list[dict[str, Any]] = []
    for r in runs:
        t, m = r.data.tags, r.data.metrics
        if r.info.status != "FINISHED":
            unfinished.append({"encoder": t.get("method"), "size": t.get("size"), "fold": int(t.get("fold", "0")),
                               "seed": int(t.get("seed", "0")), "status": r.info.status})
            if not include_unfinished:
                continue
        row = {"run_id": r.info.run_id, "encoder": t.get("method"), "size": t.get("size"),
               "size_kind": t.get("size_kind"), "size_value": int(t.get("size_value", "0")),
               "fold": int(t.get("fold", "0")), "seed": int(t.get("seed", "0")), "phase": t.get("ctssl.phase", "grid"),
               "status": r.info.status, "recipe": t.get("recipe_label") or _fixed_recipe(r.data.params)}
        row.update({k: m.get(k, float("nan")) for k in METRIC_KEYS})
        rows.append(row)
    df = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    gone = pd.DataFrame(unfinished, columns=UNFINISHED_COLUMNS).sort_values(UNFINISHED_COLUMNS, ignore_index=True)
    return Study(parent_run_id=pid, params=dict(parent.data.params), tags=dict(parent.data.tags), trials=df,
                 unfinished=gone, experiment_id=parent.info.experiment_id)


def _fixed_recipe(params: dict[str, str]) -> str:
    """The recipe of a trial from before recipes were tagged: its lr and frozen-epoch params."""
    if "lr" in params and "frozen_epochs" in params:
        return f"lr {float(params['lr']):g}, {params['frozen_epochs']} frozen"
    return ""


_STATUS_WORDS = {"KILLED": "stopped early (ASHA's `--asha`, or a user)", "FAILED": "failed",
                 "RUNNING": "still running or lost", "SCHEDULED": "never started"}


def unfinished_note(unfinished: pd.DataFrame) -> str:
    """One sentence naming the trials the tables leave out, grouped by status ('' when none).

    Why: a stopped or failed trial has no test metrics, so a cell's mean silently covers fewer folds;
    with ASHA the stopped ones are the weak ones, which biases that mean upwards."""
    if unfinished.empty:
        return ""
    parts = []
    for status, grp in unfinished.groupby("status", sort=True):
        names = ", ".join(f"{r.encoder}/{r.size}/fold{r.fold}/seed{r.seed}" for r in grp.itertuples())
        parts.append(f"{len(grp)} {_STATUS_WORDS.get(status, status.lower())} ({names})")
    return (f"{len(unfinished)} trial(s) did not finish and are left out of every table and test below: "
            + "; ".join(parts) + ". Means of the cells they belong to cover fewer folds"
            + ("; a trial ASHA stops was among the weaker ones at its rung, so those means lean high."
               if (unfinished["status"] == "KILLED").any() else "."))

"""The report of a study evaluated by the linear probe alone (``finetune.evaluation: linear``).

Such a study has no fine-tuning trials: its results are the linear probe's cells (one AUC per encoder,
training-set size, fold and seed, ``linear_probe_cells.csv`` on the study's parent run). Every encoder
is probed on exactly the same training rows of a cell, so an encoder is compared with the baseline
cell by cell: the mean of the paired differences with a bootstrap 95 % interval, and how many cells it
wins. The other sections (pre-training, online probe, embedding maps, budget curve, volume checks) are
the fine-tuning report's own.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import numpy as np
import pandas as pd

from ctssl_base.errors import UserError
from ray_jobs import tracking
from ray_jobs.report.budget_plot import CSV, FINETUNE_CSV, RANDOM, bootstrap_band, report_section, size_order
from ray_jobs.report.pages import REPORT_ARTIFACT, ReportPaths, extras, write_pages
from ray_jobs.report.plots import plot_auc_vs_size
from ray_jobs.report.volume_checks import SECTION as VOLUME_SECTION
from ray_jobs.report.volume_checks import volume_checks_markdown

CELLS_CSV = "linear_probe_cells.csv"  # the linear stage's artifact on the parent run
SUMMARY_COLUMNS = ["encoder", "size", "n_trials", "samples_per_class", "auc_mean", "auc_std", "ci_low", "ci_high"]
PAIRED_COLUMNS = ["encoder", "size", "n", "diff_mean", "ci_low", "ci_high", "wins"]


def linear_trials(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells in the shape the fine-tuning report's plot reads (``test_auc``, ``train_per_class_min``)."""
    return cells.rename(columns={"auc": "test_auc"}).assign(size=lambda d: d["size"].astype(str))


def linear_summary(trials: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per encoder and size: mean, std and bootstrap 95 % interval of the cells' test AUC, smallest size
    first (``summary.csv``: the columns the registry alias and the pre-training table read)."""
    rows = []
    for (enc, size), g in trials.groupby(["encoder", "size"], sort=False):
        aucs = g["test_auc"].astype(float).to_numpy()
        m, lo, hi = bootstrap_band(aucs, seed=seed)
        rows.append({"encoder": enc, "size": size, "n_trials": len(g),
                     "samples_per_class": float(g["train_per_class_min"].mean()), "auc_mean": m,
                     "auc_std": float(np.nanstd(aucs, ddof=1)) if np.isfinite(aucs).sum() > 1 else math.nan,
                     "ci_low": lo, "ci_high": hi})
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    order = sorted(range(len(out)), key=lambda i: (out["encoder"][i], size_order(out["size"][i])))
    return out.iloc[order].reset_index(drop=True)


def paired_vs_baseline(trials: pd.DataFrame, baseline: str = RANDOM, seed: int = 0) -> pd.DataFrame:
    """Per encoder (not the baseline) and size: the cells both have (same fold, seed and training rows),
    the mean of encoder minus baseline with a bootstrap 95 % interval, and the cells the encoder wins."""
    base = trials[trials["encoder"] == baseline].set_index(["size", "fold", "seed"])["test_auc"]
    rows = []
    for (enc, size), g in trials[trials["encoder"] != baseline].groupby(["encoder", "size"], sort=False):
        b = base.reindex(pd.MultiIndex.from_frame(g[["size", "fold", "seed"]])).to_numpy(dtype=float)
        d = g["test_auc"].to_numpy(dtype=float) - b
        d = d[np.isfinite(d)]
        m, lo, hi = bootstrap_band(d, seed=seed)
        rows.append({"encoder": enc, "size": size, "n": int(d.size), "diff_mean": m, "ci_low": lo, "ci_high": hi,
                     "wins": int((d > 0).sum())})
    out = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    order = sorted(range(len(out)), key=lambda i: (size_order(out["size"][i]), out["encoder"][i]))
    return out.iloc[order].reset_index(drop=True)


def _f(v: float, spec: str = ".3f") -> str:
    return "n/a" if not math.isfinite(v) else format(v, spec)


def verdict(summary: pd.DataFrame, paired: pd.DataFrame, baseline: str = RANDOM) -> str:
    """One paragraph at the smallest size: the best encoder by mean AUC, its paired difference to the
    baseline and whether the interval excludes zero (a gain, a loss, or no difference shown)."""
    if paired.empty:
        return f"no encoder besides `{baseline}` was probed: there is nothing to compare"
    smallest = min(paired["size"].astype(str), key=size_order)
    at = paired[paired["size"].astype(str) == smallest]
    means = summary.set_index(["encoder", "size"])["auc_mean"]
    best = max(at.itertuples(index=False), key=lambda r: (means.get((r.encoder, smallest), -math.inf), r.encoder))
    b = means.get((baseline, smallest), math.nan)
    if math.isfinite(best.ci_low) and best.ci_low > 0:
        word = "a gain: the interval lies above zero"
    elif math.isfinite(best.ci_high) and best.ci_high < 0:
        word = "a loss: the interval lies below zero"
    else:
        word = "no difference shown: the interval includes zero"
    return (f"At the smallest training-set size ({smallest}) the best linear probe is `{best.encoder}`: mean "
            f"test AUC {_f(means.get((best.encoder, smallest), math.nan))} against {_f(b)} for `{baseline}`, a "
            f"paired difference of {_f(best.diff_mean, '+.3f')} (bootstrap 95 % interval {_f(best.ci_low, '+.3f')} "
            f"to {_f(best.ci_high, '+.3f')} over {best.n} cells of folds x seeds; it wins {best.wins} of "
            f"{best.n}): {word}. The study did not fine-tune (`finetune.evaluation: linear`); a linear probe "
            "measures the frozen features, and fine-tuning can rank encoders differently.")


def summary_markdown(summary: pd.DataFrame) -> str:
    lines = ["| encoder | size | samples/class | cells | AUC (mean ± std) | bootstrap 95 % interval |",
             "|---|---|---|---|---|---|"]
    for r in summary.itertuples(index=False):
        sd = "" if not math.isfinite(r.auc_std) else f" ± {r.auc_std:.3f}"
        lines.append(f"| {r.encoder} | {r.size} | {r.samples_per_class:.0f} | {r.n_trials} | {_f(r.auc_mean)}{sd} "
                     f"| {_f(r.ci_low)}-{_f(r.ci_high)} |")
    return "\n".join(lines)


def paired_markdown(paired: pd.DataFrame, baseline: str = RANDOM) -> str:
    lines = [f"| encoder | size | cells | AUC − `{baseline}` | bootstrap 95 % interval | cells won |",
             "|---|---|---|---|---|---|"]
    for r in paired.itertuples(index=False):
        lines.append(f"| {r.encoder} | {r.size} | {r.n} | {_f(r.diff_mean, '+.3f')} "
                     f"| {_f(r.ci_low, '+.3f')} to {_f(r.ci_high, '+.3f')} | {r.wins}/{r.n} |")
    return "\n".join(lines)


def _artifact(cl: Any, run_id: str, name: str, dst: str) -> str | None:
    """A file of the parent run's artifact root, downloaded into ``dst``; None when the run lacks it."""
    if name not in {a.path for a in cl.list_artifacts(run_id)}:
        return None
    return cl.download_artifacts(run_id, name, dst)


def build_linear(cfg: Any, out: str, study: Any) -> ReportPaths:
    """The report of a linear-only study into the local folder ``out`` (``cfg``: the report's
    ReportConfig, ``study``: its loaded parent run)."""
    cl = tracking.client(cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                         or tracking.resolve_tracking_uri(None, cfg.storage))
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctssl-linear-") as tmp:
        cells_csv = _artifact(cl, study.parent_run_id, CELLS_CSV, tmp)
        if cells_csv is None:
            raise UserError(f"study run {study.parent_run_id} of {cfg.experiment!r} has no {CELLS_CSV}: its "
                            "linear stage did not finish")
        trials = linear_trials(pd.read_csv(cells_csv))
        budget = cfg.budget_curve or _artifact(cl, study.parent_run_id, CSV, tmp)
        tuned = cfg.budget_finetune or _artifact(cl, study.parent_run_id, FINETUNE_CSV, tmp)
        budget_section = report_section(budget, out, None, tuned) if budget else None
    summary = linear_summary(trials)
    paired = paired_vs_baseline(trials, cfg.baseline)
    plot = plot_auc_vs_size(trials, os.path.join(out, "auc_vs_size.png"),
                            title=f"{cfg.experiment}: linear-probe AUC vs size")
    ex = extras(cl, study, cfg.baseline, sorted(trials["encoder"].unique()), summary, cfg.embedding_maps, out,
                cfg.experiment)
    csv = os.path.join(out, "summary.csv")
    summary.to_csv(csv, index=False)
    sections = [
        (f"Linear-probe study `{cfg.experiment}`",
         f"MLflow parent run `{study.parent_run_id}`; {len(trials)} probed cells (encoder x size x fold x "
         f"seed); dataset {study.tags.get('dataset', '?')}; classes {study.params.get('classes', '?')}. Each "
         "frozen encoder embeds the labelled set once; a logistic regression per cell is fitted on the "
         "cell's training rows, its regularisation chosen on the fold's validation rows, and scored once "
         "on the fold's test patients."),
        ("Verdict at the smallest training-set size", verdict(summary, paired, cfg.baseline)),
        ("Linear-probe test AUC", summary_markdown(summary)),
        (f"Paired difference to `{cfg.baseline}` (same cells)", paired_markdown(paired, cfg.baseline)),
        ("AUC vs training-set size", "![AUC vs training-set size](auc_vs_size.png)"),
        *ex.sections(),
        *([budget_section] if budget_section else []),
        *([(VOLUME_SECTION, volume_checks_markdown(cfg.prep_manifests))] if cfg.prep_manifests else []),
    ]
    paths, files = write_pages(out, cfg.experiment, sections, plot, csv, ex,
                               tables={"summary": summary, "paired": paired},
                               doc={"parent_run_id": study.parent_run_id, "evaluation": "linear",
                                    "paired": paired.to_dict(orient="records")})
    if cfg.log_to_run:
        tracking.log_artifacts(cl, study.parent_run_id, files, REPORT_ARTIFACT)
    return paths

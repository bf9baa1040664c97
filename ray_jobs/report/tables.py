"""The numbers of the report: fold statistics, paired tests against the baseline, minimal label counts.

All functions take the trial table of :mod:`ray_jobs.report.collect` (one row per trial) and return
plain DataFrames / dicts, so the study driver, the report command and tests share them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

from ray_jobs.trial_record import SizeSpec

METRICS = {"auc": "test_auc", "f1": "test_f1_macro", "acc": "test_accuracy"}


def _size_key(label: str) -> float:
    try:
        return SizeSpec.from_label(label).sort_key()
    except ValueError:
        return math.nan


def summarise(trials: pd.DataFrame) -> pd.DataFrame:
    """Mean +- std over folds (and seeds) of AUC / F1 / accuracy per encoder x size, smallest size first."""
    cols = ["encoder", "size", "n_trials", "samples_per_class"] + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
    if trials.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (enc, size), g in trials.groupby(["encoder", "size"], sort=False):
        row: dict[str, Any] = {"encoder": enc, "size": size, "n_trials": len(g),
                               "samples_per_class": float(np.nanmean(g["train_per_class_min"]))}
        for k, col in METRICS.items():
            vals = g[col].astype(float).to_numpy()
            row[f"{k}_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
            row[f"{k}_std"] = float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else math.nan
        rows.append(row)
    return by_encoder_and_size(pd.DataFrame(rows, columns=cols))


def by_encoder_and_size(table: pd.DataFrame) -> pd.DataFrame:
    """Rows ordered by encoder, then training-set size from smallest to "all"."""
    key = table["size"].map(_size_key)
    return table.assign(_k=key).sort_values(["encoder", "_k"]).drop(columns="_k").reset_index(drop=True)


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f}" if not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def summary_markdown(summary: pd.DataFrame) -> str:
    head = "| encoder | size | samples/class | trials | AUC | F1 | accuracy |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in summary.itertuples(index=False):
        lines.append(f"| {r.encoder} | {r.size} | {r.samples_per_class:.0f} | {r.n_trials} | "
                     f"{_pm(r.auc_mean, r.auc_std)} | {_pm(r.f1_mean, r.f1_std)} | {_pm(r.acc_mean, r.acc_std)} |")
    return "\n".join(lines)


def wilcoxon_vs_baseline(trials: pd.DataFrame, baseline: str = "random", metric: str = "test_auc") -> pd.DataFrame:
    """Paired Wilcoxon signed-rank test of each encoder against ``baseline`` per size, pairs = (fold, seed).

    With five folds the smallest attainable two-sided p is 0.0625, so "not significant" is expected
    for a single seed; the table reports the pair count so a reader can judge.
    """

    cols = ["encoder", "size", "n_pairs", "median_diff", "statistic", "p_value"]
    rows = []
    base = trials[trials["encoder"] == baseline]
    if base.empty:
        return pd.DataFrame(columns=cols)
    for (enc, size), g in trials[trials["encoder"] != baseline].groupby(["encoder", "size"], sort=False):
        b = base[base["size"] == size]
        merged = g.merge(b, on=["fold", "seed"], suffixes=("", "_base"))
        merged = merged[np.isfinite(merged[metric]) & np.isfinite(merged[f"{metric}_base"])]
        diff = (merged[metric] - merged[f"{metric}_base"]).to_numpy(dtype=float)
        stat, p = math.nan, math.nan
        if len(diff) >= 2:
            if np.allclose(diff, 0):
                stat, p = 0.0, 1.0
            else:
                res = wilcoxon(diff, zero_method="zsplit")
                stat, p = float(res.statistic), float(res.pvalue)
        rows.append({"encoder": enc, "size": size, "n_pairs": len(diff),
                     "median_diff": float(np.median(diff)) if len(diff) else math.nan, "statistic": stat,
                     "p_value": p})
    return by_encoder_and_size(pd.DataFrame(rows, columns=cols))


def wilcoxon_markdown(table: pd.DataFrame, baseline: str) -> str:
    lines = [f"| encoder | size | pairs | median ΔAUC vs {baseline} | W | p |", "|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        p = "n/a" if not math.isfinite(r.p_value) else f"{r.p_value:.3g}"
        w = "n/a" if not math.isfinite(r.statistic) else f"{r.statistic:g}"
        d = "n/a" if not math.isfinite(r.median_diff) else f"{r.median_diff:+.3f}"
        lines.append(f"| {r.encoder} | {r.size} | {r.n_pairs} | {d} | {w} | {p} |")
    return "\n".join(lines)


def minimal_samples(summary: pd.DataFrame, target_auc: float | None = None,
                    margin: float | None = None) -> pd.DataFrame:
    """Per encoder, the smallest evaluated size (as samples per class) whose mean AUC reaches the
    target, or is within ``margin`` of that encoder's largest-size AUC."""
    cols = ["encoder", "threshold", "min_size", "min_samples_per_class", "auc_at_min", "full_auc"]
    rows = []
    for enc, g in summary.groupby("encoder", sort=False):
        g = g.assign(_k=g["size"].map(_size_key)).sort_values("_k")
        full_auc = float(g["auc_mean"].iloc[-1])
        thr = target_auc if target_auc is not None else (full_auc - margin if margin is not None else math.nan)
        ok = g[g["auc_mean"] >= thr] if math.isfinite(thr) else g.iloc[0:0]
        if ok.empty:
            rows.append({"encoder": enc, "threshold": thr, "min_size": None, "min_samples_per_class": math.nan,
                         "auc_at_min": math.nan, "full_auc": full_auc})
        else:
            first = ok.iloc[0]
            rows.append({"encoder": enc, "threshold": thr, "min_size": first["size"],
                         "min_samples_per_class": float(first["samples_per_class"]),
                         "auc_at_min": float(first["auc_mean"]), "full_auc": full_auc})
    return pd.DataFrame(rows, columns=cols)


def recipe_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per encoder x size, which recipes the trials chose (most often first), e.g.
    "lr 0.001, 0 frozen: 5/6; lr 0.0001, 1 frozen: 1/6"."""
    cols = ["encoder", "size", "chosen"]
    if trials.empty or "recipe" not in trials:
        return pd.DataFrame(columns=cols)
    rows = []
    for (enc, size), g in trials.groupby(["encoder", "size"], sort=False):
        counts = g["recipe"].fillna("").replace("", "?").value_counts()
        rows.append({"encoder": enc, "size": size,
                     "chosen": "; ".join(f"{k}: {v}/{len(g)}" for k, v in counts.items())})
    return by_encoder_and_size(pd.DataFrame(rows, columns=cols))


def recipe_markdown(table: pd.DataFrame) -> str:
    lines = ["| encoder | size | recipe chosen on validation (trials) |", "|---|---|---|"]
    lines += [f"| {r.encoder} | {r.size} | {r.chosen} |" for r in table.itertuples(index=False)]
    return "\n".join(lines)


def undertrained_cells(trials: pd.DataFrame) -> pd.DataFrame:
    """Cells where at least half of the trials had their best validation epoch in the last 10 % of
    training: the curves were still rising, so more epochs could change those means (and a ranking
    that depends on them)."""
    cols = ["encoder", "size", "n_trials", "n_late"]
    if trials.empty or "late_best" not in trials:
        return pd.DataFrame(columns=cols)
    rows = []
    for (enc, size), g in trials.groupby(["encoder", "size"], sort=False):
        late = g["late_best"].astype(float)
        n_late = int((late[np.isfinite(late)] > 0.5).sum())
        if n_late and 2 * n_late >= len(g):
            rows.append({"encoder": enc, "size": size, "n_trials": len(g), "n_late": n_late})
    return by_encoder_and_size(pd.DataFrame(rows, columns=cols))


def undertrained_note(cells: pd.DataFrame) -> str:
    if cells.empty:
        return "No cell peaked in its last 10 % of epochs: every curve had levelled off."
    names = ", ".join(f"`{r.encoder}` at {r.size} ({r.n_late}/{r.n_trials} trials)" for r in cells.itertuples())
    return (f"**Possibly under-trained**: best validation epoch in the last 10 % of training for {names}. "
            "These curves were still rising; more fine-tuning epochs could change their means.")


CONVERGENCE_COLUMNS = ["encoder", "size", "n_trials", "n_stopped", "n_hit_max", "n_extended", "n_unconverged",
                       "max_epochs"]


def _metric(g: pd.DataFrame, col: str) -> np.ndarray:
    """A trial metric as floats; NaN where it was not logged (a trial of an older ctssl)."""
    return g[col].astype(float).to_numpy() if col in g else np.full(len(g), math.nan)


def convergence_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per encoder x size: how the trials' chosen runs ended. ``n_stopped``: the early-stopping rule
    ended them within the maximum (validation had stopped improving); ``n_hit_max``: they reached the
    maximum (a fixed-length run always does); ``n_extended``: of those, the ones still improving there
    that continued once; ``n_unconverged``: they ended with validation still improving, so their test
    AUC is a lower bound of what the encoder reaches. Trials of an older ctssl (no ``converged``
    metric) count as unconverged when their best epoch was in the last 10 % of their fixed epoch
    count (``late_best``)."""
    if trials.empty:
        return pd.DataFrame(columns=CONVERGENCE_COLUMNS)
    rows = []
    for (enc, size), g in trials.groupby(["encoder", "size"], sort=False):
        conv, late = _metric(g, "converged"), _metric(g, "late_best")
        unconv = np.where(np.isfinite(conv), conv < 0.5, late > 0.5)  # NaN > 0.5 is False: not flagged
        extended = _metric(g, "extended") > 0.5
        stopped = (_metric(g, "stopped_early") > 0.5) & ~extended
        maxes = _metric(g, "max_epochs")
        rows.append({"encoder": enc, "size": size, "n_trials": len(g), "n_stopped": int(stopped.sum()),
                     "n_hit_max": int((~stopped).sum()), "n_extended": int(extended.sum()),
                     "n_unconverged": int(unconv.sum()),
                     "max_epochs": float(np.nanmax(maxes)) if np.isfinite(maxes).any() else math.nan})
    return by_encoder_and_size(pd.DataFrame(rows, columns=CONVERGENCE_COLUMNS))


def unconverged_cells(conv: pd.DataFrame) -> pd.DataFrame:
    """The cells with at least one run that ended still improving: their mean rests on a run cut off
    by its maximum, so the verdict leaves them out (a baseline cut short makes every encoder look
    better than it is)."""
    if conv.empty:
        return conv
    return conv[conv["n_unconverged"] > 0].reset_index(drop=True)


def convergence_note(conv: pd.DataFrame) -> str:
    """How many runs stopped on validation and how many hit the maximum, and the unconverged cells."""
    if conv.empty:
        return ""
    n, stopped, hit = int(conv["n_trials"].sum()), int(conv["n_stopped"].sum()), int(conv["n_hit_max"].sum())
    ext, unconv = int(conv["n_extended"].sum()), int(conv["n_unconverged"].sum())
    text = (f"Of {n} runs, {stopped} stopped on validation before the maximum number of epochs and {hit} hit "
            "the maximum" + (f" ({ext} of them still improving there, continued once)" if ext else "")
            + f"; {unconv} ended with validation still improving.")
    bad = unconverged_cells(conv)
    if bad.empty:
        return text + " Every cell converged: the verdict rests on none cut off by its maximum."
    names = ", ".join(f"`{r.encoder}` at {r.size} ({r.n_unconverged}/{r.n_trials} runs)" for r in bad.itertuples())
    return (text + f" **Unconverged**, left out of the verdict: {names}. Their validation AUC was still "
            "rising when training ended, so their means understate what more epochs give; raise the maximum "
            "(`epochs`) and run again.")


def smallest_size_verdict(summary: pd.DataFrame, wil: pd.DataFrame, baseline: str, alpha: float = 0.05,
                          boot: pd.DataFrame | None = None, protocol: str | None = None,
                          undertrained: pd.DataFrame | None = None, convergence: pd.DataFrame | None = None) -> str:
    """The study's question in plain words: at the smallest training-set size, which pre-trained
    encoders beat ``baseline``, as far as the tests support it?

    An encoder "beats" the baseline only when its mean AUC is higher, the median paired difference
    is not negative, and a test says so at ``alpha``: the paired Wilcoxon over folds x seeds or the
    patient-level bootstrap of the pooled out-of-fold AUC (``boot``, see :mod:`ray_jobs.report.pooled`),
    which has no floor on p. A higher mean without that support is reported as such, never as a win.
    With n paired folds the exact two-sided Wilcoxon p cannot go below 2 / 2**n (0.25 for 3 folds,
    0.0625 for 5), so the verdict names that floor instead of letting "not significant" read as
    "no effect". ``protocol`` (how recipes were set) and under-trained cells are stated with it.

    ``convergence`` (:func:`convergence_table`) takes unconverged cells out: an encoder whose cell
    ended still improving is not judged, and an unconverged baseline cell means no verdict at all,
    never a "beats" against a baseline that was cut short.
    """
    if summary.empty or baseline not in set(summary["encoder"]):
        return f"no `{baseline}` trials: nothing to compare with"
    smallest = min(summary["size"], key=_size_key)
    at = summary[summary["size"] == smallest].set_index("encoder")
    base_auc = float(at.loc[baseline, "auc_mean"])
    lines = []
    if protocol:
        lines += [f"Fine-tuning recipe: {protocol}.", ""]
    lines += [f"Smallest training-set size: **{smallest}**; `{baseline}` mean test AUC {base_auc:.3f}.", ""]
    better, ahead = [], []
    flagged = set()
    if undertrained is not None and not undertrained.empty:
        flagged = {(r.encoder, r.size) for r in undertrained.itertuples()}
    unconv: dict[str, str] = {}
    if convergence is not None and not convergence.empty:
        bad = unconverged_cells(convergence)
        unconv = {r.encoder: f"{r.n_unconverged}/{r.n_trials} runs still improving at the maximum"
                  for r in bad[bad["size"] == smallest].itertuples()}
    others = at.drop(index=baseline).sort_values("auc_mean", ascending=False)
    if baseline in unconv:
        lines += [f"`{baseline}` at {smallest} is **unconverged** ({unconv[baseline]}): no encoder is judged "
                  "against it, since a baseline cut short makes every encoder look better; raise the maximum "
                  "(`epochs`) and run again.", ""]
        for enc, row in others.iterrows():
            lines.append(f"- `{enc}`: mean AUC {float(row['auc_mean']):.3f} "
                         f"({float(row['auc_mean']) - base_auc:+.3f}); not judged (unconverged baseline).")
        lines += ["", f"**No verdict at {smallest}: the `{baseline}` cell is unconverged, so no pre-trained "
                      f"encoder is shown to beat it.**"]
        return "\n".join(lines)
    excluded = []
    for enc, row in others.iterrows():
        diff = float(row["auc_mean"]) - base_auc
        if enc in unconv:
            excluded.append(enc)
            lines.append(f"- `{enc}` is not judged: unconverged cell ({unconv[enc]}); mean AUC "
                         f"{float(row['auc_mean']):.3f} ({diff:+.3f}).")
            continue
        w = wil[(wil["encoder"] == enc) & (wil["size"] == smallest)] if not wil.empty else wil
        p = float(w["p_value"].iloc[0]) if len(w) else math.nan
        n = int(w["n_pairs"].iloc[0]) if len(w) else 0
        med = float(w["median_diff"].iloc[0]) if len(w) else math.nan
        floor = 2.0 / 2**n if n else math.nan
        if not math.isfinite(p):
            sig = "no paired test (fewer than 2 folds)"
        elif p < alpha:
            sig = f"significant (Wilcoxon p = {p:.3g} < {alpha})"
        elif floor >= alpha:
            sig = (f"not significant (p = {p:.3g}); with {n} paired folds no result can reach p < {alpha} "
                   f"(smallest attainable p = {floor:.3g}): run more folds or seeds to test it")
        else:
            sig = f"not significant (Wilcoxon p = {p:.3g} >= {alpha})"
        supported = (diff > 0 and not (math.isfinite(med) and med < 0)
                     and ((math.isfinite(p) and p < alpha) or _bootstrap_supports(boot, enc, smallest, alpha)))
        if supported:
            verb = "beats"
            better.append(enc)
        elif diff > 0:
            why = "the median paired difference is negative" if math.isfinite(med) and med < 0 else \
                "no test supports it"
            verb = f"is ahead of `{baseline}` but not shown to beat it ({why})"
            ahead.append(enc)
        else:
            verb = f"does not beat `{baseline}`"
        if verb == "beats":
            verb = f"beats `{baseline}`"
        caveat = " (under-trained cell: see below)" if (enc, smallest) in flagged or (baseline, smallest) in flagged \
            else ""
        lines.append(f"- `{enc}` {verb}: mean AUC {float(row['auc_mean']):.3f} "
                     f"({diff:+.3f}); {sig}{_bootstrap_clause(boot, enc, smallest, alpha)}{caveat}.")
    summary_line = (f"**{len(better)} of {len(at) - 1 - len(excluded)} pre-trained encoders beat `{baseline}` at "
                    f"{smallest}"
                    + (f" (supported by a test at {alpha}): {', '.join(better)}.**" if better else ".**"))
    if ahead:
        summary_line += (f" Ahead in mean AUC without a test that supports it: {', '.join(ahead)} — "
                         "not evidence of a gain.")
    if excluded:
        summary_line += f" Left out of the verdict as unconverged: {', '.join(excluded)}."
    lines += ["", summary_line]
    return "\n".join(lines)


def _bootstrap_supports(boot: pd.DataFrame | None, enc: str, size: str, alpha: float) -> bool:
    """The pooled-AUC bootstrap finds ``enc`` better than the baseline at ``alpha``."""
    if boot is None or boot.empty:
        return False
    b = boot[(boot["encoder"] == enc) & (boot["size"] == size)]
    if b.empty:
        return False
    p, d = float(b["p_value"].iloc[0]), float(b["diff"].iloc[0])
    return math.isfinite(p) and p < alpha and d > 0


def _bootstrap_clause(boot: pd.DataFrame | None, enc: str, size: str, alpha: float) -> str:
    if boot is None or boot.empty:
        return ""
    b = boot[(boot["encoder"] == enc) & (boot["size"] == size)]
    if b.empty or not math.isfinite(float(b["p_value"].iloc[0])):
        return ""
    r = b.iloc[0]
    verdict = "significant" if r["p_value"] < alpha else "not significant"
    return (f"; patient-level bootstrap of the pooled out-of-fold AUC ({int(r['patients'])} patients): "
            f"ΔAUC {r['diff']:+.3f}, 95 % CI {r['ci_low']:+.3f} .. {r['ci_high']:+.3f}, p = {r['p_value']:.3g}: "
            f"**{verdict}** at {alpha}")

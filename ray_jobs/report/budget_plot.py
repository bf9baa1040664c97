"""Gain versus pre-training budget: linear-probe AUC of each method's budget-curve checkpoints against
their pre-training time, with the random-init encoder's probe as the band to beat.

The table is ``budget_curve.csv`` of a study (columns ``method, fraction, step, train_time_s, size,
auc_mean, ci_low, ci_high, n``); rows of method :data:`RANDOM` are the baseline (no pre-training, so
no time). A method *crosses* at the first fraction whose whole 95 % interval lies above the
baseline's mean: where pre-training starts to pay at that labelled size. The gain per doubling is the
least-squares slope of the mean AUC over log2 of the pre-training time, so a team can read how much
more time is worth.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # headless: reports are built in jobs and CI

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ray_jobs.trial_record import SizeSpec  # noqa: E402

RANDOM = "random"
COLUMNS = ["method", "fraction", "step", "train_time_s", "size", "auc_mean", "ci_low", "ci_high", "n"]
SECTION = "Gain versus pre-training budget"
CSV, PLOT = "budget_curve.csv", "budget_curve.png"
#: the budget-finetune stage's table and plot (the same columns, fine-tuning's test AUC)
FINETUNE_CSV, FINETUNE_PLOT = "budget_finetune.csv", "budget_finetune.png"
LINEAR_YLABEL = "linear-probe test AUC (mean, 95 % interval)"
FINETUNE_YLABEL = "fine-tuned test AUC (mean, 95 % interval)"


def bootstrap_band(aucs: np.ndarray | list[float], seed: int = 0, rounds: int = 2000) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95 % interval of per-cell AUCs (folds x seeds)."""
    a = np.asarray(aucs, dtype=float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return math.nan, math.nan, math.nan
    if a.size == 1:
        return float(a[0]), float(a[0]), float(a[0])
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(rounds, a.size))].mean(axis=1)
    return float(a.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def crossing(curve: pd.DataFrame, baseline_mean: float) -> float | None:
    """The first fraction whose interval lies wholly above ``baseline_mean``; None when none does."""
    for _, r in curve.sort_values("fraction").iterrows():
        if r["ci_low"] > baseline_mean:
            return float(r["fraction"])
    return None


def gain_per_doubling(curve: pd.DataFrame) -> float | None:
    """Least-squares slope of mean AUC over log2(pre-training seconds); None with < 2 distinct times."""
    c = curve[(curve["train_time_s"] > 0) & np.isfinite(curve["auc_mean"])]
    x = np.log2(c["train_time_s"].to_numpy(dtype=float))
    if np.unique(x).size < 2:
        return None
    return float(np.polyfit(x, c["auc_mean"].to_numpy(dtype=float), 1)[0])


def summary_lines(table: pd.DataFrame) -> list[str]:
    """One line per method and labelled size: where it crosses the random baseline, and its gain per
    doubling of pre-training time."""
    lines = []
    for size, at in table.groupby("size", sort=True):
        base = at[at["method"] == RANDOM]
        if base.empty:
            lines.append(f"{size} per class: no random-init baseline measured, no crossing can be read")
            continue
        b = float(base["auc_mean"].iloc[0])
        for method, curve in at[at["method"] != RANDOM].groupby("method", sort=True):
            f = crossing(curve, b)
            if f is None:
                where = "does not cross within the measured budget"
            else:
                r = curve[curve["fraction"] == f].iloc[0]
                where = (f"crosses at {f:g} of its budget (step {int(r['step'])}, {r['train_time_s']:.0f} s; "
                         f"AUC {r['auc_mean']:.3f}, 95 % interval {r['ci_low']:.3f}-{r['ci_high']:.3f})")
            g = gain_per_doubling(curve)
            gain = "gain per doubling of pre-training time: n/a" if g is None else \
                f"gain per doubling of pre-training time: {round(g, 3) + 0.0:+.3f} AUC"
            lines.append(f"{method} at {size} per class (random init {b:.3f}): {where}; {gain}")
    return lines


def finetuned_reference(summary: pd.DataFrame | None) -> dict[str, float]:
    """Random init's mean fine-tuned test AUC per training-set size (keys as text) from the report's
    summary: the bar a linear probe has to clear before it can stand in for fine-tuning."""
    if summary is None or summary.empty:
        return {}
    rows = summary[summary["encoder"] == RANDOM]
    return {str(r.size): float(r.auc_mean) for r in rows.itertuples(index=False) if np.isfinite(r.auc_mean)}


def plot_budget_curve(table: pd.DataFrame, path: str, title: str | None = None,
                      finetuned: dict[str, float] | None = None, ylabel: str | None = None) -> str:
    """AUC (mean, 95 % interval as error bars) against pre-training seconds (log x) per method and
    size, the random-init band shaded behind; ``finetuned`` (size -> AUC) adds random init's
    fine-tuned AUC as a dotted line at each probed size. ``ylabel``: what the AUC is of (the linear
    probe's by default; the budget-finetune stage's table is fine-tuning's)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    curves = table[table["method"] != RANDOM]
    if curves.empty:
        ax.text(0.5, 0.5, "no budget-curve checkpoints", ha="center", va="center", transform=ax.transAxes)
    multi = table["size"].nunique() > 1
    for i, ((method, size), c) in enumerate(curves.groupby(["method", "size"], sort=True)):
        c = c.sort_values("train_time_s")
        err = np.vstack([c["auc_mean"] - c["ci_low"], c["ci_high"] - c["auc_mean"]])
        ax.errorbar(c["train_time_s"], c["auc_mean"], yerr=err, fmt="-o", ms=4, capsize=2, color=f"C{i % 10}",
                    label=f"{method} ({size}/class)" if multi else method)
    for _, b in table[table["method"] == RANDOM].iterrows():
        ax.axhspan(b["ci_low"], b["ci_high"], color="0.5", alpha=0.2, lw=0)
        ax.axhline(b["auc_mean"], color="0.4", lw=1, ls="--",
                   label=f"random init ({b['size']}/class)" if multi else "random init")
    for size in sorted({str(x) for x in table["size"]} & set(finetuned or {})):
        ax.axhline((finetuned or {})[size], color="0.15", lw=1.2, ls=":",
                   label=f"random init, fine-tuned ({size}/class)" if multi else "random init, fine-tuned")
    if (curves["train_time_s"] > 0).any():
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        times: list[int] = []
        for x in sorted(float(x) for x in curves["train_time_s"] if x > 0):
            if not times or x > times[-1] * 1.03:  # one tick per budget (the methods' clocks differ by a second)
                times.append(round(x))
        if len(times) <= 8:  # the measured budgets themselves, not the decades between them
            ax.set_xticks(times, [f"{x:g}" for x in times])
    if not table.empty:
        ax.legend(fontsize=8)
    ax.set_xlabel("pre-training time (s of training loop)")
    ax.set_ylabel(ylabel or LINEAR_YLABEL)
    ax.set_title(title or "Gain versus pre-training budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def reference_lines(table: pd.DataFrame, finetuned: dict[str, float]) -> list[str]:
    """Per probed size with a fine-tuned random-init AUC: which methods' probes at their full budget
    reach it (the linear probe alone would then do as well as fine-tuning from scratch)."""
    lines = []
    for size, at in table.groupby("size", sort=True):
        ref = finetuned.get(str(size))
        if ref is None:
            continue
        curves = at[at["method"] != RANDOM]
        full = curves[curves["fraction"] == curves.groupby("method")["fraction"].transform("max")]
        above = sorted(r.method for r in full.itertuples(index=False) if r.auc_mean >= ref)
        reach = ("reached at the full budget by " + ", ".join(above)) if above else \
            "no method's linear probe reaches it within the measured budget"
        lines.append(f"random init fine-tuned at {size} per class: {ref:.3f} (dotted line); {reach}")
    return lines


def budget_section(table: pd.DataFrame, image: str, finetuned: dict[str, float] | None = None) -> str:
    """The body of the report's section; ``image`` is the plot's file name next to the report."""
    lines = ["Linear-probe AUC of checkpoints kept at fractions of each pre-training run's budget; the grey "
             "band is the random-init encoder's probe (mean, bootstrap 95 % interval over folds x seeds)"
             + ("; the dotted line is random init fine-tuned by the study (mean over folds x seeds)."
                if finetuned else "."), "",
             f"![AUC versus pre-training time]({image})", ""]
    lines += [f"- {s}" for s in summary_lines(table) + reference_lines(table, finetuned or {})]
    return "\n".join(lines) + "\n"


def report_section(csv: str, out: str, summary: pd.DataFrame | None = None,
                   finetune_csv: str | None = None) -> tuple[str, str]:
    """(heading, body) of the report's section from a study's ``budget_curve.csv``; the plot is drawn
    into ``out`` beside the report. ``summary`` (the report's per encoder and size table) supplies
    random init's fine-tuned AUC as the second reference. ``finetune_csv`` (the budget-finetune
    stage's table) adds the same curve under fine-tuning, against fine-tuned random init."""
    table = pd.read_csv(csv)
    finetuned = finetuned_reference(summary)
    plot_budget_curve(table, f"{out}/{PLOT}", finetuned=finetuned)
    body = budget_section(table, PLOT, finetuned)
    if finetune_csv:
        ft = pd.read_csv(finetune_csv)
        plot_budget_curve(ft, f"{out}/{FINETUNE_PLOT}", title="Gain versus pre-training budget, fine-tuned",
                          ylabel=FINETUNE_YLABEL)
        body += ("\nThe same checkpoints fine-tuned (the study's fine-tuning recipe, folds and seeds; the grey "
                 "band is random init fine-tuned the same way):\n\n"
                 f"![AUC versus pre-training time, fine-tuned]({FINETUNE_PLOT})\n\n"
                 + "".join(f"- fine-tuned: {s}\n" for s in summary_lines(ft)))
    return SECTION, body


PROTOCOLS_SECTION = "Linear probe beside fine-tuning"


def protocols_table(table: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per encoder and probed size: the linear probe of the full pre-training run (random init: its
    own row) beside the fine-tuning study's mean test AUC on the same folds. Columns: encoder, size,
    linear (mean), linear_low, linear_high, finetune (mean), finetune_std, n."""
    cols = ["encoder", "size", "linear", "linear_low", "linear_high", "finetune", "finetune_std", "n"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    last = table.groupby("method")["fraction"].transform("max")
    full = table[table["fraction"] == last]
    ft = {(r.encoder, str(r.size)): (r.auc_mean, r.auc_std) for r in summary.itertuples(index=False)}
    rows = []
    for r in full.itertuples(index=False):
        m, s = ft.get((r.method, str(r.size)), (float("nan"), float("nan")))
        rows.append({"encoder": r.method, "size": str(r.size), "linear": r.auc_mean, "linear_low": r.ci_low,
                     "linear_high": r.ci_high, "finetune": m, "finetune_std": s, "n": int(r.n)})
    out = pd.DataFrame(rows, columns=cols)
    # random init first, as in the budget table; then by encoder, the sizes from smallest to all
    order = sorted(range(len(out)), key=lambda i: (out["encoder"][i] != RANDOM, out["encoder"][i],
                                                   size_order(out["size"][i])))
    return out.iloc[order].reset_index(drop=True)


def size_order(label: str) -> tuple[float, str]:
    """A size label's place from smallest to largest: n5 < n40 < all (r90 < r0), plain numbers by value."""
    try:
        return SizeSpec.from_label(label).sort_key(), label
    except ValueError:
        try:
            return float(label), label
        except ValueError:
            return math.inf, label


def protocols_markdown(both: pd.DataFrame) -> str:
    """The section's body: the two protocols' AUC per encoder and size, and what separates them."""
    def num(v: float) -> str:
        return "n/a" if not np.isfinite(v) else f"{v:.3f}"

    lines = ["The same encoders under the two evaluation protocols SSL papers report: a logistic regression "
             "on the frozen encoder's embeddings (linear probe, bootstrap 95 % interval over folds x seeds) "
             "and the fine-tuning study above (mean ± std over folds and seeds), on the same patient-level "
             "folds and training-set sizes. The linear probe uses the end of each pre-training run.", "",
             "| encoder | size | linear probe AUC | fine-tuned AUC | fine-tuned − linear | cells |",
             "|---|---|---|---|---|---|"]
    for r in both.itertuples(index=False):
        ft = num(r.finetune) + ("" if not np.isfinite(r.finetune_std) else f" ± {r.finetune_std:.3f}")
        diff = r.finetune - r.linear
        lines.append(f"| {r.encoder} | {r.size} | {num(r.linear)} [{num(r.linear_low)}, {num(r.linear_high)}] "
                     f"| {ft} | {'n/a' if not np.isfinite(diff) else f'{diff:+.3f}'} | {r.n} |")
    return "\n".join(lines) + "\n"


def protocols_section(csv: str, summary: pd.DataFrame) -> tuple[str, str]:
    """(heading, body) of the side-by-side section from ``budget_curve.csv`` and the report's summary."""
    return PROTOCOLS_SECTION, protocols_markdown(protocols_table(pd.read_csv(csv), summary))

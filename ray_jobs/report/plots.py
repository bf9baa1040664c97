"""The paper's figure: test AUC against training-set size per method, with the spread over folds."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: reports are built in jobs and CI

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plot_auc_vs_size(trials: pd.DataFrame, path: str, title: str | None = None) -> str:
    """Mean AUC over folds (line, ± std band) and each fold's AUC (dots) vs samples per class.

    The x axis is the achieved number of training images per class (log scale), which puts reduction
    levels and samples-per-class grids on one comparable axis.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if trials.empty:
        ax.text(0.5, 0.5, "no finished trials", ha="center", va="center", transform=ax.transAxes)
    for i, (enc, g) in enumerate(trials.groupby("encoder", sort=True)):
        color = f"C{i % 10}"
        agg = g.groupby("size").agg(x=("train_per_class_min", "mean"), m=("test_auc", "mean"),
                                    s=("test_auc", "std")).sort_values("x")
        s = agg["s"].fillna(0.0).to_numpy()
        ax.plot(agg["x"], agg["m"], "-o", color=color, label=enc, ms=4)
        ax.fill_between(agg["x"], agg["m"] - s, agg["m"] + s, color=color, alpha=0.15, lw=0)
        jitter = 1.0 + 0.03 * (i - 1)
        ax.scatter(g["train_per_class_min"] * jitter, g["test_auc"], color=color, s=9, alpha=0.45, lw=0)
    if not trials.empty:
        xs = trials["train_per_class_min"].to_numpy(dtype=float)
        if np.isfinite(xs).any() and np.nanmin(xs) > 0:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(title="encoder", fontsize=8)
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test AUC (mean ± std over folds)")
    ax.set_title(title or "AUC vs training-set size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

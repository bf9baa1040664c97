"""The online probe's curves in the report: k-NN AUC and embedding health against the optimiser step of
each pre-training run, so a reader sees whether a method was still learning when its budget ran out,
and which run collapsed.

The curves are the step metrics the probe logged to the pre-training runs (``probe.knn_auc``,
``probe.emb_std``, ``probe.eff_rank``: :mod:`ray_jobs.pretrain.monitor`); runs without them (no
``--monitor-data``, ``pretrain.monitor.enabled: false``) leave the section out.
"""

from __future__ import annotations

import math

import pandas as pd

from ray_jobs.pretrain.monitor import METRICS, TAG_COLLAPSED

PROBE_PLOT = "probe_curves.png"
CURVE_COLUMNS = ["encoder", "metric", "step", "value"]
PROBE_NOTE = ("While each method pre-trained, its encoder embedded the training and validation slices of "
              "fold 0 of the labelled set (never a test patient) every few steps: the k-NN AUC of the "
              "validation slices against the training slices (cosine similarity), and the health of the "
              "normalised embeddings (mean per-dimension std; effective rank, the exponential of the "
              "entropy of the singular values). A curve still rising at its last step says the budget "
              "ended before the method stopped learning; a std or rank falling towards zero is a collapse.")


def collect_probe_curves(cl, runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """(long table of encoder, metric, step, value; encoder -> collapse reason) for the pre-training runs
    in ``runs`` (columns ``encoder`` and ``run_id``, the report's pre-training table). One metric-history
    call per run and metric: a study has one pre-training run per method and level."""
    rows, collapsed = [], {}
    for r in runs.to_dict(orient="records"):
        if not r.get("run_id"):
            continue  # the baseline's row: no pre-training run
        for metric in METRICS:
            for m in cl.get_metric_history(r["run_id"], metric):
                if math.isfinite(m.value):
                    rows.append({"encoder": r["encoder"], "metric": metric, "step": int(m.step), "value": m.value})
        tags = cl.get_run(r["run_id"]).data.tags
        if tags.get(TAG_COLLAPSED) == "true":
            collapsed[r["encoder"]] = tags.get("probe.collapse_reason", "collapsed")
    return pd.DataFrame(rows, columns=CURVE_COLUMNS), collapsed


def probe_markdown(curves: pd.DataFrame, collapsed: dict[str, str]) -> str:
    """The note, one line per encoder (first and last k-NN AUC, the best and its step), the plot."""
    lines = [PROBE_NOTE, ""]
    auc = curves[curves["metric"] == "probe.knn_auc"]
    for enc, g in auc.groupby("encoder", sort=True):
        g = g.sort_values("step")
        best = g.loc[g["value"].idxmax()]
        rising = "still rising at the end" if best["step"] == g["step"].iloc[-1] and len(g) > 1 else (
            f"best at step {int(best['step'])}")
        flag = f"; **collapsed** ({collapsed[enc]})" if enc in collapsed else ""
        lines.append(f"- `{enc}`: k-NN AUC {g['value'].iloc[0]:.3f} at step {int(g['step'].iloc[0])} -> "
                     f"{g['value'].iloc[-1]:.3f} at step {int(g['step'].iloc[-1])} ({rising}){flag}")
    lines += ["", f"![online probe curves]({PROBE_PLOT})"]
    return "\n".join(lines)


def plot_probe_curves(curves: pd.DataFrame, path: str, title: str | None = None) -> str:
    """Three panels against the optimiser step: k-NN AUC, embedding std, effective rank; one line per
    encoder."""
    from ray_jobs.report.plots import plt

    panels = [("probe.knn_auc", "k-NN AUC (fold 0 validation)"), ("probe.emb_std", "embedding std"),
              ("probe.eff_rank", "effective rank")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=110)
    encoders = sorted(curves["encoder"].unique())
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for i, enc in enumerate(encoders):
            g = curves[(curves["encoder"] == enc) & (curves["metric"] == metric)].sort_values("step")
            if not g.empty:
                ax.plot(g["step"], g["value"], "-o", ms=3, color=f"C{i % 10}", label=enc)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "online probe during pre-training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["PROBE_PLOT", "collect_probe_curves", "plot_probe_curves", "probe_markdown"]

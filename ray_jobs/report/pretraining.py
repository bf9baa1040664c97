"""The pre-training side of a study: what each encoder cost to pre-train and what it bought.

A study (``ctssl study run``) keeps its pre-training runs in the experiment of its fine-tuning study;
each carries ``ctssl.kind = pretrain`` and an ``encoder`` tag naming the encoder the fine-tuning knows
it by. This module finds the runs of the study's encoders and puts their cost (pool slices, optimiser
steps, training-loop seconds) beside the encoder's mean test AUC per training-set size, as a table and
as a plot of AUC against pre-training time, so a method pre-trained on all data and on a reduced pool
shows both side by side.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from ray_jobs import tracking
from ray_jobs.report.tables import by_encoder_and_size

ALL_DATA = "all"  # the reduction label of a run pre-trained on the whole pool
PRETRAIN_COLUMNS = ["encoder", "method", "reduction", "rows", "steps", "train_time_s", "run_id"]
PRETRAIN_PLOT = "auc_vs_pretrain_time.png"


def _num(text: Any) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _sources(parent_params: dict[str, str]) -> dict[str, str]:
    """Encoder name -> the source the study loaded it from (its ``encoders`` param, NAME=SOURCE values)."""
    try:
        values = json.loads(parent_params.get("encoders", "[]"))
    except json.JSONDecodeError:
        return {}
    out = {}
    for v in values if isinstance(values, list) else []:
        name, _, src = str(v).partition("=")
        if src and name and "/" not in name and ":" not in name:
            out[name] = src
    return out


def _used_by_study(run, source: str | None) -> bool:
    """Whether the study loaded this run's encoder: its checkpoint folder or its run id is the source."""
    if not source:
        return False
    if source.startswith("runs:/"):
        return source[len("runs:/"):].strip("/").split("/")[0] == run.info.run_id
    ckpt = run.data.tags.get("checkpoint", "")
    bare = source.split("://", 1)[-1].rstrip("/")
    return bool(ckpt) and (bare == ckpt.rstrip("/") or bare.endswith("/" + ckpt.strip("/")))


def collect_pretraining(cl, experiment_id: str, encoders: list[str], parent_tags: dict[str, str] | None = None,
                        parent_params: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per encoder of the study with a finished pre-training run in ``experiment_id``.

    Runs of another study (a ``ctssl.study`` tag other than the parent's) are left out. When an encoder
    has several finished runs (a changed setting starts a new one), the one whose checkpoint the study
    loaded wins, else the latest.
    """
    wanted = set(encoders)
    study = (parent_tags or {}).get(tracking.TAG_STUDY)
    sources = _sources(parent_params or {})
    runs, token = [], None
    while True:
        page = cl.search_runs([experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'pretrain' and "
                                                             "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    chosen: dict[str, Any] = {}
    for r in runs:  # newest first
        t = r.data.tags
        enc = t.get("encoder")
        if enc not in wanted or (study and t.get(tracking.TAG_STUDY, study) != study):
            continue
        if enc not in chosen or (_used_by_study(r, sources.get(enc)) and not _used_by_study(chosen[enc],
                                                                                           sources.get(enc))):
            chosen[enc] = r
    rows = [{"encoder": enc, "method": r.data.tags.get("method", "?"),
             "reduction": r.data.tags.get("reduction") or ALL_DATA, "rows": _num(r.data.params.get("rows")),
             "steps": _num(r.data.tags.get("final_step")), "train_time_s": _num(r.data.tags.get("train_time_s")),
             "run_id": r.info.run_id} for enc, r in chosen.items()]
    df = pd.DataFrame(rows, columns=PRETRAIN_COLUMNS)
    # a method's runs together, the whole pool first, then the reductions
    key = df["reduction"].map(lambda x: (0, "") if x == ALL_DATA else (1, str(x)))
    return (df.assign(_k=key).sort_values(["method", "_k", "encoder"]).drop(columns="_k")
            .reset_index(drop=True))


def _size_order(summary: pd.DataFrame) -> list[str]:
    ordered = by_encoder_and_size(summary[["encoder", "size"]].assign(encoder=""))
    return list(dict.fromkeys(ordered["size"]))


def pretraining_table(pre: pd.DataFrame, summary: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """``pre`` (see :func:`collect_pretraining`) with the mean test AUC per size (``AUC <size>``
    columns, smallest size first); the baseline encoder, when the study has it, is a last row without
    pre-training (its reference AUCs)."""
    sizes = _size_order(summary)
    auc = {(r.encoder, r.size): r.auc_mean for r in summary.itertuples(index=False)}
    rows = []
    for r in pre.to_dict(orient="records"):
        rows.append({**r, **{f"AUC {s}": auc.get((r["encoder"], s), math.nan) for s in sizes}})
    if baseline and baseline not in set(pre["encoder"]) and (summary["encoder"] == baseline).any():
        rows.append({"encoder": baseline, "method": "none (baseline)", "reduction": "-", "rows": math.nan,
                     "steps": math.nan, "train_time_s": math.nan, "run_id": "",
                     **{f"AUC {s}": auc.get((baseline, s), math.nan) for s in sizes}})
    return pd.DataFrame(rows, columns=[*PRETRAIN_COLUMNS, *(f"AUC {s}" for s in sizes)])


def _fmt(v: float, spec: str) -> str:
    return "-" if not math.isfinite(v) else format(v, spec)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the report shows it (column names for readers, no run ids)."""
    return table.drop(columns=["run_id"]).rename(columns={
        "rows": "pool slices", "steps": "optimiser steps", "train_time_s": "pre-training time (s)"})


def pretraining_markdown(table: pd.DataFrame) -> str:
    aucs = [c for c in table.columns if c.startswith("AUC ")]
    head = ["encoder", "method", "reduction", "pool slices", "optimiser steps", "pre-training time", *aucs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.to_dict(orient="records"):
        t = r["train_time_s"]
        cells = [r["encoder"], r["method"], r["reduction"], _fmt(r["rows"], ".0f"), _fmt(r["steps"], ".0f"),
                 "-" if not math.isfinite(t) else f"{t:.0f} s", *(_fmt(r[c], ".3f") for c in aucs)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


PRETRAIN_NOTE = ("The experiment's pre-training runs of the study's encoders: the pool each was pre-trained on "
                 "(its reduction level and slices), its optimiser steps and training-loop time, and the mean "
                 "test AUC over folds it reached at each training-set size.")


def plot_auc_vs_pretrain_time(table: pd.DataFrame, path: str, title: str | None = None) -> str:
    """Mean test AUC against pre-training time: one marker per encoder and training-set size (colour =
    size, marker shape = reduction level, label = encoder); the baseline's AUCs as dashed lines."""
    from ray_jobs.report.plots import plt

    aucs = [c for c in table.columns if c.startswith("AUC ")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    pre = table[table["train_time_s"].map(lambda v: math.isfinite(v))]
    base = table[~table.index.isin(pre.index)]
    shapes = ["o", "^", "s", "D", "v", "P", "X", "*"]
    levels = list(dict.fromkeys(pre["reduction"]))
    marker = {lev: shapes[i % len(shapes)] for i, lev in enumerate(levels)}
    for i, col in enumerate(aucs):
        color = f"C{i % 10}"
        for r in pre.to_dict(orient="records"):
            if math.isfinite(r[col]):
                ax.scatter(r["train_time_s"], r[col], color=color, marker=marker[r["reduction"]], s=40, zorder=3)
                ax.annotate(r["encoder"], (r["train_time_s"], r[col]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=color)
        ax.plot([], [], color=color, marker="o", ls="", label=col.removeprefix("AUC "))
        for r in base.to_dict(orient="records"):
            if math.isfinite(r[col]):
                ax.axhline(r[col], color=color, ls="--", lw=0.8, alpha=0.7)
    for lev in levels:
        ax.plot([], [], color="0.4", marker=marker[lev], ls="", label=f"pool: {lev}")
    if not base.empty:
        ax.plot([], [], color="0.4", ls="--", lw=0.8, label=f"{base['encoder'].iloc[0]} (no pre-training)")
    if pre.empty:
        ax.text(0.5, 0.5, "no pre-training runs", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(title="training-set size", fontsize=7, title_fontsize=8)
    ax.margins(x=0.15)  # room for the labels beside the markers
    ax.set_xlabel("pre-training time (s, training loop)")
    ax.set_ylabel("mean test AUC over folds")
    ax.set_title(title or "AUC vs pre-training time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

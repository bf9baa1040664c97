"""The study's ``linear`` work (``finetune.linearProbe``): the linear probe of every pre-trained encoder
and of random init at every training-set size of the fine-tuning study, on its folds and seeds.

It is the protocol most SSL papers report beside fine-tuning: each frozen encoder embeds the labelled set
once and a logistic regression is fitted per (size, fold, seed) cell on exactly the training rows the
fine-tuning trial of that cell uses (:mod:`ray_jobs.finetune.linear_probe`), so the report can set the
two side by side. It costs seconds per encoder where fine-tuning costs minutes. The table has the
budget curve's columns (:data:`ray_jobs.report.budget_plot.COLUMNS`), one fraction per encoder (1: the
end of its pre-training run; 0: random init), so the report reads both with the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_jobs import tracking
from ray_jobs.finetune.config import parse_sizes
from ray_jobs.study.budget_curve import budget_table, embedder, probe_inputs
from ray_jobs.study.stages import data_url

CSV = "linear_probe.csv"


def run_stage(ctx: Any, num_gpus: float | None = None) -> dict[str, Any]:
    """Probe random init and every pre-training run's final encoder; write ``linear_probe.csv`` into the
    study's report folder and onto the fine-tuning study's parent MLflow run when there is one. The
    embedding runs where :func:`~ray_jobs.study.budget_curve.embedder` puts it (``num_gpus``: its
    override)."""
    from ray_jobs.finetune.encoders import resolve_encoder
    from ray_jobs.finetune.linear_probe import probe_cells

    spec = ctx.study.spec
    ft = spec["finetune"]
    sizes = parse_sizes(samples_per_class=",".join(map(str, ft["samplesPerClass"])))
    data, folds, rand = probe_inputs(ctx)
    runs = {r["encoder"]: r for k, r in ctx.results.items() if k.startswith("pretrain-")}

    def load(_random: Any, name: str) -> tuple[Any, int, float]:
        r = runs[name]
        enc = resolve_encoder(f"{name}={r['checkpoint']}", default_backbone=rand.backbone, in_chans=None,
                              tracking_uri=ctx.tracking_uri)
        return enc, int(r.get("steps") or 0), float(r.get("train_time_s") or 0.0)

    # the folder argument of budget_table's loader is the encoder's name here: each has one checkpoint
    table = budget_table({name: {1.0: name} for name in runs}, rand, data, folds, sizes, list(ft["seeds"]),
                         seed=spec["seed"], load=load,
                         embed=embedder(ctx, data_url(ctx, "labelled"), num_gpus), probe=probe_cells)
    out = ctx.study.workdir.resolve() / "report"
    out.mkdir(parents=True, exist_ok=True)
    csv = str(out / CSV)
    table.to_csv(csv, index=False)
    parent = ctx.results.get("finetune", {}).get("parent_run_id")
    if parent:
        tracking.log_artifacts(tracking.client(ctx.tracking_uri), parent, [csv])
    print(f"    linear probe: {len(runs) + 1} encoders x {len(sizes)} sizes x {ft['folds']} folds x "
          f"{len(ft['seeds'])} seed(s) -> {csv}", flush=True)
    return {"csv": csv, "rows": len(table)}


def done(_ctx: Any, result: dict[str, Any]) -> bool:
    return Path(result["csv"]).exists()

"""The study's ``linear`` work (``finetune.evaluation`` ``both`` or ``linear``): the linear probe of every
pre-trained encoder and of random init at every training-set size of the study, on its folds and seeds.

It is the protocol most SSL papers report beside fine-tuning: each frozen encoder embeds the labelled set
once and a logistic regression is fitted per (size, fold, seed) cell on exactly the training rows the
fine-tuning trial of that cell uses (:mod:`ray_jobs.finetune.linear_probe`), so the report can set the
two side by side. It costs seconds per encoder where fine-tuning costs minutes. The table has the
budget curve's columns (:data:`ray_jobs.report.budget_plot.COLUMNS`), one fraction per encoder (1: the
end of its pre-training run; 0: random init), so the report reads both with the same code; the cells
themselves go to ``linear_probe_cells.csv``, which a linear-only study's report is built from.

With ``evaluation: linear`` there is no fine-tuning study, so this stage opens the study's parent MLflow
run itself (the one an interrupted run left is reused, so a rerun adds no second one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ray_jobs import tracking
from ray_jobs.finetune.config import parse_sizes
from ray_jobs.study.budget_curve import budget_table, embedder, probe_inputs
from ray_jobs.study.stages import data_url

CSV = "linear_probe.csv"
CELLS_CSV = "linear_probe_cells.csv"
#: the parent run's ``ctssl.stage`` tag in a study without fine-tuning
PARENT_STAGE = "linear"


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
    cells: list[dict] = []
    table = budget_table({name: {1.0: name} for name in runs}, rand, data, folds, sizes, list(ft["seeds"]),
                         seed=spec["seed"], load=load, cells=cells,
                         embed=embedder(ctx, data_url(ctx, "labelled"), num_gpus), probe=probe_cells)
    out = ctx.study.workdir.resolve() / "report"
    out.mkdir(parents=True, exist_ok=True)
    csv, cells_csv = str(out / CSV), str(out / CELLS_CSV)
    table.to_csv(csv, index=False)
    pd.DataFrame(cells).rename(columns={"method": "encoder"}).drop(columns=["fraction"]).to_csv(cells_csv, index=False)
    parent = ctx.results.get("finetune", {}).get("parent_run_id") or _open_parent(ctx, data, runs)
    cl = tracking.client(ctx.tracking_uri)
    tracking.log_artifacts(cl, parent, [csv, cells_csv])
    if "finetune" not in ctx.results:
        cl.set_terminated(parent, status="FINISHED")
    print(f"    linear probe: {len(runs) + 1} encoders x {len(sizes)} sizes x {ft['folds']} folds x "
          f"{len(ft['seeds'])} seed(s) -> {csv}", flush=True)
    return {"csv": csv, "cells_csv": cells_csv, "rows": len(table), "parent_run_id": parent}


def _open_parent(ctx: Any, data: Any, runs: dict[str, dict]) -> str:
    """The parent MLflow run of a study without fine-tuning: tagged and named as the fine-tuning study's
    (so the report, the registry alias and the UI find it the same way), with the encoders it probed."""
    name = ctx.study.name
    cl = tracking.client(ctx.tracking_uri)
    exp_id = tracking.get_or_create_experiment(cl, name, tracking.default_artifact_location(
        ctx.tracking_uri, ctx.url("study")))
    tags = {tracking.TAG_KIND: "study", tracking.TAG_STAGE: PARENT_STAGE, tracking.TAG_STUDY: name}
    encoders = json.dumps(["random", *(f"{e}={r['checkpoint']}" for e, r in runs.items())])
    old = tracking.find_run(cl, exp_id, tags)
    if old is not None and old.info.status != "FINISHED":
        if old.data.params.get("encoders") == encoders:  # an interrupted run of this stage: go on in it
            return old.info.run_id
        cl.set_terminated(old.info.run_id, status="FAILED")  # its encoders were trained again since
    run = cl.create_run(exp_id, run_name=f"study-{name}", tags={
        **tags, "dataset": data.dataset, "encoders": ",".join(["random", *runs])})
    tracking.log_params(cl, run.info.run_id, {"encoders": encoders, "classes": json.dumps(data.classes),
                                              "n_slices": len(data.labels), "n_patients": len(set(data.patients))})
    return run.info.run_id


def done(_ctx: Any, result: dict[str, Any]) -> bool:
    return Path(result["csv"]).exists()

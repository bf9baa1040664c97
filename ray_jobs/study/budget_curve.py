"""The study's ``budget`` work: the linear probe on every budget-curve checkpoint of every method, and
on random init, at the smallest labelled size(s), with the study's folds and seeds.

Each method's pre-training run keeps a checkpoint with its encoder at the fractions of its budget
``pretrain.budgetCurve`` names (:meth:`ray_jobs.pretrain.checkpoint_store.CheckpointStore.milestones`).
Each is embedded once and probed over folds x seeds; a fraction's row is the mean AUC over those
cells with a bootstrap 95 % interval (:func:`ray_jobs.report.budget_plot.bootstrap_band`), the same
way as the random-init band it is compared with. The linear probe itself is the fine-tuning package's
(``ray_jobs.finetune.linear_probe``); it is passed in so the table can be built and tested apart from it.

With ``pretrain.budgetFinetune`` the ``budget-finetune`` stage also fine-tunes every milestone and
random init at the same sizes (the study's fine-tuning settings, folds and seeds): the same table
from fine-tuning's test AUCs, for a team whose decision rests on fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ctssl_base import storage
from ray_jobs import tracking
from ray_jobs.finetune.config import parse_sizes
from ray_jobs.finetune.data import load_labelled
from ray_jobs.finetune.folds import make_folds
from ray_jobs.report.budget_plot import (
    COLUMNS,
    CSV,
    FINETUNE_CSV,
    FINETUNE_PLOT,
    FINETUNE_YLABEL,
    LINEAR_YLABEL,
    PLOT,
    RANDOM,
    bootstrap_band,
    plot_budget_curve,
)
from ray_jobs.study.stages import data_url, study_run_id

Embed = Callable[[Any, Any], np.ndarray]  # (EncoderSpec, LabelledData) -> (N, D)
Probe = Callable[..., list[dict]]  # (emb, data, folds, sizes, seeds) -> rows with size, fold, seed, auc


def _probe_fns() -> tuple[Embed, Probe]:
    from ray_jobs.finetune.linear_probe import embed_labelled, probe_cells

    return embed_labelled, probe_cells


def embedder(ctx: Any, url: str, num_gpus: float | None = None) -> Embed:
    """How a study stage embeds the labelled set at ``url``: in the driver's process on a CPU study, and
    on a Ray worker with a GPU when the study's workers have GPUs (a cluster's head, where the driver
    runs, has none; at the papers' scale embedding 25k slices per encoder on its CPUs takes hours).
    ``num_gpus`` overrides the GPU count of the remote task (tests run the remote path with 0)."""
    embed, _ = _probe_fns()
    gpus = (1.0 if ctx.gpus_per_worker > 0 else 0.0) if num_gpus is None else num_gpus
    if num_gpus is None and gpus == 0:
        return embed
    import ray

    from ctssl_base import ray_connect

    ray_connect.connect(ctx.address)
    task = ray.remote(num_gpus=gpus)(_embed_task)
    return lambda spec, _data: ray.get(task.remote(spec, url))


def _embed_task(spec: Any, url: str) -> np.ndarray:
    """On a Ray worker: load the labelled set there (it is not shipped from the driver) and embed it."""
    embed, _ = _probe_fns()
    return embed(spec, load_labelled(url))


def _rows(method: str, fraction: float, step: int, seconds: float, cells: list[dict],
          sizes: Sequence[Any], seed: int) -> list[dict]:
    """One row per labelled size: mean and bootstrap interval of the cells' AUCs."""
    out = []
    for size in sizes:
        key = getattr(size, "label", size)
        aucs = [c["auc"] for c in cells if getattr(c["size"], "label", c["size"]) == key]
        m, lo, hi = bootstrap_band(aucs, seed=seed)
        out.append({"method": method, "fraction": fraction, "step": step, "train_time_s": seconds,
                    "size": key, "auc_mean": m, "ci_low": lo, "ci_high": hi, "n": len(aucs)})
    return out


def milestone_encoder(random_spec: Any, folder: str) -> tuple[Any, int, float]:
    """The encoder of a milestone folder (local or object storage) in the form of ``random_spec`` (an
    EncoderSpec), its step and training seconds."""
    from ray_jobs.finetune.encoders import _load_from_folder
    from ray_jobs.pretrain import checkpoint as ckpt_io

    state, config = _load_from_folder(folder)
    fs, root = storage.open_fs(folder)
    progress = ckpt_io.Progress(**json.loads(fs.cat_file(storage.join(root, ckpt_io.PROGRESS_FILE))))
    spec = dataclasses.replace(random_spec, source=folder, method=config.get("method", ""), state=state,
                               config=config, backbone=config.get("backbone", random_spec.backbone))
    return spec, progress.step, progress.train_time_s


def budget_table(milestones: dict[str, dict[float, str]], random_spec: Any, data: Any, folds: list,
                 sizes: Sequence[Any], seeds: list[int], *, seed: int = 0,
                 embed: Embed | None = None, probe: Probe | None = None,
                 load: Callable[[Any, str], tuple[Any, int, float]] = milestone_encoder,
                 cells: list[dict] | None = None) -> pd.DataFrame:
    """``budget_curve.csv``'s rows: random init first (fraction 0, no time), then each method's
    milestones in fraction order. ``milestones``: method -> {fraction: checkpoint folder}. ``cells``,
    when given, receives every probed cell (its ``size, fold, seed, auc, ...`` with ``method`` and
    ``fraction``): what a paired comparison between encoders needs."""
    if embed is None or probe is None:
        embed, probe = _probe_fns()
    got = probe(embed(random_spec, data), data, folds, sizes, seeds)
    rows = _rows(RANDOM, 0.0, 0, 0.0, got, sizes, seed)
    if cells is not None:
        cells += [{"method": RANDOM, "fraction": 0.0, **c} for c in got]
    for method in sorted(milestones):
        for fraction, folder in sorted(milestones[method].items()):
            spec, step, seconds = load(random_spec, folder)
            got = probe(embed(spec, data), data, folds, sizes, seeds)
            rows += _rows(method, float(fraction), step, seconds, got, sizes, seed)
            if cells is not None:
                cells += [{"method": method, "fraction": float(fraction), **c} for c in got]
    return pd.DataFrame(rows, columns=COLUMNS)


def probe_inputs(ctx: Any) -> tuple[Any, list, Any]:
    """What a probing stage (budget, linear) reads: the labelled set, the fine-tuning study's folds and
    the random-init encoder, whose network is the pre-trained encoders' unless the study names one (as
    in fine-tuning)."""
    from ray_jobs.finetune.encoders import resolve_encoder

    spec = ctx.study.spec
    ft = spec["finetune"]
    data = load_labelled(data_url(ctx, "labelled"))
    folds = make_folds(data.patients, data.label_names, ft["folds"], ft["valFraction"], seed=spec["seed"])
    backbone = ft["backbone"] or sorted(ctx.study.method_settings(m)["backbone"] for m in ctx.study.methods())[0]
    rand = resolve_encoder("random", default_backbone=backbone, in_chans=None, tracking_uri=ctx.tracking_uri)
    return data, folds, rand


def _sizes(ctx: Any) -> tuple[list[int], list[Any]]:
    """The labelled sizes the budget curve is probed at (``pretrain.budgetSizes``, default the smallest
    integer of ``finetune.samplesPerClass``): as written and parsed."""
    ft = ctx.study.spec["finetune"]
    wanted = ctx.study.budget_sizes()
    unknown = [n for n in wanted if n not in ft["samplesPerClass"]]
    if unknown:
        raise ValueError(f"pretrain.budgetSizes {unknown}: not in finetune.samplesPerClass {ft['samplesPerClass']}")
    return wanted, parse_sizes(samples_per_class=",".join(map(str, wanted)))


def _milestones(ctx: Any) -> dict[str, dict[float, str]]:
    """method (encoder name) -> {fraction: milestone folder}, from the pre-training stages' results."""
    return {r["encoder"]: {float(f): p for f, p in r.get("milestones", {}).items()}
            for k, r in ctx.results.items() if k.startswith("pretrain-")}


def _write(ctx: Any, table: pd.DataFrame, csv_name: str, png_name: str, ylabel: str) -> tuple[str, str]:
    """The table and its plot into the study's report folder and onto the study's parent MLflow run."""
    out = ctx.study.workdir.resolve() / "report"
    out.mkdir(parents=True, exist_ok=True)
    csv, png = str(out / csv_name), str(out / png_name)
    table.to_csv(csv, index=False)
    plot_budget_curve(table, png, ylabel=ylabel)
    tracking.log_artifacts(tracking.client(ctx.tracking_uri), study_run_id(ctx), [csv, png])
    return csv, png


def run_stage(ctx: Any) -> dict[str, Any]:
    """The study's ``budget`` stage: probe every method's milestones, write ``budget_curve.csv`` (and its
    plot) into the study's report folder and onto the study's parent MLflow run."""
    spec = ctx.study.spec
    _, sizes = _sizes(ctx)
    data, folds, rand = probe_inputs(ctx)
    table = budget_table(_milestones(ctx), rand, data, folds, sizes, list(spec["finetune"]["seeds"]),
                         seed=spec["seed"], embed=embedder(ctx, data_url(ctx, "labelled")), probe=_probe_fns()[1])
    csv, png = _write(ctx, table, CSV, PLOT, LINEAR_YLABEL)
    return {"csv": csv, "plot": png, "rows": len(table)}


def finetune_encoders(milestones: dict[str, dict[float, str]]) -> dict[str, tuple[str, float, str]]:
    """``<method>@<fraction>`` -> (method, fraction, folder) for every milestone: the encoders the
    ``budget-finetune`` stage fine-tunes beside random init."""
    return {f"{m}@{f:g}": (m, f, folder) for m in sorted(milestones) for f, folder in sorted(milestones[m].items())}


def finetune_table(trials: pd.DataFrame, encoders: dict[str, tuple[str, float, str]], progress: dict[str, tuple],
                   sizes: Sequence[Any], seed: int = 0) -> pd.DataFrame:
    """The budget curve's rows from fine-tuning trials (one test AUC per encoder, size, fold, seed):
    random init first, then each method's milestones; ``progress``: encoder -> (step, seconds)."""
    def cells(name: str) -> list[dict]:
        at = trials[trials["encoder"] == name]
        return [{"size": str(r.size), "auc": float(r.test_auc)} for r in at.itertuples(index=False)]

    labels = [getattr(s, "label", s) for s in sizes]
    rows = _rows(RANDOM, 0.0, 0, 0.0, cells(RANDOM), labels, seed)
    for name, (method, fraction, _folder) in encoders.items():
        step, seconds = progress[name]
        rows += _rows(method, float(fraction), step, seconds, cells(name), labels, seed)
    return pd.DataFrame(rows, columns=COLUMNS)


def run_finetune_stage(ctx: Any) -> dict[str, Any]:
    """The study's ``budget-finetune`` stage (``pretrain.budgetFinetune``): fine-tune every milestone and
    random init at the budget sizes with the study's own fine-tuning settings, folds and seeds, as a
    Ray Tune study of its own in the MLflow experiment ``<study>-budget`` (the study's report reads its
    own experiment's fine-tuning run); write ``budget_finetune.csv`` and its plot."""
    from ray_jobs.finetune.config import FinetuneConfig
    from ray_jobs.finetune.study import run_study
    from ray_jobs.report.collect import collect_trials

    study = ctx.study
    spec = study.spec
    wanted, sizes = _sizes(ctx)
    encoders = finetune_encoders(_milestones(ctx))
    progress = {}
    data, _folds, rand = probe_inputs(ctx)
    for name, (_m, _f, folder) in encoders.items():
        _spec, step, seconds = milestone_encoder(rand, folder)
        progress[name] = (step, seconds)
    fc = FinetuneConfig.from_study(
        {**spec["finetune"], "samplesPerClass": wanted}, data=data_url(ctx, "labelled"), storage=ctx.url("study"),
        experiment=f"{study.name}-budget", encoders=["random", *(f"{n}={e[2]}" for n, e in encoders.items())],
        backbone=rand.backbone, gpus_per_trial=1.0 if ctx.gpus_per_worker > 0 else 0.0,
        max_concurrent=spec["resources"]["maxConcurrentTrials"], address=ctx.address,
        tracking_uri=ctx.tracking_uri, fold_seed=spec["seed"])
    r = run_study(fc)
    trials = collect_trials(ctx.tracking_uri, fc.experiment, r.parent_run_id)
    table = finetune_table(trials, encoders, progress, sizes, seed=spec["seed"])
    csv, png = _write(ctx, table, FINETUNE_CSV, FINETUNE_PLOT, FINETUNE_YLABEL)
    print(f"    budget curve fine-tuned: {r.trials} trials ({r.failed} failed) in MLflow experiment {fc.experiment}",
          flush=True)
    return {"csv": csv, "plot": png, "rows": len(table), "parent_run_id": r.parent_run_id, "trials": r.trials}

"""The driver of a fine-tuning study: check inputs, plan trials, run them on Ray Tune, summarise.

Order matters for the user: everything that can be wrong with the inputs (data without labels or
manifest, an encoder that cannot be loaded or does not fit, too few patients for the folds, a trial
larger than any node) fails here before the first trial starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctssl_base import ray_connect
from ctssl_base.errors import UserError
from ray_jobs import ray_cluster, tracking
from ray_jobs.finetune.config import FinetuneConfig
from ray_jobs.finetune.data import load_labelled
from ray_jobs.finetune.encoders import resolve_encoders
from ray_jobs.finetune.folds import make_folds
from ray_jobs.finetune.search import SearchState, bisect_sizes, ladder, threshold_for
from ray_jobs.finetune.trial import SELECT_METRIC, StudyContext, run_trial
from ray_jobs.ray_cluster import arrow_filesystem
from ray_jobs.trial_record import SizeSpec
from ssl_core.ct_window import dataset_windows

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    parent_run_id: str
    tracking_uri: str
    experiment: str
    trials: int
    failed: int
    summary: Any  # pandas DataFrame: encoder x size -> mean/std of metrics
    minimal: dict[str, Any] = field(default_factory=dict)  # encoder -> samples per class | "all" | None
    stopped: int = 0  # ended by the scheduler (--asha) before their test metrics: in no table

    def summary_markdown(self) -> str:
        from ray_jobs.report.tables import summary_markdown

        lines = [f"study {self.experiment}: {self.trials} trials ({self.failed} failed, {self.stopped} stopped "
                 f"early), MLflow parent run {self.parent_run_id} at {tracking.redact_uri(self.tracking_uri)}",
                 "", summary_markdown(self.summary)]
        if self.minimal:
            lines += ["", "minimal samples per class: " + ", ".join(f"{k}: {v}" for k, v in self.minimal.items())]
        return "\n".join(lines)


def plan_grid(encoders: list[str], sizes: list[SizeSpec], folds: int, seeds: list[int],
              phase: str = "grid") -> list[dict[str, Any]]:
    """One trial per (encoder, size, fold, seed)."""
    return [{"encoder": e, "size": s.label, "fold": f, "seed": sd, "phase": phase}
            for e in encoders for s in sizes for f in range(folds) for sd in seeds]


def _max_concurrent(cfg: FinetuneConfig) -> int:
    import ray

    if cfg.max_concurrent:
        return cfg.max_concurrent
    res = ray.cluster_resources()
    n = int(res.get("CPU", 1) // max(cfg.cpus_per_trial, 1e-9))
    if cfg.gpus_per_trial > 0:
        n = min(n, int(res.get("GPU", 0) // cfg.gpus_per_trial))
    return max(1, n)


def asha_scheduler(cfg: FinetuneConfig):  # noqa: ANN201 - ASHAScheduler | None
    """ASHA on validation AUC when ``--asha`` is on. A trial reports once per epoch plus its final
    result, hence ``max_t = epochs + 1`` (``--asha`` needs ``--stopping fixed``); the first rung is
    one epoch after the backbone unfreezes, so no trial is judged on its frozen-backbone epochs only."""
    if not cfg.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=cfg.epochs + 1,
                         grace_period=min(cfg.epochs, cfg.frozen_epochs + 1), reduction_factor=2)


def run_trials(grid: list[dict[str, Any]], ctx: StudyContext, cfg: FinetuneConfig, name: str) -> list[dict[str, Any]]:
    """Run ``grid`` as one Tune experiment; returns each trial's spec with its last result."""
    from ray import tune

    from ray_jobs.finetune.progress import StudyProgress

    ray_connect.keep_secrets_out_of_tune()
    fs, path = arrow_filesystem(cfg.storage)
    if fs is None:
        os.makedirs(path, exist_ok=True)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    scheduler = asha_scheduler(cfg)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(metric=SELECT_METRIC, mode="max", scheduler=scheduler,
                                    max_concurrent_trials=_max_concurrent(cfg),
                                    reuse_actors=True,  # trials are short: skip a process start per trial
                                    trial_name_creator=lambda t: _trial_name(t.config["trial"]),
                                    trial_dirname_creator=lambda t: _trial_name(t.config["trial"])),
        # Our one-line progress (trials done, rate, ETA) replaces Tune's per-trial status table.
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                  callbacks=[StudyProgress(f"finetune {name}", len(grid),
                                                           cfg.epochs * len(cfg.recipe_grid()))],
                                  verbose=0),
    )
    log.info("running %d fine-tuning trials (%s), at most %d at once; recipe %s", len(grid), name,
             _max_concurrent(cfg), cfg.protocol_text())
    grid_results = tuner.fit()
    out = []
    for r in grid_results:
        spec = dict(r.config["trial"])
        spec["error"] = repr(r.error) if r.error else None
        if r.error:  # Tune's own table is off (verbose=0), so failures are named here
            log.warning("trial %s failed: %s", _trial_name(spec), spec["error"][:500])
        spec["metrics"] = dict(r.metrics or {})
        out.append(spec)
    return out


def _trial_name(spec: dict[str, Any]) -> str:
    return f"{spec['encoder']}-{spec['size']}-fold{spec['fold']}-seed{spec['seed']}"


def mean_auc(results: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(encoder, size label) -> mean test AUC over the folds and seeds that finished."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in results:
        v = r["metrics"].get("test_auc") if not r.get("error") else None
        if v is not None and math.isfinite(v):
            acc.setdefault((r["encoder"], r["size"]), []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


def _encoder_payload(specs, intensity: str, stats: dict[str, float] | None) -> dict[str, dict[str, Any]]:
    """What a trial needs of each encoder. Input windows: the ones the encoder was pre-trained with
    (its encoder_config), else the labelled set's (8-bit data standardised by its own statistics)."""

    return {s.name: {"backbone": s.backbone, "in_chans": s.in_chans, "method": s.method, "state": s.state,
                     "windows": s.config.get("windows") or dataset_windows(intensity, stats, s.in_chans)}
            for s in specs}


def run_study(cfg: FinetuneConfig) -> StudyResult:
    cfg.validate()
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking_uri, cfg.storage)
    data = load_labelled(cfg.data)
    folds = make_folds(data.patients, data.label_names, cfg.folds, cfg.val_fraction, seed=cfg.fold_seed)
    encoders = resolve_encoders(cfg.encoders, default_backbone=cfg.backbone, in_chans=cfg.in_chans,
                                tracking_uri=tracking_uri)
    unknown = sorted(set(cfg.encoder_tags) - {e.name for e in encoders})
    if unknown:
        raise UserError(f"encoder_tags name {unknown}, which are not encoders of the study "
                        f"({', '.join(e.name for e in encoders)})")
    settings = cfg.to_dict()
    settings["encoder_tags"] = {k: tracking.check_tags(v, f"encoder_tags[{k!r}]") for k, v in cfg.encoder_tags.items()}
    settings["img_size"] = cfg.img_size or int(data.images.shape[-1])
    ray_connect.connect(cfg.address)
    ray_cluster.check_capacity(ray_cluster.WorkerRequest(1, cfg.cpus_per_trial, cfg.gpus_per_trial),
                               what="one trial:")

    cl = tracking.client(tracking_uri)
    exp_id = tracking.get_or_create_experiment(cl, cfg.experiment,
                                               tracking.default_artifact_location(tracking_uri, cfg.storage))
    parent = cl.create_run(exp_id, run_name=f"study-{cfg.experiment}", tags={
        tracking.TAG_KIND: "study", tracking.TAG_STAGE: "finetune", tracking.TAG_STUDY: cfg.experiment,
        "dataset": data.dataset,
        "encoders": ",".join(e.name for e in encoders)})
    parent_id = parent.info.run_id
    tracking.set_tags(cl, parent_id, {"protocol": cfg.protocol, "protocol_text": cfg.protocol_text(),
                                      "stopping": cfg.stopping, "stopping_text": cfg.stopping_text()})
    tracking.log_params(cl, parent_id, {**cfg.as_params(), "classes": json.dumps(data.classes),
                                        "n_slices": len(data.labels), "n_patients": len(set(data.patients)),
                                        "img_size_effective": settings["img_size"]})
    ctx = StudyContext(images=data.images, labels=data.labels, classes=data.classes, folds=folds,
                       encoders=_encoder_payload(encoders, data.intensity, data.intensity_stats), settings=settings,
                       tracking_uri=tracking.worker_uri(tracking_uri), experiment_id=exp_id, parent_run_id=parent_id,
                       env=ray_connect.forwarded_env(), patients=np.asarray(data.patients))
    try:
        names = [e.name for e in encoders]
        results = run_trials(plan_grid(names, cfg.sizes, cfg.folds, cfg.seeds), ctx, cfg, f"{cfg.experiment}-grid")
        minimal: dict[str, Any] = {}
        if cfg.search_enabled:
            results, minimal = _search(cfg, ctx, names, folds, data, results)
            cl.log_dict(parent_id, {"minimal_samples_per_class": minimal}, "search.json")
            tracking.set_tags(cl, parent_id, {f"min_spc.{k}": v for k, v in minimal.items()})
        _close_orphans(cl, exp_id, parent_id)
        failed = sum(1 for r in results if r.get("error"))
        stopped = sum(1 for r in results if not r.get("error") and "test_auc" not in r["metrics"])
        if failed == len(results):
            raise RuntimeError(f"all {failed} fine-tuning trials failed; first error: {results[0]['error']}")
        from ray_jobs.report.collect import collect_trials
        from ray_jobs.report.tables import summarise

        trials = collect_trials(tracking_uri, cfg.experiment, parent_id)
        summary = summarise(trials)
        _log_parent_artifacts(cl, parent_id, trials, summary, minimal)
        cl.set_terminated(parent_id, status="FINISHED")
    except BaseException:
        cl.set_terminated(parent_id, status="FAILED")
        raise
    res = StudyResult(parent_run_id=parent_id, tracking_uri=tracking_uri, experiment=cfg.experiment,
                      trials=len(results), failed=failed, summary=summary, minimal=minimal, stopped=stopped)
    log.info("study finished: %d trials, %d failed, %d stopped early", res.trials, res.failed, res.stopped)
    return res


def _search(cfg: FinetuneConfig, ctx: StudyContext, names: list[str], folds, data, results):
    """Bisection over samples-per-class with extra trials; returns (all results, encoder -> minimal)."""
    smallest_class = min(int(np.bincount(data.labels[f.train], minlength=len(data.classes)).min()) for f in folds)
    cands = ladder(cfg.search_candidates, smallest_class)
    full = SizeSpec("per_class", -1)
    aucs = mean_auc(results)
    full_labels = {s.label for s in cfg.sizes if s.is_full}
    missing_full = [n for n in names if not any((n, lab) in aucs for lab in full_labels)]
    if missing_full:  # the full-data reference is needed for a margin and for "only all passes"
        results = results + run_trials(plan_grid(missing_full, [full], cfg.folds, cfg.seeds, phase="search"),
                                       ctx, cfg, f"{cfg.experiment}-search-full")
        aucs = mean_auc(results)
    states = []
    for n in names:
        full_auc = next((aucs[(n, lab)] for lab in (*full_labels, full.label) if (n, lab) in aucs), None)
        st = SearchState(encoder=n, candidates=cands,
                         threshold=threshold_for(full_auc, cfg.search_target_auc, cfg.search_margin))
        st.evaluated = {int(lab[1:]): v for (e, lab), v in aucs.items() if e == n and lab.startswith("n")}
        states.append((st, full_auc))
    rounds = [0]

    def evaluate(todo: dict[str, int]) -> dict[str, float]:
        nonlocal results
        rounds[0] += 1
        grid = [t for enc, n in todo.items()
                for t in plan_grid([enc], [SizeSpec("per_class", n)], cfg.folds, cfg.seeds, phase="search")]
        new = run_trials(grid, ctx, cfg, f"{cfg.experiment}-search-{rounds[0]}")
        results = results + new
        got = mean_auc(new)
        return {enc: got.get((enc, SizeSpec("per_class", n).label), float("nan")) for enc, n in todo.items()}

    bisect_sizes([s for s, _ in states], evaluate)
    minimal = {}
    for st, full_auc in states:
        passes_full = full_auc is not None and st.threshold is not None and full_auc >= st.threshold
        minimal[st.encoder] = st.result(passes_full)
        log.info("%s: threshold AUC %s, minimal samples per class %s (evaluated %s)", st.encoder,
                 None if st.threshold is None else round(st.threshold, 4), minimal[st.encoder],
                 {k: round(v, 3) for k, v in sorted(st.evaluated.items())})
    return results, minimal


def _close_orphans(cl, exp_id: str, parent_id: str) -> None:
    """Trials stopped by ASHA cannot close their own MLflow run; mark them KILLED."""
    runs = cl.search_runs([exp_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}' and "
                                                  "attributes.status = 'RUNNING'", max_results=10000)
    for r in runs:
        cl.set_terminated(r.info.run_id, status="KILLED")


def _log_parent_artifacts(cl, parent_id: str, trials, summary, minimal: dict[str, Any]) -> None:
    from ray_jobs.report.plots import plot_auc_vs_size
    from ray_jobs.report.tables import summary_markdown

    with tempfile.TemporaryDirectory() as tmp:
        md = os.path.join(tmp, "summary.md")
        with open(md, "w") as f:
            f.write(summary_markdown(summary))
            if minimal:
                f.write("\n\nMinimal samples per class: " + ", ".join(f"{k}: {v}" for k, v in minimal.items()) + "\n")
        csv = os.path.join(tmp, "summary.csv")
        summary.to_csv(csv, index=False)
        png = os.path.join(tmp, "auc_vs_size.png")
        plot_auc_vs_size(trials, png)
        tracking.log_artifacts(cl, parent_id, [md, csv, png])

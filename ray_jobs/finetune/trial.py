"""One Ray Tune trial: fine-tune one encoder on one size subset of one fold with one seed.

The trial trains in-process (fine-tuning is small; no nested Ray Train) with
:func:`ray_jobs.finetune.cell.fit_cell`, the same computation the benchmark times without Ray, reports
validation metrics
to Tune after every epoch (so an ASHA scheduler can stop weak trials) and logs everything to its own
MLflow child run under the study's parent run. Test metrics come from the best validation epoch's
weights, evaluated once at the end — the test fold never influences any choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctssl_base.ray_connect import apply_env
from ray_jobs import tracking
from ray_jobs.finetune.cell import SELECT_METRIC, fit_cell, late_best
from ray_jobs.finetune.config import FinetuneConfig, Recipe
from ray_jobs.finetune.folds import FoldSplit, nested_subset
from ray_jobs.trial_record import PREDICTIONS_ARTIFACT, SizeSpec
from ssl_core.metrics import bootstrap_metrics

log = logging.getLogger("ctssl.finetune")

# metric names in MLflow / Tune: test_<k> for k in classification_metrics (auc, f1_macro, accuracy, ...);
# SELECT_METRIC (from .cell) picks the best epoch and the recipe


@dataclass
class StudyContext:
    """Everything a trial needs besides its own (encoder, size, fold, seed); shipped once per study."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    folds: list[FoldSplit]
    encoders: dict[str, dict[str, Any]]  # name -> {backbone, in_chans, method, state, windows}
    settings: dict[str, Any]  # FinetuneConfig.to_dict()
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    env: dict[str, str]
    patients: np.ndarray | None = None  # pseudonym per row: the report bootstraps over test patients


def log_test_predictions(cl, run_id: str, y: np.ndarray, p: np.ndarray, rows: np.ndarray,
                         patients: np.ndarray | None) -> None:
    """The test set's labels, class probabilities, row numbers and patient pseudonyms, as an MLflow
    artifact: the report pools them over folds to test encoders against each other per patient,
    which three folds' mean AUCs alone cannot do (a paired test over 3 folds never reaches p < 0.05)."""

    pats = np.asarray(patients)[rows].astype(str) if patients is not None else np.array([], dtype=str)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(PREDICTIONS_ARTIFACT))
        np.savez_compressed(path, y=np.asarray(y, np.int64), p=np.asarray(p, np.float32),
                            rows=np.asarray(rows, np.int64), patients=pats)
        tracking.log_artifacts(cl, run_id, [path], os.path.dirname(PREDICTIONS_ARTIFACT))


def trial_tags(encoder: str, method: str, size: SizeSpec, fold: int, seed: int, parent: str,
               phase: str = "grid", extra: dict[str, str] | None = None) -> dict[str, str]:
    """The tags of a trial run: ``extra`` (the study's ``encoder_tags`` of this encoder, e.g. its
    reduction level) first, then the study's own, which win: ``method`` stays the encoder's name
    (what the report groups by), ``pretrain_method`` is its pre-training method."""
    return {**(extra or {}), "ctssl.phase": phase, tracking.TAG_STAGE: "finetune",
        tracking.PARENT_TAG: parent, tracking.TAG_KIND: "trial", "method": encoder, "encoder": encoder,
        "pretrain_method": method, "size": size.label, "size_kind": size.kind, "size_value": str(size.value),
        "fold": str(fold), "seed": str(seed),
    }


def recipes_of(settings: dict[str, Any]) -> list[Recipe]:
    """The recipes a trial trains, from the study settings (FinetuneConfig.to_dict())."""

    return FinetuneConfig.from_dict(settings).recipe_grid()


def stopping_of(settings: dict[str, Any]) -> dict[str, Any]:
    """The stopping rule a trial trains each recipe with (settings of an older ctssl: a fixed count)."""

    if "stopping" not in settings:
        return FinetuneConfig.from_dict({**settings, "stopping": "fixed"}).stopping_kwargs()
    return FinetuneConfig.from_dict(settings).stopping_kwargs()


def run_trial(config: dict[str, Any], ctx: StudyContext) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters(run_trial, ctx=...)``): one cell,
    then the memory it used handed back (:func:`release_memory`), since Tune reuses the process."""
    try:
        _run_trial(config, ctx)
    finally:
        release_memory()


def release_memory() -> None:
    """Collect reference cycles and return freed heap pages to the OS.

    A trial process is reused for the next trial; without this, each resnet50 trial left ~300 MB more
    resident (models, optimiser state and best-epoch copies freed into glibc's arenas but never given
    back), and two trial processes of a 45-trial study grew past 8 GB each. With it the resident size
    stays flat from trial to trial."""

    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _run_trial(config: dict[str, Any], ctx: StudyContext) -> None:
    """One trial's work.

    Trains every recipe of the study's grid on the same training subset and initialisation, keeps the
    recipe whose best epoch has the highest validation AUC, and evaluates that one on the test fold.
    Per-epoch metrics of recipe i are logged as ``r<i>.<metric>``; the chosen recipe's curve is logged
    again under the plain names, so a fixed-recipe study and a tuned one read the same in MLflow."""
    import torch
    from ray import tune

    from ssl_core.finetune import FineTuner, create_classifier

    apply_env(ctx.env)
    torch.set_num_threads(max(1, int(ctx.settings["cpus_per_trial"])))  # no oversubscription of shared nodes
    t0 = time.perf_counter()
    spec = config["trial"]
    enc_name, size = spec["encoder"], SizeSpec.from_label(spec["size"])
    fold, seed = int(spec["fold"]), int(spec["seed"])
    s = ctx.settings
    recipes = recipes_of(s)
    epochs = int(s["epochs"])
    stop = stopping_of(s)
    limit = epochs + int(stop["extend_epochs"])  # the most epochs one recipe can report
    enc = ctx.encoders[enc_name]
    split = ctx.folds[fold]
    train_idx = nested_subset(split.train, ctx.labels, size, seed)
    counts = np.bincount(ctx.labels[train_idx], minlength=len(ctx.classes))

    cl = tracking.client(ctx.tracking_uri)
    run = cl.create_run(ctx.experiment_id, run_name=f"{enc_name}-{size.label}-fold{fold}-seed{seed}",
                        tags=trial_tags(enc_name, enc["method"], size, fold, seed, ctx.parent_run_id,
                                        spec.get("phase", "grid"), (s.get("encoder_tags") or {}).get(enc_name)))
    run_id = run.info.run_id
    tracking.log_params(cl, run_id, {
        "encoder": enc_name, "backbone": enc["backbone"], "in_chans": enc["in_chans"], "size": size.label,
        "fold": fold, "seed": seed, "n_train": len(train_idx), "n_val": len(split.val), "n_test": len(split.test),
        "train_per_class_min": int(counts.min()), "train_per_class_max": int(counts.max()),
        "epochs": epochs, "protocol": s.get("protocol", "fixed"), "stopping": s.get("stopping", "fixed"),
        "patience": stop["patience"], "min_delta": stop["min_delta"], "extend_epochs": stop["extend_epochs"],
        "recipes": ",".join(r.to_text() for r in recipes), "weight_decay": s["weight_decay"],
        "batch_size": s["batch_size"], "img_size": s["img_size"], "bn_recalibrate": s.get("bn_recalibrate", False),
    })
    mlog = tracking.MetricLogger(cl, run_id, flush_every=1)
    completed = False  # test metrics logged: the run is complete even if Tune stops it afterwards
    try:
        images = torch.from_numpy(ctx.images.astype(np.float32))
        labels = torch.from_numpy(np.array(ctx.labels, copy=True))

        def on_epoch(i: int, rec: dict[str, float]) -> None:
            step = int(rec["epoch"])
            metrics = {k: float(v) for k, v in rec.items() if k != "epoch" and np.isfinite(v)}
            mlog.log({f"r{i}.{k}": v for k, v in metrics.items()} if len(recipes) > 1 else metrics, step)
            # the selection metric always, NaN included: a validation split holding one class has no AUC,
            # and a report without the scheduler's metric would fail the trial
            tune.report({**metrics, SELECT_METRIC: float(rec.get(SELECT_METRIC, float("nan"))),
                         "epoch": i * limit + step, "recipe": i})

        cell = fit_cell(images, labels, train_idx, split.val, split.test, recipes=recipes,
                        make_model=lambda: create_classifier(enc["backbone"], num_classes=len(ctx.classes),
                                                             in_chans=enc["in_chans"], encoder_state=enc["state"]),
                        epochs=epochs, seed=seed, init_seed=seed * 1009 + fold,
                        finetune_kwargs={"weight_decay": s["weight_decay"], "batch_size": s["batch_size"],
                                         "img_size": s["img_size"], "windows": enc.get("windows"),
                                         "bn_recalibrate": bool(s.get("bn_recalibrate", False)), **stop},
                        on_epoch=on_epoch)
        recipe, fit = cell.recipe, cell.fit
        if len(recipes) > 1:  # each recipe's best, then the chosen curve under the plain names
            mlog.log({f"r{i}.best_{SELECT_METRIC}": v for i, (_, v) in enumerate(cell.fits)}, limit)
            for rec in fit.history:
                mlog.log({k: float(v) for k, v in rec.items() if k != "epoch" and np.isfinite(v)},
                         int(rec["epoch"]))
        tracking.set_tags(cl, run_id, {"recipe": recipe.to_text(), "recipe_label": recipe.label})
        y, p = cell.y_test, cell.p_test
        if s.get("metrics_ci"):
            boot = bootstrap_metrics(y, p, n_boot=int(s["metrics_ci"]), seed=seed)
            test = {}
            for k, ci in boot.metrics.items():
                test.update(ci.as_dict(f"test_{k}"))
        else:
            test = FineTuner.metrics(y, p, prefix="test_")
        log_test_predictions(cl, run_id, y, p, split.test, ctx.patients)
        final = {**{k: float(v) for k, v in test.items()}, "best_epoch": float(fit.best_epoch),
                 f"best_{SELECT_METRIC}": float(fit.best_metrics.get(SELECT_METRIC, float("nan"))),
                 "late_best": float(late_best(fit.best_epoch, fit.max_epochs or epochs)), "chosen_lr": recipe.lr,
                 # how the chosen recipe's run ended: the report counts runs that stopped on validation
                 # and those that hit the maximum, and leaves unconverged cells out of its verdict
                 "epochs_run": float(fit.epochs_run), "max_epochs": float(fit.max_epochs or epochs),
                 "stopped_early": float(fit.stopped_early), "extended": float(fit.extended),
                 "converged": float(fit.converged),
                 "chosen_frozen_epochs": float(recipe.frozen_epochs),
                 "n_train": float(len(train_idx)), "train_per_class_min": float(counts.min()),
                 "trial_time_s": time.perf_counter() - t0}
        mlog.log({k: v for k, v in final.items() if np.isfinite(v)}, limit)
        mlog.flush()
        completed = True
        log.info("trial %s/%s/fold%d/seed%d: recipe %s, test AUC %.3f (best epoch %d) in %.0fs", enc_name,
                 size.label, fold, seed, recipe.label, final.get("test_auc", float("nan")), fit.best_epoch,
                 final["trial_time_s"])
        # val_auc again so a scheduler watching it sees it in every result
        tune.report({**final, SELECT_METRIC: final[f"best_{SELECT_METRIC}"], "epoch": limit * len(recipes)})
        cl.set_terminated(run_id, status="FINISHED")
        # nothing is returned: Tune would record a returned dict as one more result
    except Exception:
        mlog.flush()
        cl.set_terminated(run_id, status="FINISHED" if completed else "FAILED")
        raise
    except BaseException:  # stopped by the scheduler (ASHA) or the user
        mlog.flush()
        cl.set_terminated(run_id, status="FINISHED" if completed else "KILLED")
        raise

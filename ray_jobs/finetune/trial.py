"""One Ray Tune trial: fine-tune one encoder on one size subset of one fold with one seed.

The trial trains in-process (fine-tuning is small; no nested Ray Train), reports validation metrics
to Tune after every epoch (so an ASHA scheduler can stop weak trials) and logs everything to its own
MLflow child run under the study's parent run. Test metrics come from the best validation epoch's
weights, evaluated once at the end — the test fold never influences any choice.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_jobs import tracking
from ray_jobs.finetune.config import SizeSpec
from ray_jobs.finetune.folds import FoldSplit, nested_subset

log = logging.getLogger("ctssl.finetune")

#: metric names in MLflow / Tune: test_<k> for k in classification_metrics (auc, f1_macro, accuracy, ...)
SELECT_METRIC = "val_auc"


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


PREDICTIONS_ARTIFACT = "predictions/test.npz"


def log_test_predictions(cl, run_id: str, y: np.ndarray, p: np.ndarray, rows: np.ndarray,
                         patients: np.ndarray | None) -> None:
    """The test set's labels, class probabilities, row numbers and patient pseudonyms, as an MLflow
    artifact: the report pools them over folds to test encoders against each other per patient,
    which three folds' mean AUCs alone cannot do (a paired test over 3 folds never reaches p < 0.05)."""
    import tempfile

    pats = np.asarray(patients)[rows].astype(str) if patients is not None else np.array([], dtype=str)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(PREDICTIONS_ARTIFACT))
        np.savez_compressed(path, y=np.asarray(y, np.int64), p=np.asarray(p, np.float32),
                            rows=np.asarray(rows, np.int64), patients=pats)
        tracking.log_artifacts(cl, run_id, [path], os.path.dirname(PREDICTIONS_ARTIFACT))


def trial_tags(encoder: str, method: str, size: SizeSpec, fold: int, seed: int, parent: str,
               phase: str = "grid") -> dict[str, str]:
    return {"ctssl.phase": phase,
        tracking.PARENT_TAG: parent, tracking.TAG_KIND: "trial", "method": encoder, "pretrain_method": method,
        "size": size.label, "size_kind": size.kind, "size_value": str(size.value), "fold": str(fold),
        "seed": str(seed),
    }


def run_trial(config: dict[str, Any], ctx: StudyContext) -> None:
    """The Tune function trainable (wrapped with ``tune.with_parameters(run_trial, ctx=...)``)."""
    import torch
    from ray import tune

    from ray_jobs.ray_cluster import apply_env
    from ssl_core.finetune import FinetuneConfig as FTConfig
    from ssl_core.finetune import FineTuner, create_classifier
    from ssl_core.metrics import bootstrap_metrics

    apply_env(ctx.env)
    torch.set_num_threads(max(1, int(ctx.settings["cpus_per_trial"])))  # no oversubscription of shared nodes
    t0 = time.perf_counter()
    spec = config["trial"]
    enc_name, size, fold, seed = spec["encoder"], SizeSpec.from_label(spec["size"]), int(spec["fold"]), int(spec["seed"])
    s = ctx.settings
    enc = ctx.encoders[enc_name]
    split = ctx.folds[fold]
    train_idx = nested_subset(split.train, ctx.labels, size, seed)
    counts = np.bincount(ctx.labels[train_idx], minlength=len(ctx.classes))

    cl = tracking.client(ctx.tracking_uri)
    run = cl.create_run(ctx.experiment_id, run_name=f"{enc_name}-{size.label}-fold{fold}-seed{seed}",
                        tags=trial_tags(enc_name, enc["method"], size, fold, seed, ctx.parent_run_id,
                                        spec.get("phase", "grid")))
    run_id = run.info.run_id
    tracking.log_params(cl, run_id, {
        "encoder": enc_name, "backbone": enc["backbone"], "in_chans": enc["in_chans"], "size": size.label,
        "fold": fold, "seed": seed, "n_train": len(train_idx), "n_val": len(split.val), "n_test": len(split.test),
        "train_per_class_min": int(counts.min()), "train_per_class_max": int(counts.max()),
        "epochs": s["epochs"], "frozen_epochs": s["frozen_epochs"], "lr": s["lr"],
        "weight_decay": s["weight_decay"], "batch_size": s["batch_size"], "img_size": s["img_size"],
    })
    mlog = tracking.MetricLogger(cl, run_id, flush_every=1)
    completed = False  # test metrics logged: the run is complete even if Tune stops it afterwards
    try:
        torch.manual_seed(seed * 1009 + fold)
        model = create_classifier(enc["backbone"], num_classes=len(ctx.classes), in_chans=enc["in_chans"],
                                  encoder_state=enc["state"])
        ft = FineTuner(model, FTConfig(epochs=s["epochs"], freeze_epochs=s["frozen_epochs"], lr=s["lr"],
                                       weight_decay=s["weight_decay"], batch_size=s["batch_size"],
                                       img_size=s["img_size"], windows=enc.get("windows"), select_metric="auc",
                                       seed=seed))
        images = torch.from_numpy(ctx.images.astype(np.float32))
        labels = torch.from_numpy(np.array(ctx.labels, copy=True))

        def part(idx: np.ndarray, train: bool):
            ix = torch.tensor(idx)  # a copy: split indices may be read-only views (Ray object store)
            return ft.batches(images[ix].unsqueeze(1), labels[ix], train=train)

        def on_epoch(rec: dict[str, float]) -> None:
            step = int(rec["epoch"])
            metrics = {k: float(v) for k, v in rec.items() if k != "epoch" and np.isfinite(v)}
            mlog.log(metrics, step)
            tune.report({**metrics, "epoch": step})

        fit = ft.fit(part(train_idx, True), part(split.val, False), on_epoch=on_epoch)
        ft.model.load_state_dict(fit.best_state)
        y, p = ft.predict(part(split.test, False))
        if s.get("metrics_ci"):
            boot = bootstrap_metrics(y, p, n_boot=int(s["metrics_ci"]), seed=seed)
            test = {}
            for k, ci in boot.metrics.items():
                test.update(ci.as_dict(f"test_{k}"))
        else:
            test = ft.metrics(y, p, prefix="test_")
        log_test_predictions(cl, run_id, y, p, split.test, ctx.patients)
        final = {**{k: float(v) for k, v in test.items()}, "best_epoch": float(fit.best_epoch),
                 f"best_{SELECT_METRIC}": float(fit.best_metrics.get(SELECT_METRIC, float("nan"))),
                 "n_train": float(len(train_idx)), "train_per_class_min": float(counts.min()),
                 "trial_time_s": time.perf_counter() - t0}
        mlog.log({k: v for k, v in final.items() if np.isfinite(v)}, s["epochs"])
        mlog.flush()
        completed = True
        log.info("trial %s/%s/fold%d/seed%d: test AUC %.3f (best epoch %d) in %.0fs", enc_name, size.label, fold,
                 seed, final.get("test_auc", float("nan")), fit.best_epoch, final["trial_time_s"])
        # val_auc again so a scheduler watching it sees it in every result
        tune.report({**final, SELECT_METRIC: final[f"best_{SELECT_METRIC}"], "epoch": s["epochs"]})
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

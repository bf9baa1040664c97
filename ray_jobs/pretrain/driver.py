"""The driver of a pre-training run: check everything, then hand the loop to Ray Train, then log results.

All checks that can fail for a user's reason (unknown method or backbone, data without a committed
manifest, a selection of another dataset, more workers than the cluster holds) run before any worker
starts, so a mistake costs seconds and prints one line. The pieces live by concern: the checks and
the sizing from the data in :mod:`~ray_jobs.pretrain.sizing`, the MLflow run in
:mod:`~ray_jobs.pretrain.mlflow_run`, the two trainer builds in :mod:`~ray_jobs.pretrain.trainer`;
this module puts them in order and returns the result.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from ctssl_base import ray_connect, storage
from ctssl_base.lease import Lease
from ray_jobs import ray_cluster, tracking
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain import monitor, orphans, resume_guard
from ray_jobs.pretrain.budget import Budget
from ray_jobs.pretrain.checkpoint_store import CheckpointStore
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.mlflow_run import log_encoder, open_run, register_encoder
from ray_jobs.pretrain.sizing import (
    check_local_device,
    check_method_builds,
    method_options,
    prepare,
    runs_in_process,
    torch_threads,
)
from ray_jobs.pretrain.trainer import build_trainer

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    checkpoint_path: str  # final checkpoint folder (in --storage), holds encoder.pt
    steps: int
    epochs: int
    restarts: int
    train_time_s: float = 0.0  # training-loop seconds over all attempts (what a time budget counts)
    registered_model: str | None = None  # MLflow registered model of the encoder (cfg.register_as)
    model_version: str | None = None  # its version made from this run

    @property
    def model_uri(self) -> str | None:
        """``models:/NAME/VERSION`` of the registered encoder (None when it was not registered)."""
        return f"models:/{self.registered_model}/{self.model_version}" if self.model_version else None

    def summary(self) -> str:
        return (f"{self.steps} steps, {self.epochs} epochs, {self.restarts} restart(s), "
                f"{self.train_time_s:.0f} s of training; checkpoint {self.checkpoint_path}; "
                f"MLflow run {self.run_id} at {tracking.redact_uri(self.tracking_uri)}"
                + (f"; registered as {self.model_uri}" if self.model_uri else ""))


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pre-train as configured; returns where the final checkpoint and the MLflow run are.

    Once the settings are checked, the run holds the lease of its run folder ``STORAGE/EXPERIMENT``
    (:mod:`ctssl_base.lease`) until it returns: a second driver of the same experiment, whose
    checkpoint pruning would delete this one's checkpoints, is refused in one line before it writes."""
    with contextlib.ExitStack() as held:
        return _run_pretrain(cfg, held)


def _run_pretrain(cfg: PretrainConfig, held: contextlib.ExitStack) -> PretrainResult:
    # 1. checks and sizing that need no Ray (one line and no side effect when one fails)
    cfg, info, img_size, spe, batch_note = prepare(cfg)
    in_process = runs_in_process(cfg)
    budget = Budget.plan(spe, cfg.epochs, cfg.max_steps, cfg.time_budget_s)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking_uri, cfg.storage)
    opts = method_options(cfg, info, None if budget.timed else budget.schedule_steps)
    check_method_builds(cfg, img_size, opts)
    probe_set = monitor.build_probe_set(cfg)  # a --monitor-data that cannot make a fold: one line, here

    # 2. the run folder: its lease, the resume check, then the cluster (or this machine) for capacity
    ident = resume_guard.identity(cfg, img_size, spe, opts)
    held.enter_context(Lease(storage.join(cfg.storage, cfg.experiment), f"pretrain {cfg.experiment}",
                             tidy=True))
    resuming = resume_guard.check(cfg, ident)
    if in_process:
        check_local_device(cfg)
    else:
        ray_connect.connect(cfg.address)
        ray_cluster.check_capacity(ray_cluster.WorkerRequest(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker,
                                                              streams_data=True))
    storage_fs, storage_path = ray_cluster.arrow_filesystem(cfg.storage)
    if storage_fs is None:
        os.makedirs(storage_path, exist_ok=True)
    if not resuming:
        resume_guard.record(cfg, ident)
    store = CheckpointStore(cfg.storage, cfg.experiment)

    # 3. the MLflow run (found again on a rerun), then the workers' payload and the trainer
    extra = {"batch_size_auto": batch_note or "no (--batch-size)", "schedule_steps": budget.schedule_steps,
             "budget": budget.describe() if cfg.budgeted else "none",
             "runner_effective": "in-process" if in_process else "ray"}
    run_id = open_run(cfg, info, tracking_uri, img_size, spe, opts, extra)
    _log_start(cfg, info, img_size, spe, budget, in_process)
    payload = _payload(cfg, img_size, spe, info.dataset, tracking_uri, run_id, opts, in_process,
                       resume_from=store.latest() if resuming else None, probe_set=probe_set)
    trainer = build_trainer(cfg, info, payload, in_process=in_process, storage_fs=storage_fs,
                            storage_path=storage_path)

    # 4. train; the run is FAILED unless the encoder is logged (and registered when asked)
    cl = tracking.client(tracking_uri)
    try:
        result = trainer.fit()
    except BaseException:
        cl.set_terminated(run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        cl.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"pre-training {cfg.experiment} ended without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        progress = ckpt_io.load_progress(d)
        log_encoder(cl, run_id, d)
    tracking.set_tags(cl, run_id, {"checkpoint": result.checkpoint.path, "final_step": progress.step,
                                   "train_time_s": f"{progress.train_time_s:.1f}"})
    try:
        model_version = register_encoder(cl, cfg, run_id)
    except BaseException:
        cl.set_terminated(run_id, status="FAILED")
        raise
    cl.set_terminated(run_id, status="FINISHED")

    # 5. tidy the run folder: checkpoints neither Ray Train nor the store registered are deleted
    ckpt_path = result.checkpoint.path
    registered = ([c.path for c, _ in (result.best_checkpoints or [])] if not in_process else store.complete())
    orphans.prune_unregistered(cfg.storage, cfg.experiment, [*registered, ckpt_path])
    if storage_fs is not None:
        ckpt_path = f"{cfg.storage.split('://', 1)[0]}://{ckpt_path}"
    res = PretrainResult(run_id=run_id, tracking_uri=tracking_uri, checkpoint_path=ckpt_path,
                         steps=progress.step, epochs=progress.epoch, restarts=progress.restarts,
                         train_time_s=progress.train_time_s, registered_model=cfg.register_as,
                         model_version=model_version)
    log.info("pre-training finished: %s", res.summary())
    return res


def _log_start(cfg: PretrainConfig, info: Any, img_size: int, spe: int, budget: Budget, in_process: bool) -> None:
    """One line saying what is about to train, on what, for how long and where."""
    length = (f"{spe} steps/epoch x {cfg.epochs} epochs" if not cfg.budgeted else
              f"{spe} steps/epoch until {budget.describe()}"
              + (", whichever comes first" if budget.timed and budget.step_cap else "")
              + (" (training-loop time; start-up not counted)" if budget.timed else ""))
    log.info("pre-training %s on %s: %d slices of %dx%d -> %d px, %d workers x %d, %s, %s", cfg.method,
             info.read_url, info.rows, info.height, info.width, img_size, cfg.workers, cfg.per_worker_batch, length,
             "in this process" if in_process else "on Ray Train")


def _payload(cfg: PretrainConfig, img_size: int, spe: int, dataset: str, tracking_uri: str, run_id: str,
             opts: dict, in_process: bool, *, resume_from: str | None, probe_set: Any) -> dict[str, Any]:
    """What every worker's loop gets. It goes through Ray's object store and Train's pickles, so it
    holds no password (:func:`tracking.worker_uri`)."""
    worker_cfg = {**cfg.to_dict(), "tracking_uri": cfg.tracking_uri and tracking.worker_uri(cfg.tracking_uri)}
    return {
        "config": worker_cfg, "img_size": img_size, "steps_per_epoch": spe, "dataset": dataset,
        "tracking_uri": tracking.worker_uri(tracking_uri), "mlflow_run_id": run_id, "env": ray_connect.forwarded_env(),
        "method_options": opts, "torch_threads": torch_threads(cfg, in_process),
        # where a rerun continues from when Ray Train has no checkpoint of its own to hand the loop
        # (the last run trained in this process, or its checkpoints were not registered)
        "resume_from": resume_from,
        "in_process": in_process,
        "monitor": monitor.ship(probe_set, in_process),  # the probe's slices (rank 0 embeds them)
    }

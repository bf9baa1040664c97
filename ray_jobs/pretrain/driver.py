"""The driver of a pre-training run: check everything, then hand the loop to Ray Train, then log results.

All checks that can fail for a user's reason (unknown method or backbone, data without a committed
manifest, a selection of another dataset, more workers than the cluster holds) run here, before any
worker starts, so a mistake costs seconds and prints one line.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import tempfile
from dataclasses import dataclass

from ray_jobs import tracking
from ray_jobs.errors import CLIError
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain import orphans, resume_guard
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import DataInfo, build_dataset, inspect_data

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    checkpoint_path: str  # final checkpoint folder (in --storage), holds encoder.pt
    steps: int
    epochs: int
    restarts: int

    def summary(self) -> str:
        return (f"{self.steps} steps, {self.epochs} epochs, {self.restarts} restart(s); checkpoint "
                f"{self.checkpoint_path}; MLflow run {self.run_id} at {self.tracking_uri}")


def check_method(cfg: PretrainConfig) -> None:
    from ssl_core.methods import method_names

    names = method_names()
    if cfg.method not in names:
        raise CLIError(f"--method {cfg.method!r} is not a pre-training method; known: {', '.join(names)}")


def check_backbone(name: str) -> None:
    import timm

    if not timm.list_models(name):
        raise CLIError(f"--backbone {name!r} is not a timm model (see timm.list_models())")


def check_method_builds(cfg: PretrainConfig, img_size: int, opts: dict) -> None:
    """Build the method once here: a setting it cannot take (an image too small for SparK's patches,
    an unknown option) is then one line before any worker starts, not an error every worker repeats
    through --max-failures restarts."""
    from ssl_core.methods import create_method

    try:
        create_method(cfg.method, backbone=cfg.backbone, in_chans=cfg.in_chans, img_size=img_size, **opts)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--method {cfg.method} with --backbone {cfg.backbone} at {img_size} px: {e}") from None


def method_options(cfg: PretrainConfig, info: DataInfo, total_steps: int | None = None) -> dict:
    """Constructor options: the user's, plus values sized from the data where stock defaults assume
    ImageNet (a 65,536-key MoCo queue or 3,000 SwAV prototypes on a pool of a few thousand slices
    make each image its own negative / leave most prototypes empty). 8-bit image sets get the
    ``gray8`` window unless windows are given. Every data-derived value is logged."""
    from ssl_core.methods import get_method_class

    opts = dict(cfg.method_options)
    params = inspect.signature(get_method_class(cfg.method).__init__).parameters

    def default(name: str):
        p = params.get(name)
        return None if p is None or p.default is inspect.Parameter.empty else p.default

    if info.intensity == "gray8" and "windows" not in opts and "windows" in params:
        opts["windows"] = ["gray8"] * cfg.in_chans
    q = default("queue_size")
    if q and "queue_size" not in opts:
        # keys younger than a quarter epoch: an image's own previous key is (almost) never a negative
        fit = max(cfg.batch_size, (info.rows // 4) // cfg.batch_size * cfg.batch_size)
        if fit < q:
            opts["queue_size"] = fit
            log.info("MoCo queue sized from the data: %d keys (%d slices; default %d)", fit, info.rows, q)
    k = default("n_prototypes")
    if k and "n_prototypes" not in opts:
        fit = max(10, info.rows // 10)
        if fit < k:
            opts["n_prototypes"] = fit
            log.info("SwAV prototypes sized from the data: %d (%d slices; default %d)", fit, info.rows, k)
    f = default("freeze_prototypes_iters")
    if f and total_steps and "freeze_prototypes_iters" not in opts and f > total_steps // 10:
        opts["freeze_prototypes_iters"] = total_steps // 10
        log.info("SwAV prototypes frozen for %d of %d steps (default %d)", total_steps // 10, total_steps, f)
    return opts


def plan_steps(cfg: PretrainConfig, info: DataInfo) -> int:
    """Optimiser steps per epoch: every worker takes the same number of full batches."""
    per_worker_rows = info.rows // cfg.workers
    spe = per_worker_rows // cfg.per_worker_batch
    if spe == 0:
        raise CLIError(f"--batch-size {cfg.batch_size} over {cfg.workers} worker(s) needs at least "
                       f"{cfg.batch_size} slices, {info.read_url} has {info.rows}")
    if cfg.steps_per_epoch is not None:
        spe = min(spe, cfg.steps_per_epoch)
    return spe


def prepare(cfg: PretrainConfig) -> tuple[DataInfo, int, int]:
    """All checks that need no Ray: (data info, image size, steps per epoch)."""
    cfg.validate()
    check_method(cfg)
    check_backbone(cfg.backbone)
    info = inspect_data(cfg.data, cfg.selection)
    img_size = cfg.img_size or info.height
    return info, img_size, plan_steps(cfg, info)


def _mlflow_run(cfg: PretrainConfig, info: DataInfo, tracking_uri: str, img_size: int, spe: int,
                opts: dict) -> str:
    """The run of this experiment (reused when the same --experiment is rerun, so curves continue)."""
    cl = tracking.client(tracking_uri)
    exp_id = tracking.get_or_create_experiment(
        cl, cfg.experiment, tracking.default_artifact_location(tracking_uri, cfg.storage))
    key = f"{cfg.storage.rstrip('/')}/{cfg.experiment}"
    found = tracking.find_run(cl, exp_id, {tracking.TAG_RUN_KEY: key})
    if found is not None:
        log.info("resuming MLflow run %s", found.info.run_id)
        if found.info.status != "RUNNING":
            cl.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run = cl.create_run(exp_id, run_name=f"{cfg.method}-{cfg.backbone}-{cfg.experiment}", tags={
        tracking.TAG_KIND: "pretrain", tracking.TAG_RUN_KEY: key, "method": cfg.method,
        "backbone": cfg.backbone, "dataset": info.dataset, "selection": cfg.selection or "none",
    })
    params = {**cfg.as_params(), "img_size_effective": img_size, "steps_per_epoch": spe, "rows": info.rows,
              "intensity": info.intensity, "method_options_effective": json.dumps(opts, sort_keys=True)}
    tracking.log_params(cl, run.info.run_id, params)
    return run.info.run_id


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pre-train as configured; returns where the final checkpoint and the MLflow run are."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_jobs import ray_cluster

    info, img_size, spe = prepare(cfg)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking_uri, cfg.storage)
    opts = method_options(cfg, info, spe * cfg.epochs)
    check_method_builds(cfg, img_size, opts)
    ident = resume_guard.identity(cfg, img_size, spe, opts)
    resuming = resume_guard.check(cfg, ident)
    ray_cluster.connect(cfg.address)
    ray_cluster.check_capacity(ray_cluster.WorkerRequest(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker,
                                                          streams_data=True))
    storage_fs, storage_path = ray_cluster.arrow_filesystem(cfg.storage)
    if storage_fs is None:
        os.makedirs(storage_path, exist_ok=True)
    if not resuming:
        resume_guard.record(cfg, ident)
    run_id = _mlflow_run(cfg, info, tracking_uri, img_size, spe, opts)
    log.info("pre-training %s on %s: %d slices of %dx%d -> %d px, %d workers x %d, %d steps/epoch x %d epochs",
             cfg.method, info.read_url, info.rows, info.height, info.width, img_size, cfg.workers,
             cfg.per_worker_batch, spe, cfg.epochs)
    payload = {
        "config": cfg.to_dict(), "img_size": img_size, "steps_per_epoch": spe, "dataset": info.dataset,
        "tracking_uri": tracking_uri, "mlflow_run_id": run_id, "env": ray_cluster.forwarded_env(),
        "method_options": opts,
    }
    from ray_jobs.pretrain.loop import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, placement_strategy=cfg.placement_strategy,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.experiment, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": ray_cluster.forwarded_env()},
        ),
        datasets={"train": build_dataset(info)},
    )
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
        with tempfile.TemporaryDirectory() as tmp:
            # log copies: the checkpoint folder may be a read-only download cache
            import shutil

            for name in (ckpt_io.ENCODER_FILE, ckpt_io.ENCODER_CONFIG_FILE):
                shutil.copy(os.path.join(d, name), os.path.join(tmp, name))
            tracking.log_artifacts(cl, run_id, [os.path.join(tmp, ckpt_io.ENCODER_FILE),
                                                os.path.join(tmp, ckpt_io.ENCODER_CONFIG_FILE)], "encoder")
    tracking.set_tags(cl, run_id, {"checkpoint": result.checkpoint.path, "final_step": progress.step})
    cl.set_terminated(run_id, status="FINISHED")
    ckpt_path = result.checkpoint.path
    registered = [c.path for c, _ in (result.best_checkpoints or [])] + [ckpt_path]
    orphans.prune_unregistered(cfg.storage, cfg.experiment, registered)
    if storage_fs is not None:
        ckpt_path = f"{cfg.storage.split('://', 1)[0]}://{ckpt_path}"
    res = PretrainResult(run_id=run_id, tracking_uri=tracking_uri, checkpoint_path=ckpt_path,
                         steps=progress.step, epochs=progress.epoch, restarts=progress.restarts)
    log.info("pre-training finished: %s", res.summary())
    return res

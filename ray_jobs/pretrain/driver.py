"""The driver of a pre-training run: check everything, then hand the loop to Ray Train, then log results.

All checks that can fail for a user's reason (unknown method or backbone, data without a committed
manifest, a selection of another dataset, more workers than the cluster holds) run here, before any
worker starts, so a mistake costs seconds and prints one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import tempfile
from dataclasses import dataclass

from ctssl_base import ray_connect, storage
from ctssl_base.errors import UserError
from ctssl_base.lease import Lease
from ray_jobs import ray_cluster, tracking
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain import monitor, orphans, resume_guard
from ray_jobs.pretrain.budget import Budget
from ray_jobs.pretrain.checkpoint_store import CheckpointStore
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import DataInfo, build_dataset, inspect_data
from ray_jobs.pretrain.loop import train_loop_per_worker
from ssl_core.methods import create_method, get_method_class, method_names

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


def check_method(cfg: PretrainConfig) -> None:
    names = method_names()
    if cfg.method not in names:
        raise UserError(f"--method {cfg.method!r} is not a pre-training method; known: {', '.join(names)}")


def check_backbone(name: str) -> None:
    import timm

    if not timm.list_models(name):
        raise UserError(f"--backbone {name!r} is not a timm model (see timm.list_models())")


def check_method_builds(cfg: PretrainConfig, img_size: int, opts: dict) -> None:
    """Build the method once here: a setting it cannot take (an image too small for SparK's patches,
    a mask ratio its patch grid cannot realise, an unknown option) is then one line before any worker
    starts, not an error every worker repeats through --max-failures restarts."""

    try:
        method = create_method(cfg.method, backbone=cfg.backbone, in_chans=cfg.in_chans, img_size=img_size, **opts)
        method.check_setup()
    except (ValueError, TypeError) as e:
        raise UserError(f"--method {cfg.method} with --backbone {cfg.backbone} at {img_size} px: {e}") from None


def method_options(cfg: PretrainConfig, info: DataInfo, total_steps: int | None = None) -> dict:
    """Constructor options: the user's, plus values sized from the data where stock defaults assume
    ImageNet (a 65,536-key MoCo queue or 3,000 SwAV prototypes on a pool of a few thousand slices
    make each image its own negative / leave most prototypes empty). The sizing rules are the
    method's own (:meth:`SSLMethod.options_for_pool`); ``total_steps`` is the schedules' length, None
    for a time-budgeted run. 8-bit image sets get the ``gray8`` window unless windows are given.
    Every data-derived value is logged."""

    cls = get_method_class(cfg.method)
    user = dict(cfg.method_options)
    if cfg.time_budget_s is not None:
        fixed = [k for k in cls.step_count_options if k in user]
        if fixed:
            raise UserError(f"--method-option {fixed[0]} counts optimiser steps, but how many steps a --time-budget "
                            "run makes is known only when it ends; leave it out (the method sizes it as a share "
                            "of the budget) or use --max-steps instead of --time-budget")
    batch = cfg.batch_size if cfg.batch_size is not None else auto_batch_size(info.rows, cfg.workers)[0]
    suggested = cls.options_for_pool(info.rows, batch, total_steps, given=set(user))
    suggested = {k: v for k, v in suggested.items() if k not in user}
    if suggested:
        log.info("%s options sized from the data (%d slices, batch %d%s): %s", cfg.method, info.rows,
                 batch, f", {total_steps} schedule steps" if total_steps else ", a time budget",
                 ", ".join(f"{k}={v}" for k, v in sorted(suggested.items())))
    opts = {**suggested, **user}
    params = inspect.signature(cls.__init__).parameters
    if info.intensity == "gray8" and "windows" not in opts and "windows" in params:
        from data_prep import intensity
        from ssl_core.ct_window import dataset_windows

        opts["windows"] = dataset_windows(info.intensity, intensity.dataset_stats(info.read_url), cfg.in_chans)
        log.info("8-bit data: input windows %s (standardised by the pool's grey-value statistics)", opts["windows"])
    return opts


def torch_threads(cfg: PretrainConfig, in_process: bool = False) -> int:
    """Threads each worker's PyTorch uses. Ray hands a worker OMP_NUM_THREADS = its CPUs, and the
    capacity check keeps one CPU of the cluster free for Ray Data's readers, so on a 2-core machine a
    1-CPU worker would train on one thread while the reader idles once the epoch is cached. On a
    single-node CPU cluster (a laptop, the embedded Ray) each worker therefore takes the node's CPUs
    divided among the workers; elsewhere (several nodes, GPUs) exactly its --cpus-per-worker. A run in
    this process takes the machine's CPUs (this process's CPU affinity)."""
    base = max(1, int(cfg.cpus_per_worker))
    if in_process:
        return base if cfg.use_gpu else max(base, len(os.sched_getaffinity(0)))
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if cfg.use_gpu or len(nodes) != 1:
        return base
    cpus = int(float(nodes[0].get("Resources", {}).get("CPU", base)))
    return max(base, cpus // cfg.workers)


def runs_in_process(cfg: PretrainConfig) -> bool:
    """Whether the training loop runs in this process (``--runner in-process``) or on Ray Train workers.

    ``auto`` trains in this process when there is one worker and no Ray was named (no --address, not
    even ``local``, and no $RAY_ADDRESS: a laptop or a single machine). Ray Train's controller and worker
    processes then buy nothing, and on a small machine they cost: their start-up is ~15 s, and their
    background wake-ups (with Ray Data's) slow every step of a CPU run whose threads fill all cores
    by about a tenth (docs/benchmarks.md). Several workers, or a cluster (``ray job submit``, the
    Kubernetes RayJob), use Ray Train.
    """
    if cfg.runner == "in-process":
        if cfg.workers != 1:
            raise UserError(f"--runner in-process trains one worker in this process; --workers {cfg.workers} "
                            "needs --runner ray (or auto)")
        return True
    if cfg.runner == "ray":
        return False
    return cfg.workers == 1 and not cfg.address and not os.environ.get("RAY_ADDRESS")


def check_local_device(cfg: PretrainConfig) -> None:
    """A run in this process uses this machine's GPU: refuse GPUs it does not have, in one line."""
    if cfg.use_gpu:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--gpus-per-worker {cfg.gpus_per_worker:g}: this machine has no CUDA device, and a "
                            "one-worker run trains here (--runner in-process); use --gpus-per-worker 0, or name "
                            "a cluster with GPUs (--address, --runner ray)")


#: the auto batch aims at this many steps per epoch at least: a pool of a few thousand slices at the
#: papers' 256 makes ~6 optimiser steps an epoch, too few for any schedule in a short run
AUTO_BATCH_STEPS_PER_EPOCH = 32
AUTO_BATCH_MIN, AUTO_BATCH_MAX = 32, 256


def auto_batch_size(rows: int, workers: int) -> tuple[int, str]:
    """(global batch, why) for a pool of ``rows`` slices over ``workers``.

    The largest power of two <= rows / 32, clamped to 32..256 (the papers' batch for large pools;
    below 32 contrastive batches and batch norm get noisy), never more than the pool, then rounded
    down to a multiple of ``workers`` (each takes an equal share) and at least one image per worker.
    """
    target = max(rows // AUTO_BATCH_STEPS_PER_EPOCH, 1)
    b = min(max(1 << (target.bit_length() - 1), AUTO_BATCH_MIN), AUTO_BATCH_MAX)
    if b > rows:  # a tiny pool: one full batch of it
        b = 1 << (max(rows, 1).bit_length() - 1)
    b = max(b // workers * workers, workers)
    why = (f"{rows} slices / {AUTO_BATCH_STEPS_PER_EPOCH} -> a power of two in {AUTO_BATCH_MIN}..{AUTO_BATCH_MAX}"
           + (f", a multiple of {workers} workers" if workers > 1 else "") + f": {b}")
    return b, why


def resolve(cfg: PretrainConfig, info: DataInfo) -> tuple[PretrainConfig, str | None]:
    """``cfg`` with the defaults that depend on the data or the budget filled in: the batch (auto,
    with the reason, when --batch-size is not given) and the epoch limit (100, or none with a budget)."""
    why = None
    changes: dict = {"epochs": cfg.epoch_limit}
    if cfg.batch_size is None:
        changes["batch_size"], why = auto_batch_size(info.rows, cfg.workers)
    return dataclasses.replace(cfg, **changes), why


def plan_steps(cfg: PretrainConfig, info: DataInfo) -> int:
    """Optimiser steps per epoch: every worker takes the same number of full batches."""
    per_worker_rows = info.rows // cfg.workers
    spe = per_worker_rows // cfg.per_worker_batch
    if spe == 0:
        raise UserError(f"--batch-size {cfg.batch_size} over {cfg.workers} worker(s) needs at least "
                        f"{cfg.batch_size} slices, {info.read_url} has {info.rows}")
    if cfg.steps_per_epoch is not None:
        spe = min(spe, cfg.steps_per_epoch)
    return spe


def prepare(cfg: PretrainConfig) -> tuple[PretrainConfig, DataInfo, int, int, str | None]:
    """All checks that need no Ray: (resolved config, data info, image size, steps per epoch, why the
    batch is what it is when it was sized from the pool)."""
    cfg.validate()
    check_method(cfg)
    check_backbone(cfg.backbone)
    info = inspect_data(cfg.data, cfg.selection)
    cfg, why = resolve(cfg, info)
    img_size = cfg.img_size or info.height
    spe = plan_steps(cfg, info)
    if why:
        why += f" ({spe} steps per epoch)"
        log.info("batch size from the pool (--batch-size to set it): %s", why)
    return cfg, info, img_size, spe, why


def _mlflow_run(cfg: PretrainConfig, info: DataInfo, tracking_uri: str, img_size: int, spe: int,
                opts: dict, extra_params: dict | None = None) -> str:
    """The run of this experiment (reused when the same --experiment is rerun, so curves continue).

    It lives in ``cfg.mlflow_experiment`` (default: the --experiment name). The run key is the Ray
    experiment's folder (``storage/experiment``), so a restarted driver finds its run again even when
    other pre-training runs of a study share the MLflow experiment. ``cfg.tags`` are set on the run
    (again on a resume, so tags added since are there too), and the shards it trains on are its
    dataset input."""
    cl = tracking.client(tracking_uri)
    exp_id = tracking.get_or_create_experiment(
        cl, cfg.mlflow_experiment_name, tracking.default_artifact_location(tracking_uri, cfg.storage))
    key = f"{cfg.storage.rstrip('/')}/{cfg.experiment}"
    extra_tags = tracking.check_tags(cfg.tags, "pre-training tags")
    found = tracking.find_run(cl, exp_id, {tracking.TAG_RUN_KEY: key})
    if found is not None:
        log.info("resuming MLflow run %s", found.info.run_id)
        if found.info.status != "RUNNING":
            cl.update_run(found.info.run_id, status="RUNNING")
        if extra_tags:
            tracking.set_tags(cl, found.info.run_id, extra_tags)
        _log_dataset(cl, found.info.run_id, info)
        return found.info.run_id
    tags = {tracking.TAG_STAGE: "pretrain", "method": cfg.method, "backbone": cfg.backbone, "dataset": info.dataset,
            "selection": cfg.selection or "none", **extra_tags, tracking.TAG_KIND: "pretrain",
            tracking.TAG_RUN_KEY: key}
    run = cl.create_run(exp_id, run_name=f"{cfg.method}-{cfg.backbone}-{cfg.experiment}", tags=tags)
    params = {**cfg.as_params(), "img_size_effective": img_size, "steps_per_epoch": spe, "rows": info.rows,
              "intensity": info.intensity, "method_options_effective": json.dumps(opts, sort_keys=True),
              **(extra_params or {})}
    tracking.log_params(cl, run.info.run_id, params)
    _log_dataset(cl, run.info.run_id, info)
    return run.info.run_id


def _log_dataset(cl, run_id: str, info: DataInfo) -> None:
    """The shards (and selection) the run trains on, as its MLflow dataset input (digest and counts from
    the manifests). Metadata only: a tracking server that cannot take it costs a warning, not the run."""
    try:
        tracking.log_dataset_input(cl, run_id, info.dataset, info.base_url, info.selection)
    except Exception as e:  # noqa: BLE001 - an older server without dataset inputs, a manifest race
        log.warning("could not log the pre-training data as the run's MLflow dataset input (%s)", e)


def register_encoder(cl, cfg: PretrainConfig, run_id: str) -> str | None:
    """Register the run's logged ``encoder`` folder as a version of ``cfg.register_as`` (None when not
    asked). One version per run: a rerun of the same experiment returns the version it made before.
    The folder is first made an MLflow PyTorch model too (:func:`tracking.register_pytorch_flavour`), so
    ``mlflow.pytorch.load_model`` of the version gives the encoder as a torch module."""
    if not cfg.register_as:
        return None
    tracking.register_pytorch_flavour(cl, run_id, tracking.ENCODER_ARTIFACT)
    tags = {"method": cfg.method, "backbone": cfg.backbone, tracking.TAG_RUN_KEY: f"{cfg.storage.rstrip('/')}/"
            f"{cfg.experiment}", **tracking.check_tags(cfg.tags, "pre-training tags")}
    version = tracking.register_artifact(cl, cfg.register_as, run_id, tracking.ENCODER_ARTIFACT, tags=tags)
    tracking.set_tags(cl, run_id, {"registered_model": cfg.register_as, "registered_version": version.version})
    return str(version.version)


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Pre-train as configured; returns where the final checkpoint and the MLflow run are.

    Once the settings are checked, the run holds the lease of its run folder ``STORAGE/EXPERIMENT``
    (:mod:`ctssl_base.lease`) until it returns: a second driver of the same experiment, whose
    checkpoint pruning would delete this one's checkpoints, is refused in one line before it writes."""
    with contextlib.ExitStack() as held:
        return _run_pretrain(cfg, held)


def _run_pretrain(cfg: PretrainConfig, held: contextlib.ExitStack) -> PretrainResult:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg, info, img_size, spe, batch_note = prepare(cfg)
    in_process = runs_in_process(cfg)
    budget = Budget.plan(spe, cfg.epochs, cfg.max_steps, cfg.time_budget_s)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking_uri, cfg.storage)
    opts = method_options(cfg, info, None if budget.timed else budget.schedule_steps)
    check_method_builds(cfg, img_size, opts)

    probe_set = monitor.build_probe_set(cfg)  # a --monitor-data that cannot make a fold: one line, here
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
    extra = {"batch_size_auto": batch_note or "no (--batch-size)", "schedule_steps": budget.schedule_steps,
             "budget": budget.describe() if cfg.budgeted else "none",
             "runner_effective": "in-process" if in_process else "ray"}
    run_id = _mlflow_run(cfg, info, tracking_uri, img_size, spe, opts, extra)
    length = (f"{spe} steps/epoch x {cfg.epochs} epochs" if not cfg.budgeted else
              f"{spe} steps/epoch until {budget.describe()}"
              + (", whichever comes first" if budget.timed and budget.step_cap else "")
              + (" (training-loop time; start-up not counted)" if budget.timed else ""))
    log.info("pre-training %s on %s: %d slices of %dx%d -> %d px, %d workers x %d, %s, %s", cfg.method,
             info.read_url, info.rows, info.height, info.width, img_size, cfg.workers, cfg.per_worker_batch, length,
             "in this process" if in_process else "on Ray Train")
    # what workers get goes through Ray's object store and Train's pickles: no password in it
    worker_cfg = {**cfg.to_dict(), "tracking_uri": cfg.tracking_uri and tracking.worker_uri(cfg.tracking_uri)}
    payload = {
        "config": worker_cfg, "img_size": img_size, "steps_per_epoch": spe, "dataset": info.dataset,
        "tracking_uri": tracking.worker_uri(tracking_uri), "mlflow_run_id": run_id, "env": ray_connect.forwarded_env(),
        "method_options": opts, "torch_threads": torch_threads(cfg, in_process),
        # where a rerun continues from when Ray Train has no checkpoint of its own to hand the loop
        # (the last run trained in this process, or its checkpoints were not registered)
        "resume_from": store.latest() if resuming else None,
        "in_process": in_process,
        "monitor": monitor.ship(probe_set, in_process),  # the probe's slices (rank 0 embeds them)
    }

    if in_process:
        from ray_jobs.pretrain.shard_stream import ShardStream

        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=payload,
            scaling_config=ray.train.ScalingConfig(num_workers=0),  # Ray Train's local mode: no actors
            run_config=ray.train.RunConfig(name=cfg.experiment),
            datasets={"train": ShardStream(info, seed=cfg.seed)},
        )
    else:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=payload,
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.workers, use_gpu=cfg.use_gpu, placement_strategy=cfg.placement_strategy,
                resources_per_worker={"CPU": cfg.cpus_per_worker,
                                      **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=cfg.experiment, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": ray_connect.forwarded_env()},
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
    tracking.set_tags(cl, run_id, {"checkpoint": result.checkpoint.path, "final_step": progress.step,
                                   "train_time_s": f"{progress.train_time_s:.1f}"})
    try:
        model_version = register_encoder(cl, cfg, run_id)
    except BaseException:
        cl.set_terminated(run_id, status="FAILED")
        raise
    cl.set_terminated(run_id, status="FINISHED")
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

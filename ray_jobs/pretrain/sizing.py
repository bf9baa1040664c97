"""Checks and sizing of a pre-training run, before any worker starts.

Everything that can fail for a user's reason (unknown method or backbone, data without a committed
manifest, a batch the pool cannot fill, a setting the method cannot take) is checked here, so a
mistake costs seconds and prints one line; and every value derived from the data (the batch from
the pool's size, the method's options sized to the pool, the threads per worker, whether the loop
runs in this process) is decided here, once, and logged.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os

from ctssl_base.errors import UserError
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import DataInfo, inspect_data
from ssl_core.methods import create_method, get_method_class, method_names

log = logging.getLogger(__name__)


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

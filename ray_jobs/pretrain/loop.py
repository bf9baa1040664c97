"""The code every Ray Train worker runs: stream batches, step the method, checkpoint, log (rank 0).

A one-worker run on a single machine runs this same function in the driver process (Ray Train's
local mode, ``payload["in_process"]``): its batches then come from
:class:`~ray_jobs.pretrain.shard_stream.ShardStream` and its checkpoints are written by
:class:`~ray_jobs.pretrain.checkpoint_store.CheckpointStore`, since no controller uploads them.

Restart semantics: on a worker failure Ray Train restarts the worker group and
``ray.train.get_checkpoint()`` returns the latest checkpoint. Its ``progress.json`` says which epoch
and how many of its steps were done; the resumed epoch then trains only the *remaining* steps (on a
freshly shuffled stream), so the global step counter, the LR schedule and the number of images seen
continue instead of starting over. A time-budgeted run also continues its training-loop time from
the checkpoint, so its schedules and its stop continue where they were. Rerunning a finished or
interrupted run with the same ``--experiment`` and ``--storage`` takes the same path.

Budgets (:mod:`ray_jobs.pretrain.budget`): with ``--time-budget`` / ``--max-steps`` the loop stops when
the budget is spent (checked after every step, with rank 0's clock so all ranks stop at the same
step) and feeds the schedules the budget's schedule step; without one it is the real step.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch

from ctssl_base.ray_connect import apply_env
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain.budget import Budget
from ray_jobs.pretrain.checkpoint_store import CheckpointStore
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import decode_batch, to_training_tensor
from ray_jobs.pretrain.epoch_cache import EpochCache
from ray_jobs.pretrain.monitor import Monitor
from ray_jobs.pretrain.optim_setup import build_optimizer, max_grad_norm
from ray_jobs.ray_cluster import arrow_filesystem
from ssl_core.methods import StepContext, create_method

log = logging.getLogger("ctssl.pretrain")


def encoder_config(cfg: PretrainConfig, img_size: int, dataset: str, progress: ckpt_io.Progress,
                   windows: list | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """What a user of the encoder needs besides the weights (``timm.create_model`` arguments), and
    the input windows it was trained with (fine-tuning reads the data the same way)."""
    return {
        "windows": windows,
        "batch_size": batch_size,
        "format": "timm-state-dict",
        "backbone": cfg.backbone,
        "in_chans": cfg.in_chans,
        "img_size": img_size,
        "method": cfg.method,
        "dataset": dataset,
        "selection": cfg.selection,
        "steps": progress.step,
        "epochs": progress.epoch,
        "images_seen": progress.images_seen,
    }


def _scalar_metrics(out: dict[str, torch.Tensor]) -> dict[str, float]:
    res = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            res[k] = float(v.detach())
        elif isinstance(v, int | float):
            res[k] = float(v)
    return res


def _stored(cfg: PretrainConfig, path: str | None):  # noqa: ANN202 - ray.train.Checkpoint | None
    """The checkpoint folder ``path`` of ``cfg.storage`` (a path in its filesystem) as a Ray Train
    checkpoint; None for None."""
    if not path:
        return None
    import ray.train

    return ray.train.Checkpoint(path=path, filesystem=arrow_filesystem(cfg.storage)[0])


def _resume(cfg: PretrainConfig, resumed, method, optimizer) -> ckpt_io.Progress | None:  # noqa: ANN001
    """Load ``resumed``; when its state cannot be read (cut short, missing, not plain data), the
    newest older complete checkpoint of the run instead, with one warning line; None: start afresh."""
    try:
        with resumed.as_directory() as d:
            return ckpt_io.load(d, method=method, optimizer=optimizer)
    except ckpt_io.UnreadableCheckpoint as e:
        log.warning("checkpoint %s cannot be resumed from: %s; trying an older one", resumed.path, e)
    for older in CheckpointStore(cfg.storage, cfg.experiment).older(resumed.path):
        try:
            with _stored(cfg, older).as_directory() as d:
                progress = ckpt_io.load(d, method=method, optimizer=optimizer)
            log.warning("resuming from the older checkpoint %s (step %d)", older, progress.step)
            return progress
        except ckpt_io.UnreadableCheckpoint as e:
            log.warning("checkpoint %s cannot be resumed from either: %s", older, e)
    log.warning("no readable checkpoint left in %s: training starts afresh", cfg.experiment)
    return None


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from ssl_core.backbones import export_encoder_state_dict

    apply_env(payload.get("env"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = os.environ.get("CTSSL_TORCH_THREADS") or payload.get("torch_threads")  # env: an override
    if threads:
        torch.set_num_threads(int(threads))
    log.info("training on %d thread(s)", torch.get_num_threads())
    cfg = PretrainConfig.from_dict(payload["config"])
    img_size: int = payload["img_size"]
    steps_per_epoch: int = payload["steps_per_epoch"]
    epoch_limit = cfg.epoch_limit  # None: a budget ends the run
    budget = Budget.plan(steps_per_epoch, epoch_limit, cfg.max_steps, cfg.time_budget_s)
    total_steps = budget.schedule_steps  # without a budget: steps_per_epoch x epochs, as always
    total_epochs = epoch_limit or 0
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    in_process = bool(payload.get("in_process"))
    # in this process the run's own settings pick the device (Ray Train's local mode would take any GPU)
    device = (torch.device("cuda" if cfg.use_gpu else "cpu") if in_process else ray.train.torch.get_device())
    on_cuda = device.type == "cuda"

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    method = create_method(cfg.method, backbone=cfg.backbone, in_chans=cfg.in_chans, img_size=img_size,
                           **payload.get("method_options", {}))
    method.to(device)
    if on_cuda:
        method.to(memory_format=torch.channels_last)

    optimizer, scheduler = build_optimizer(method, cfg, total_steps, steps_per_epoch, budget)
    clip = max_grad_norm(method)
    progress = ckpt_io.Progress(steps_per_epoch=steps_per_epoch, total_steps=budget.step_cap or 0)
    store = CheckpointStore(cfg.storage, cfg.experiment) if in_process and rank == 0 else None
    resumed = ray.train.get_checkpoint() or _stored(cfg, payload.get("resume_from"))
    if resumed is not None:
        got = _resume(cfg, resumed, method, optimizer)
        resumed = None if got is None else resumed
        progress = got or progress
    if resumed is not None:
        progress.restarts += 1
        if progress.steps_per_epoch != steps_per_epoch:
            raise RuntimeError(f"checkpoint was made with {progress.steps_per_epoch} steps per epoch, this run "
                               f"has {steps_per_epoch}: batch size, workers or data changed; use a new "
                               "--experiment name")
        log.info("rank %d resumed from step %d (epoch %d, %d/%d steps into it)", rank, progress.step,
                 progress.epoch, progress.step_in_epoch, steps_per_epoch)
    torch.manual_seed(cfg.seed + 1000 * rank + progress.step)  # different augmentations per rank and restart

    model = ray.train.torch.prepare_model(
        method, move_to_device=device,  # its forward is training_step, so DDP's gradient hooks see every step
        # SwAV freezes its prototypes for the first iterations and target networks get no gradient:
        # parameters without a gradient in a step must not stall DDP's reducer
        parallel_strategy_kwargs={"find_unused_parameters": True},
    )

    mlog = None
    if rank == 0:
        from ray_jobs import tracking

        cl = tracking.client(payload["tracking_uri"])
        mlog = tracking.MetricLogger(cl, payload["mlflow_run_id"], flush_every=cfg.log_every)
        # what the run trained on, so a study that asked for GPUs can be checked in the MLflow UI
        tracking.set_tags(cl, payload["mlflow_run_id"], {
            "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
            "precision": "bf16-autocast" if on_cuda else "fp32",
            "memory_format": "channels_last" if on_cuda else "contiguous", "workers": world})
        if resumed is not None:
            mlog.log({"resumed_from_step": progress.step, "restarts": progress.restarts}, progress.step)
            mlog.flush()
    # the online probe (--monitor-data), rank 0 only; its time is kept out of the loop clock below

    probe = None if mlog is None else Monitor.create(payload, cfg, method, img_size=img_size, device=device,
                                                     mlog=mlog, cl=cl, run_id=payload["mlflow_run_id"])
    if probe is not None and progress.step == 0:
        probe.probe(0)  # the random initialisation: what a learning run's curve starts from

    def save_checkpoint(final: bool, metrics: dict[str, float]) -> None:
        report = {"step": progress.step, "epoch": progress.epoch, **metrics}
        if mlog is not None:
            mlog.flush()
        if rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_io.save(tmp, method=method, optimizer=optimizer, progress=progress)
            if final:
                ckpt_io.save_encoder(tmp, export_encoder_state_dict(method.encoder()),
                                     encoder_config(cfg, img_size, payload.get("dataset", ""), progress,
                                                    payload.get("method_options", {}).get("windows"),
                                                    per_bs * world))
            # in this process nothing uploads a reported folder: it is stored here, then reported
            ckpt = (ray.train.Checkpoint.from_directory(tmp) if store is None else _stored(cfg, store.save(tmp)))
            ray.train.report(report, checkpoint=ckpt)
        log.info("checkpoint at step %d%s", progress.step, " (final)" if final else "")

    # budget-curve checkpoints still to write (a resumed run skips the ones already stored)
    fractions = list(cfg.keep_at_fractions)
    if fractions and rank == 0:
        have = CheckpointStore(cfg.storage, cfg.experiment).milestones()
        fractions = [f for f in fractions if f not in have]

    def save_milestones(reached: float) -> None:
        """Keep a checkpoint with the encoder for every fraction of the budget now reached."""
        due = [f for f in fractions if f <= reached + 1e-9]
        if rank != 0 or not due:
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_io.save(tmp, method=method, optimizer=optimizer, progress=progress)
            ckpt_io.save_encoder(tmp, export_encoder_state_dict(method.encoder()),
                                 encoder_config(cfg, img_size, payload.get("dataset", ""), progress,
                                                payload.get("method_options", {}).get("windows"),
                                                per_bs * world))
            ms = CheckpointStore(cfg.storage, cfg.experiment)
            for f in due:
                ms.save_milestone(tmp, f)
                fractions.remove(f)
                log.info("budget-curve checkpoint %g at step %d (%.1f s of training)", f, progress.step,
                         progress.train_time_s)

    shard = ray.train.get_dataset_shard("train")
    per_bs = cfg.per_worker_batch
    cache = EpochCache(cfg.cache_mb << 20, per_bs, seed=cfg.seed + 7919 * rank)
    last = {"loss": float("nan")}
    steps_this_run = 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)
    # the training-loop clock a time budget counts: from here (the first step's batch request) on,
    # continuing the time of earlier attempts recorded in the checkpoint
    t_run = time.perf_counter()
    time_before = progress.train_time_s
    probed_before = probe.spent_s if probe is not None else 0.0

    def loop_time() -> float:
        probed = probe.spent_s - probed_before if probe is not None else 0.0
        return time_before + time.perf_counter() - t_run - probed

    def agreed_loop_time() -> float:
        """Rank 0's loop time on every rank: ranks' clocks differ, and a rank that stops one step
        earlier than the others would leave them waiting in DDP's all-reduce forever."""
        t = loop_time()
        if budget.timed and world > 1:
            buf = torch.tensor([t], dtype=torch.float64, device=device)
            torch.distributed.broadcast(buf, src=0)
            t = float(buf.item())
        return t

    elapsed = agreed_loop_time() if cfg.budgeted else 0.0
    last_line = (0, t_run)  # (steps, time) at the last progress line
    stop = cfg.budgeted and budget.done(elapsed, progress.step)  # a finished budget: straight to the end
    while not stop and (epoch_limit is None or progress.epoch < epoch_limit):
        model.train()
        t_epoch = time.perf_counter()
        t_step = time.perf_counter()
        epoch_done = False
        def stream():
            return (decode_batch(b) for b in shard.iter_batches(
                batch_size=per_bs, batch_format="numpy", drop_last=True,
                local_shuffle_buffer_size=cfg.shuffle_buffer or None, prefetch_batches=2))

        for hu in cache.epoch(progress.epoch, stream, full_epoch=progress.step_in_epoch == 0, steps=steps_per_epoch):
            # where the schedules are: the real step, or with a budget its share of the run on a fixed scale
            sched_step = budget.schedule_step(elapsed, progress.step) if cfg.budgeted else progress.step
            images = to_training_tensor(hu, img_size, device)
            with autocast:
                out = model(images, StepContext(step=sched_step, total_steps=total_steps, epoch=progress.epoch,
                                                total_epochs=total_epochs))
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            sched_values = scheduler.step(sched_step)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(method.parameters(), clip)
            optimizer.step()
            method.after_optimizer_step(StepContext(step=sched_step, total_steps=total_steps,
                                                    epoch=progress.epoch, total_epochs=total_epochs))
            now = time.perf_counter()
            dt, t_step = now - t_step, now
            progress.step += 1
            progress.step_in_epoch += 1
            progress.images_seen += per_bs * world
            steps_this_run += 1
            last = _scalar_metrics(out)
            if cfg.budgeted:
                elapsed = agreed_loop_time()
                stop = budget.done(elapsed, progress.step)
            if mlog is not None:
                extra = {"budget_progress": min(budget.fraction(elapsed, progress.step), 1.0)} if cfg.budgeted else {}
                mlog.log({**last, **sched_values, **extra, "images_per_s": per_bs * world / dt,
                          "epoch": progress.epoch}, progress.step)
                if progress.step % cfg.log_every == 0 or progress.step == total_steps or stop:
                    rate = steps_this_run / (now - t_run)
                    if cfg.budgeted:
                        # the rate since the last line: the first step's data-pipeline start-up would
                        # otherwise make the rate (and a step budget's ETA) look far worse than it is
                        rate = (steps_this_run - last_line[0]) / max(now - last_line[1], 1e-9)
                        last_line = (steps_this_run, now)
                        log.info("step %d epoch %d loss %.4f %.1f img/s %.2f steps/s; %s %.0f %% spent (%.0f s of "
                                 "training) ETA %.0fs", progress.step, progress.epoch, last.get("loss", float("nan")),
                                 per_bs * world / dt, rate, budget.describe(),
                                 100 * min(budget.fraction(elapsed, progress.step), 1.0), elapsed,
                                 budget.eta_s(elapsed, progress.step, rate))
                    else:
                        eta = (total_steps - progress.step) / max(rate, 1e-9)
                        log.info("step %d/%d epoch %d loss %.4f %.1f img/s ETA %.0fs", progress.step, total_steps,
                                 progress.epoch, last.get("loss", float("nan")), per_bs * world / dt, eta)
            if probe is not None and probe.maybe(progress.step):
                t_step = time.perf_counter()  # the next step's images/s without the probe's time
            if progress.step_in_epoch >= steps_per_epoch:
                progress.epoch += 1
                progress.step_in_epoch = 0
                epoch_done = True
            more = not stop if cfg.budgeted else progress.step < total_steps  # the final one is saved below
            if fractions and more:
                reached = budget.fraction(elapsed if cfg.budgeted else loop_time(), progress.step)
                if reached >= fractions[0] - 1e-9:
                    progress.train_time_s = loop_time()
                    save_milestones(reached)
            if progress.step % cfg.checkpoint_every == 0 and more:
                progress.train_time_s = loop_time()
                save_checkpoint(False, last)
            if epoch_done or stop:
                break
        if not epoch_done and not stop:
            # the stream ended before steps_per_epoch (cannot happen with an equal split; never loop forever)
            log.warning("epoch %d ended after %d of %d steps", progress.epoch, progress.step_in_epoch,
                        steps_per_epoch)
            progress.epoch += 1
            progress.step_in_epoch = 0
        if mlog is not None:
            mlog.log({"epoch_time_s": time.perf_counter() - t_epoch}, progress.step)
    progress.train_time_s = elapsed if cfg.budgeted else loop_time()
    if probe is not None:
        probe.finish(progress.step)  # the curve's end point, outside the training time
    if cfg.budgeted and rank == 0:
        log.info("%s: stopped after %d steps, %.1f s of training", budget.describe(), progress.step,
                 progress.train_time_s)
    progress.finished = True
    if fractions:
        save_milestones(1.0)  # the end of the budget (or the epochs ending it first)
    save_checkpoint(True, last)
    if mlog is not None:
        mlog.flush()

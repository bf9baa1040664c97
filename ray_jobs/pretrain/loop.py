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
    """Ray Train's entry point on every worker (and in this process for a one-worker local run)."""
    _Worker.start(payload).run()


class _Clock:
    """The training-loop clock a time budget counts: from the first step's batch request on,
    continuing the time of earlier attempts recorded in the checkpoint, without the probe's time."""

    def __init__(self, before_s: float, probe: Monitor | None, timed: bool, world: int, device: torch.device) -> None:
        self.t0 = time.perf_counter()
        self.before_s, self.probe, self.timed, self.world, self.device = before_s, probe, timed, world, device
        self.probed_before = probe.spent_s if probe is not None else 0.0

    def loop_time(self) -> float:
        probed = self.probe.spent_s - self.probed_before if self.probe is not None else 0.0
        return self.before_s + time.perf_counter() - self.t0 - probed

    def agreed(self) -> float:
        """Rank 0's loop time on every rank: ranks' clocks differ, and a rank that stops one step
        earlier than the others would leave them waiting in DDP's all-reduce forever."""
        t = self.loop_time()
        if self.timed and self.world > 1:
            buf = torch.tensor([t], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(buf, src=0)
            t = float(buf.item())
        return t


class _Worker:
    """One worker's run, in the order it happens: :meth:`start` (threads, the method and its
    optimiser, the resume, DDP, tracking and the probe on rank 0), then :meth:`run` (epochs of
    :meth:`step`, progress lines, checkpoints and budget-curve milestones, the final checkpoint)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, payload: dict[str, Any]) -> _Worker:
        import ray.train
        import ray.train.torch

        apply_env(payload.get("env"))
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        threads = os.environ.get("CTSSL_TORCH_THREADS") or payload.get("torch_threads")  # env: an override
        if threads:
            torch.set_num_threads(int(threads))
        log.info("training on %d thread(s)", torch.get_num_threads())
        cfg = PretrainConfig.from_dict(payload["config"])
        spe: int = payload["steps_per_epoch"]
        budget = Budget.plan(spe, cfg.epoch_limit, cfg.max_steps, cfg.time_budget_s)
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        in_process = bool(payload.get("in_process"))
        # in this process the run's own settings pick the device (Ray Train's local mode would take any GPU)
        device = (torch.device("cuda" if cfg.use_gpu else "cpu") if in_process else ray.train.torch.get_device())
        w = cls(payload=payload, cfg=cfg, img_size=payload["img_size"], steps_per_epoch=spe,
                epoch_limit=cfg.epoch_limit,  # None: a budget ends the run
                budget=budget, total_steps=budget.schedule_steps,  # without a budget: steps/epoch x epochs
                total_epochs=cfg.epoch_limit or 0, rank=rank, world=world, device=device,
                on_cuda=device.type == "cuda", per_bs=cfg.per_worker_batch,
                store=CheckpointStore(cfg.storage, cfg.experiment) if in_process and rank == 0 else None)
        w._build_method()
        resumed = w._resume_progress(ray.train.get_checkpoint() or _stored(cfg, payload.get("resume_from")))
        torch.manual_seed(cfg.seed + 1000 * rank + w.progress.step)  # different augmentations per rank and restart
        w.model = ray.train.torch.prepare_model(
            w.method, move_to_device=device,  # its forward is training_step, so DDP's gradient hooks see every step
            # SwAV freezes its prototypes for the first iterations and target networks get no gradient:
            # parameters without a gradient in a step must not stall DDP's reducer
            parallel_strategy_kwargs={"find_unused_parameters": True},
        )
        w._open_tracking(resumed)
        w.fractions = w._milestones_left()
        return w

    def _build_method(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.method = create_method(cfg.method, backbone=cfg.backbone, in_chans=cfg.in_chans, img_size=self.img_size,
                                    **self.payload.get("method_options", {}))
        self.method.to(self.device)
        if self.on_cuda:
            self.method.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = build_optimizer(self.method, cfg, self.total_steps, self.steps_per_epoch,
                                                         self.budget)
        self.clip = max_grad_norm(self.method)

    def _resume_progress(self, resumed: Any) -> Any:  # noqa: ANN401 - ray.train.Checkpoint | None
        """Load ``resumed`` (Ray Train's checkpoint, or the store's); returns it, or None when the run
        starts afresh."""
        cfg, spe = self.cfg, self.steps_per_epoch
        self.progress = ckpt_io.Progress(steps_per_epoch=spe, total_steps=self.budget.step_cap or 0)
        if resumed is not None:
            got = _resume(cfg, resumed, self.method, self.optimizer)
            resumed = None if got is None else resumed
            self.progress = got or self.progress
        if resumed is not None:
            self.progress.restarts += 1
            if self.progress.steps_per_epoch != spe:
                raise RuntimeError(f"checkpoint was made with {self.progress.steps_per_epoch} steps per epoch, this "
                                   f"run has {spe}: batch size, workers or data changed; use a new --experiment name")
            log.info("rank %d resumed from step %d (epoch %d, %d/%d steps into it)", self.rank, self.progress.step,
                     self.progress.epoch, self.progress.step_in_epoch, spe)
        return resumed

    def _open_tracking(self, resumed: Any) -> None:  # noqa: ANN401
        """Rank 0 logs metrics to the run's MLflow run and runs the online probe (--monitor-data)."""
        self.mlog, self.probe = None, None
        if self.rank != 0:
            return
        from ray_jobs import tracking

        payload, run_id = self.payload, self.payload["mlflow_run_id"]
        cl = tracking.client(payload["tracking_uri"])
        self.mlog = tracking.MetricLogger(cl, run_id, flush_every=self.cfg.log_every)
        # what the run trained on, so a study that asked for GPUs can be checked in the MLflow UI
        tracking.set_tags(cl, run_id, {
            "device": torch.cuda.get_device_name(self.device) if self.on_cuda else "cpu",
            "precision": "bf16-autocast" if self.on_cuda else "fp32",
            "memory_format": "channels_last" if self.on_cuda else "contiguous", "workers": self.world})
        if resumed is not None:
            self.mlog.log({"resumed_from_step": self.progress.step, "restarts": self.progress.restarts},
                          self.progress.step)
            self.mlog.flush()
        # the online probe; its time is kept out of the loop clock
        self.probe = Monitor.create(payload, self.cfg, self.method, img_size=self.img_size, device=self.device,
                                    mlog=self.mlog, cl=cl, run_id=run_id)
        if self.probe is not None and self.progress.step == 0:
            self.probe.probe(0)  # the random initialisation: what a learning run's curve starts from

    def _milestones_left(self) -> list[float]:
        """Budget-curve checkpoints still to write (a resumed run skips the ones already stored)."""
        fractions = list(self.cfg.keep_at_fractions)
        if fractions and self.rank == 0:
            have = CheckpointStore(self.cfg.storage, self.cfg.experiment).milestones()
            fractions = [f for f in fractions if f not in have]
        return fractions

    # ------------------------------------------------------------------ checkpoints
    def _write(self, folder: str, with_encoder: bool) -> None:
        """The training state, and with ``with_encoder`` the bare encoder and its config, into ``folder``."""
        from ssl_core.backbones import export_encoder_state_dict

        ckpt_io.save(folder, method=self.method, optimizer=self.optimizer, progress=self.progress)
        if with_encoder:
            ckpt_io.save_encoder(folder, export_encoder_state_dict(self.method.encoder()),
                                 encoder_config(self.cfg, self.img_size, self.payload.get("dataset", ""), self.progress,
                                                self.payload.get("method_options", {}).get("windows"),
                                                self.per_bs * self.world))

    def save_checkpoint(self, final: bool, metrics: dict[str, float]) -> None:
        import ray.train

        report = {"step": self.progress.step, "epoch": self.progress.epoch, **metrics}
        if self.mlog is not None:
            self.mlog.flush()
        if self.rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self._write(tmp, with_encoder=final)
            # in this process nothing uploads a reported folder: it is stored here, then reported
            ckpt = (ray.train.Checkpoint.from_directory(tmp) if self.store is None
                    else _stored(self.cfg, self.store.save(tmp)))
            ray.train.report(report, checkpoint=ckpt)
        log.info("checkpoint at step %d%s", self.progress.step, " (final)" if final else "")

    def save_milestones(self, reached: float) -> None:
        """Keep a checkpoint with the encoder for every fraction of the budget now reached."""
        due = [f for f in self.fractions if f <= reached + 1e-9]
        if self.rank != 0 or not due:
            return
        with tempfile.TemporaryDirectory() as tmp:
            self._write(tmp, with_encoder=True)
            ms = CheckpointStore(self.cfg.storage, self.cfg.experiment)
            for f in due:
                ms.save_milestone(tmp, f)
                self.fractions.remove(f)
                log.info("budget-curve checkpoint %g at step %d (%.1f s of training)", f, self.progress.step,
                         self.progress.train_time_s)

    # ------------------------------------------------------------------ training
    def step(self, hu: Any, sched_step: int) -> dict[str, Any]:  # noqa: ANN401 - a decoded HU batch
        """One optimiser step on a batch; returns the method's output and the schedules' values."""
        ctx = StepContext(step=sched_step, total_steps=self.total_steps, epoch=self.progress.epoch,
                          total_epochs=self.total_epochs)
        images = to_training_tensor(hu, self.img_size, self.device)
        with self.autocast:
            out = self.model(images, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        sched_values = self.scheduler.step(sched_step)
        out["loss"].backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.clip)
        self.optimizer.step()
        self.method.after_optimizer_step(ctx)
        return {**_scalar_metrics(out), "_sched": sched_values}

    def _progress_line(self, last: dict[str, float], dt: float, elapsed: float, now: float) -> None:
        """The log line every --log-every steps: loss, images/s and the ETA (of the budget when there is one)."""
        cfg, p, budget = self.cfg, self.progress, self.budget
        rate = self.steps_this_run / (now - self.clock.t0)
        if cfg.budgeted:
            # the rate since the last line: the first step's data-pipeline start-up would otherwise
            # make the rate (and a step budget's ETA) look far worse than it is
            rate = (self.steps_this_run - self.last_line[0]) / max(now - self.last_line[1], 1e-9)
            self.last_line = (self.steps_this_run, now)
            log.info("step %d epoch %d loss %.4f %.1f img/s %.2f steps/s; %s %.0f %% spent (%.0f s of "
                     "training) ETA %.0fs", p.step, p.epoch, last.get("loss", float("nan")),
                     self.per_bs * self.world / dt, rate, budget.describe(),
                     100 * min(budget.fraction(elapsed, p.step), 1.0), elapsed, budget.eta_s(elapsed, p.step, rate))
        else:
            eta = (self.total_steps - p.step) / max(rate, 1e-9)
            log.info("step %d/%d epoch %d loss %.4f %.1f img/s ETA %.0fs", p.step, self.total_steps, p.epoch,
                     last.get("loss", float("nan")), self.per_bs * self.world / dt, eta)

    def run(self) -> None:
        import ray.train

        cfg, p, budget = self.cfg, self.progress, self.budget
        shard = ray.train.get_dataset_shard("train")
        cache = EpochCache(cfg.cache_mb << 20, self.per_bs, seed=cfg.seed + 7919 * self.rank)
        last = {"loss": float("nan")}
        self.steps_this_run = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.on_cuda
                         else torch.autocast("cpu", enabled=False))
        self.clock = _Clock(p.train_time_s, self.probe, budget.timed, self.world, self.device)
        elapsed = self.clock.agreed() if cfg.budgeted else 0.0
        self.last_line = (0, self.clock.t0)  # (steps, time) at the last progress line
        stop = cfg.budgeted and budget.done(elapsed, p.step)  # a finished budget: straight to the end

        def stream():  # noqa: ANN202 - a generator of decoded batches
            return (decode_batch(b) for b in shard.iter_batches(
                batch_size=self.per_bs, batch_format="numpy", drop_last=True,
                local_shuffle_buffer_size=cfg.shuffle_buffer or None, prefetch_batches=2))

        while not stop and (self.epoch_limit is None or p.epoch < self.epoch_limit):
            self.model.train()
            t_epoch = t_step = time.perf_counter()
            epoch_done = False
            for hu in cache.epoch(p.epoch, stream, full_epoch=p.step_in_epoch == 0, steps=self.steps_per_epoch):
                # where the schedules are: the real step, or with a budget its share of the run on a fixed scale
                sched_step = budget.schedule_step(elapsed, p.step) if cfg.budgeted else p.step
                last = self.step(hu, sched_step)
                sched_values = last.pop("_sched")
                now = time.perf_counter()
                dt, t_step = now - t_step, now
                p.step += 1
                p.step_in_epoch += 1
                p.images_seen += self.per_bs * self.world
                self.steps_this_run += 1
                if cfg.budgeted:
                    elapsed = self.clock.agreed()
                    stop = budget.done(elapsed, p.step)
                if self.mlog is not None:
                    extra = {"budget_progress": min(budget.fraction(elapsed, p.step), 1.0)} if cfg.budgeted else {}
                    self.mlog.log({**last, **sched_values, **extra, "images_per_s": self.per_bs * self.world / dt,
                                   "epoch": p.epoch}, p.step)
                    if p.step % cfg.log_every == 0 or p.step == self.total_steps or stop:
                        self._progress_line(last, dt, elapsed, now)
                if self.probe is not None and self.probe.maybe(p.step):
                    t_step = time.perf_counter()  # the next step's images/s without the probe's time
                if p.step_in_epoch >= self.steps_per_epoch:
                    p.epoch += 1
                    p.step_in_epoch = 0
                    epoch_done = True
                more = not stop if cfg.budgeted else p.step < self.total_steps  # the final one is saved below
                if self.fractions and more:
                    reached = budget.fraction(elapsed if cfg.budgeted else self.clock.loop_time(), p.step)
                    if reached >= self.fractions[0] - 1e-9:
                        p.train_time_s = self.clock.loop_time()
                        self.save_milestones(reached)
                if p.step % cfg.checkpoint_every == 0 and more:
                    p.train_time_s = self.clock.loop_time()
                    self.save_checkpoint(False, last)
                if epoch_done or stop:
                    break
            if not epoch_done and not stop:
                # the stream ended before steps_per_epoch (cannot happen with an equal split; never loop forever)
                log.warning("epoch %d ended after %d of %d steps", p.epoch, p.step_in_epoch, self.steps_per_epoch)
                p.epoch += 1
                p.step_in_epoch = 0
            if self.mlog is not None:
                self.mlog.log({"epoch_time_s": time.perf_counter() - t_epoch}, p.step)
        self._finish(elapsed, last)

    def _finish(self, elapsed: float, last: dict[str, float]) -> None:
        """The probe's end point, the last budget-curve checkpoint and the final checkpoint with the encoder."""
        p = self.progress
        p.train_time_s = elapsed if self.cfg.budgeted else self.clock.loop_time()
        if self.probe is not None:
            self.probe.finish(p.step)  # the curve's end point, outside the training time
        if self.cfg.budgeted and self.rank == 0:
            log.info("%s: stopped after %d steps, %.1f s of training", self.budget.describe(), p.step, p.train_time_s)
        p.finished = True
        if self.fractions:
            self.save_milestones(1.0)  # the end of the budget (or the epochs ending it first)
        self.save_checkpoint(True, last)
        if self.mlog is not None:
            self.mlog.flush()

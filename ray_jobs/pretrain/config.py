"""The settings of one pre-training run, as a dataclass a CLI, a Helm chart or a demo driver can fill.

Keeping them in one plain, JSON-able object is what lets the same run be started from argv, from
``ctssl demo`` in-process, or resumed later: the config is logged to MLflow as params and shipped to
every Ray Train worker unchanged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ctssl_base.errors import UserError
from ray_jobs.names import check_experiment_name
from ray_jobs.tracking import check_tags

RUNNERS = ("auto", "ray", "in-process")
DEFAULT_EPOCHS = 100  # without a budget, as before budgets existed
#: steps between probes of --monitor-data when neither a step nor a time period is given
DEFAULT_MONITOR_EVERY = 100


@dataclass
class PretrainConfig:
    method: str
    data: str
    storage: str
    experiment: str
    backbone: str = "resnet50"
    selection: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray placement groups)
    #: where the loop runs: "ray" (Ray Train workers), "in-process" (this process, one worker) or
    #: "auto" (in-process for one worker and no named cluster; see sizing.runs_in_process)
    runner: str = "auto"
    epochs: int | None = None  # None: 100 without a budget, unlimited with one (an upper bound then)
    batch_size: int | None = None  # global batch (all workers together); None: sized from the pool
    img_size: int | None = None  # None: the prep resolution of the shards
    in_chans: int = 1
    checkpoint_every: int = 500  # optimiser steps between checkpoints
    max_failures: int = 3
    address: str | None = None
    tracking_uri: str | None = None
    lr: float | None = None  # None: the method's base lr scaled by batch size
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    steps_per_epoch: int | None = None  # cap (None: one pass over the data per epoch)
    shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer
    cache_mb: int = 512  # keep a worker's epoch in memory when it fits (0: always stream)
    seed: int = 0
    log_every: int = 10  # steps between MLflow metric flushes
    time_budget_s: float | None = None  # seconds of training loop; schedules follow the clock
    max_steps: int | None = None  # optimiser steps; schedules end at this step
    method_options: dict[str, Any] = field(default_factory=dict)
    #: MLflow experiment of the run; None: ``experiment`` (which stays the Ray Train run name and the
    #: checkpoint folder). A study names its own, so every stage of it lands in one experiment
    mlflow_experiment: str | None = None
    #: extra tags on the MLflow run (e.g. ``ctssl.stage``, ``ctssl.study``, ``encoder``, ``reduction``)
    tags: dict[str, str] = field(default_factory=dict)
    #: register the final encoder in the MLflow Model Registry under this name (None: not registered)
    register_as: str | None = None
    #: the online probe (ray_jobs.pretrain.monitor): a labelled prep output whose fold-0 training and
    #: validation slices are embedded every ``monitor_every`` steps or ``monitor_every_s`` seconds
    #: (None: neither given, every DEFAULT_MONITOR_EVERY steps); folds as the fine-tuning study makes them
    monitor_data: str | None = None
    monitor_every: int | None = None
    monitor_every_s: float | None = None
    monitor_k: int = 20
    monitor_temperature: float = 0.07
    monitor_slices: int = 256  # training + validation slices at most (a stratified, seeded subsample)
    monitor_folds: int = 5
    monitor_val_fraction: float = 0.2
    monitor_fold_seed: int = 0
    #: fractions of the run's budget (steps, or training time with a time budget) at which a checkpoint
    #: with the encoder is kept outside the rotation (CheckpointStore.MILESTONES): the budget curve
    keep_at_fractions: list[float] = field(default_factory=list)

    def validate(self) -> None:
        """Cheap checks on the values alone (no I/O), each naming the flag that is wrong.

        Every number a worker uses is checked here, before Ray starts: a value that only fails inside
        the training loop (``--log-every 0`` divides by zero at the first step) would otherwise fail in
        every worker and be retried ``--max-failures`` times.
        """
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.runner not in RUNNERS:
            raise UserError(f"--runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size is not None:
            if self.batch_size < self.workers:
                raise UserError(f"--batch-size {self.batch_size} is smaller than --workers {self.workers}: "
                                "every worker needs at least one image per step")
            if self.batch_size % self.workers:
                raise UserError(f"--batch-size {self.batch_size} is the global batch and must be divisible by "
                                f"--workers {self.workers}")
        if self.in_chans not in (1, 3):
            raise UserError(f"--in-chans must be 1 (one HU window) or 3 (three windows), got {self.in_chans}")
        fr = list(self.keep_at_fractions)
        if any(not (isinstance(f, int | float) and 0 < f <= 1) for f in fr) or fr != sorted(set(fr)):
            raise UserError(f"--keep-at-fractions must be sorted, unique fractions in (0, 1], got {fr}")
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.max_failures < -1:
            raise UserError(f"--max-failures must be >= -1 (-1 = retry forever), got {self.max_failures}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise UserError(f"--placement-strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                            f"got {self.placement_strategy!r}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise UserError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise UserError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.img_size is not None and self.img_size < 16:
            raise UserError(f"--img-size must be >= 16, got {self.img_size}")
        check_experiment_name(self.experiment)  # STORAGE/EXPERIMENT holds the checkpoints it prunes
        if self.mlflow_experiment is not None and not self.mlflow_experiment.strip():
            raise UserError("mlflow_experiment must be a non-empty name (or None: the --experiment name)")
        if self.register_as is not None and (not self.register_as.strip() or any(c in self.register_as for c in "/:")):
            raise UserError(f"register_as must be a non-empty model name without '/' or ':', got {self.register_as!r}")
        check_tags(self.tags, "pre-training tags")
        self._validate_monitor()
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UserError(f"--steps-per-epoch must be >= 1, got {self.steps_per_epoch}")
        if self.log_every < 1:
            raise UserError(f"--log-every must be >= 1, got {self.log_every}")
        if self.shuffle_buffer < 0:
            raise UserError(f"--shuffle-buffer must be >= 0 (0 = no local shuffle), got {self.shuffle_buffer}")
        if self.cache_mb < 0:
            raise UserError(f"--cache-mb must be >= 0 (0 = always stream), got {self.cache_mb}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs is not None and not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise UserError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.time_budget_s is not None and not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise UserError(f"--time-budget must be > 0 seconds, got {self.time_budget_s}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {self.max_steps}")
        if (self.time_budget_s is not None and self.warmup_epochs and self.epochs is None
                and self.max_steps is None):
            raise UserError(f"--warmup-epochs {self.warmup_epochs:g} cannot be placed in a --time-budget run of "
                            "unknown length; give --epochs or --max-steps as well, or leave it out (warm-up is "
                            "then at most 10 % of the budget)")

    def _validate_monitor(self) -> None:
        if self.monitor_every is not None and self.monitor_every_s is not None:
            raise UserError("monitor_every (steps) and monitor_every_s (seconds) exclude each other; give one")
        if self.monitor_every is not None and self.monitor_every < 1:
            raise UserError(f"--monitor-every must be >= 1 step, got {self.monitor_every}")
        if self.monitor_every_s is not None and not (math.isfinite(self.monitor_every_s) and self.monitor_every_s > 0):
            raise UserError(f"--monitor-every must be > 0 seconds, got {self.monitor_every_s}")
        if self.monitor_k < 1:
            raise UserError(f"--monitor-k must be >= 1, got {self.monitor_k}")
        if not (math.isfinite(self.monitor_temperature) and self.monitor_temperature > 0):
            raise UserError(f"monitor_temperature must be > 0, got {self.monitor_temperature}")
        if self.monitor_slices < 4:
            raise UserError(f"--monitor-slices must be >= 4, got {self.monitor_slices}")
        if self.monitor_folds < 2:
            raise UserError(f"monitor_folds must be >= 2, got {self.monitor_folds}")
        if not 0.0 < self.monitor_val_fraction < 0.5:
            raise UserError(f"monitor_val_fraction must be in (0, 0.5), got {self.monitor_val_fraction}")

    @property
    def monitor_every_steps(self) -> int | None:
        """Steps between probes; None when the period is in seconds."""
        if self.monitor_every_s is not None:
            return None
        return self.monitor_every or DEFAULT_MONITOR_EVERY

    @property
    def mlflow_experiment_name(self) -> str:
        """The MLflow experiment the run is logged to."""
        return self.mlflow_experiment or self.experiment

    @property
    def budgeted(self) -> bool:
        """A time or step budget ends the run, not a fixed number of epochs."""
        return self.time_budget_s is not None or self.max_steps is not None

    @property
    def epoch_limit(self) -> int | None:
        """Epochs to train at most: ``--epochs``, else 100 without a budget and unlimited (None) with one."""
        if self.epochs is not None:
            return self.epochs
        return None if self.budgeted else DEFAULT_EPOCHS

    @property
    def per_worker_batch(self) -> int:
        if self.batch_size is None:
            raise RuntimeError("the batch size is sized from the pool first (sizing.resolve)")
        return self.batch_size // self.workers

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown pre-training settings {unknown}")
        return cls(**d)

    def as_params(self) -> dict[str, str]:
        """Flat string params for MLflow (nested options as JSON)."""
        out = {}
        for k, v in self.to_dict().items():
            out[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)
        return out


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h|hr)?\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def parse_duration(text: str, flag: str = "--time-budget") -> float:
    """Seconds from ``90``, ``90s``, ``12m``, ``1.5h`` (a budget reads more naturally in minutes)."""
    m = _DURATION.match(str(text))
    if not m:
        raise UserError(f"{flag} expects a duration like 90s, 12m, 1.5h or plain seconds, got {text!r}")
    seconds = float(m.group(1)) * _UNIT_S[(m.group(2) or "s").lower()]
    if not seconds > 0:
        raise UserError(f"{flag} must be > 0 seconds, got {text!r}")
    return seconds


def parse_monitor_every(text: str) -> tuple[int | None, float | None]:
    """(steps, seconds) from ``--monitor-every``: a plain integer counts optimiser steps, a duration
    (``90s``, ``5m``, ``1h``) training time."""
    t = str(text).strip()
    if t.isdigit():
        return int(t), None
    if not re.search(r"[a-zA-Z]\s*$", t):
        raise UserError(f"--monitor-every expects steps (e.g. 200) or a duration (e.g. 5m, 90s), got {text!r}")
    return None, parse_duration(t, "--monitor-every")


def format_duration(seconds: float) -> str:
    """``12m``, ``90s``, ``1.5h``: how a budget is shown in log lines."""
    if seconds >= 3600 and seconds % 1800 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def parse_method_options(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--method-option expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out

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
from ctssl_base.settings import setting
from ray_jobs.names import check_experiment_name
from ray_jobs.tracking import check_tags
from ssl_core.methods import METHOD_NAMES

RUNNERS = ("auto", "ray", "in-process")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies
DEFAULT_EPOCHS = 100  # without a budget, as before budgets existed
#: steps between probes of --monitor-data when neither a step nor a time period is given
DEFAULT_MONITOR_EVERY = 100


def parse_fractions(text: str) -> list[float]:
    """``0.125,0.25,1`` -> [0.125, 0.25, 1.0] (the CLI's budget curve); ``validate`` checks range and order."""
    try:
        return [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError as e:
        raise UserError(f"--keep-at-fractions: not a comma-separated list of numbers: {text!r}") from e


def _duration(text: str) -> float:
    return parse_duration(text)


@dataclass
class PretrainConfig:
    """The settings of one pre-training run: the one table ``ctssl pretrain``'s flags, a study file's
    ``pretrain`` keys, the schema's defaults there and the help text are made from
    (:mod:`ctssl_base.settings`). A study's ``resources`` section, its per-method overrides and its
    online-probe block are mapped by the study's pre-training stage."""

    method: str = setting(required=True, help=" | ".join(METHOD_NAMES))
    data: str = setting(required=True, metavar="URL", help="prep output folder (local path or s3://)")
    storage: str = setting(required=True, metavar="URL", help="checkpoint folder (local path or s3://)")
    experiment: str = setting(
        required=True, metavar="NAME",
        help="run name: checkpoints under STORAGE/NAME, MLflow experiment NAME; rerun resumes")
    backbone: str = setting("resnet50", key="backbone", metavar="NAME", help="timm model name (default {default})",
                            study_note="For every method unless a method names its own.")
    selection: str | None = setting(None, metavar="URL", help="a selection (reduction output) of {data} to train on")
    workers: int = setting(1, metavar="N", help="Ray Train workers (default {default})")
    gpus_per_worker: float = setting(0.0, metavar="G", help="GPUs per worker (default {default})")
    cpus_per_worker: float = setting(1.0, metavar="C", help="CPUs per worker (default {default})")
    placement_strategy: str = setting(
        "PACK", choices=PLACEMENTS, help="how workers are placed on nodes (default {default})")
    #: where the loop runs: "ray" (Ray Train workers), "in-process" (this process, one worker) or
    #: "auto" (in-process for one worker and no named cluster; see sizing.runs_in_process)
    runner: str = setting(
        "auto", choices=RUNNERS,
        help="where training runs: in this process (one worker, no Ray Train start-up or background processes), "
             "on Ray Train workers, or auto (default: in this process for {workers} 1 without {address} / "
             "$RAY_ADDRESS, else Ray Train)")
    epochs: int | None = setting(
        None, key="epochs", parse=int, metavar="E", schema={"minimum": 1, "maximum": 100000},
        help=f"epochs to train (default {DEFAULT_EPOCHS}); with {{time_budget_s}} or {{max_steps}} an upper "
             "bound (default: none)")
    time_budget_s: float | None = setting(
        None, key="timeBudget", flag="--time-budget", read=_duration, metavar="DURATION",
        study_note="At most 720h.",
        help="train for this long, e.g. 90s, 12m, 1.5h or plain seconds, then write the final checkpoint. Counts "
             "the training loop only, from its first step (Ray and worker start-up are not counted); lr, weight "
             "decay, EMA momentum, warm-up and the other schedules run from start to end over the budget; a "
             "resumed run continues it")
    max_steps: int | None = setting(
        None, key="maxSteps", parse=int, metavar="N", schema={"minimum": 1, "maximum": 100000000},
        help="train for N optimiser steps (schedules end there); with {time_budget_s} whichever comes first")
    #: fractions of the run's budget (steps, or training time with a time budget) at which a checkpoint
    #: with the encoder is kept outside the rotation (CheckpointStore.MILESTONES): the budget curve
    keep_at_fractions: list[float] = setting(
        default_factory=list, key="budgetCurve", read=parse_fractions, metavar="F,F,...",
        study_note="Sorted; the budget stage probes each kept encoder at the smallest labelled size(s) against random "
                   "init (budget_curve.csv and the report's gain-versus-budget plot). Empty: off.",
        help="budget curve: also keep a checkpoint with the encoder at these fractions of the budget (steps, or "
             "training time with {time_budget_s}), e.g. 0.125,0.25,0.5,1, under STORAGE/NAME/milestones, outside "
             "the checkpoint rotation; a resumed run keeps them")
    batch_size: int | None = setting(
        None, key="batch", parse=int, metavar="B", schema={"minimum": 2, "maximum": 65536},
        help="global batch size over all workers (default: sized from the pool: the largest power of two <= "
             "slices/32, within 32..256, a multiple of the number of workers)")
    address: str | None = setting(
        None, metavar="ADDR", help="Ray cluster: ray://host:10001, auto, or local (default: $RAY_ADDRESS, else local)")
    tracking_uri: str | None = setting(
        None, metavar="URI", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite under a local "
                                  "{storage})")
    img_size: int | None = setting(None, parse=int, metavar="S", help="training resolution (default: the shards' size)")
    in_chans: int = setting(1, choices=(1, 3), help="1 = one HU window, 3 = three CT windows as channels")
    checkpoint_every: int = setting(
        500, key="checkpointEvery", metavar="K", schema={"minimum": 1, "maximum": 100000000},
        help="optimiser steps between checkpoints (default {default})")
    max_failures: int = setting(3, metavar="F", help="worker failures to recover from (restart from the last "
                                                     "checkpoint)")
    lr: float | None = setting(None, parse=float, help="peak learning rate (default: the method's, scaled by batch "
                                                       "size)")
    weight_decay: float | None = setting(None, parse=float, help="weight decay (default: the method's)")
    warmup_epochs: float | None = setting(
        None, parse=float, help="linear warm-up epochs (default: the method's; with {time_budget_s} at most 10 %% "
                                "of the budget)")
    steps_per_epoch: int | None = setting(None, parse=int, metavar="N",
                                          help="cap on steps per epoch (default: one pass)")
    shuffle_buffer: int = setting(1024, metavar="ROWS", help="per-worker shuffle buffer")
    cache_mb: int = setting(
        512, metavar="MB", help="keep each worker's epoch in memory when it fits, skipping the data pipeline's "
                                "per-epoch start-up (0 = always stream)")
    seed: int = setting(0, help="seed of the run (default {default})")
    log_every: int = setting(10, metavar="STEPS", help="steps between MLflow flushes")
    #: ``--method-option KEY=VALUE`` (repeatable; the command parses the pairs) or a study method's ``options``
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
    monitor_data: str | None = setting(
        None, metavar="URL",
        help="a labelled prep output: probe the encoder while it trains (k-NN AUC, embedding spread) on the "
             "training and validation slices of one patient-level fold, logged to MLflow as probe.* step metrics")
    #: ``--monitor-every N|DURATION`` fills one of the two (the command splits it)
    monitor_every: int | None = None
    monitor_every_s: float | None = None
    monitor_k: int = setting(20, metavar="K", help="neighbours of the k-NN probe (default {default})")
    monitor_temperature: float = 0.07
    monitor_slices: int = setting(256, metavar="N", help="labelled slices the probe embeds at most (default {default})")
    monitor_folds: int = 5
    monitor_val_fraction: float = 0.2
    monitor_fold_seed: int = 0

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
        if self.placement_strategy not in PLACEMENTS:
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

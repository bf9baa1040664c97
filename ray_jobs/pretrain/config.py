"""The settings of one pre-training run, as a dataclass a CLI, a Helm chart or a demo driver can fill.

Keeping them in one plain, JSON-able object is what lets the same run be started from argv, from
``ctssl demo`` in-process, or resumed later: the config is logged to MLflow as params and shipped to
every Ray Train worker unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ray_jobs.errors import CLIError


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
    epochs: int = 100
    batch_size: int = 256  # global batch (all workers together), as in the papers
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
    method_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Cheap checks on the values alone (no I/O), each naming the flag that is wrong."""
        if self.workers < 1:
            raise CLIError(f"--workers must be >= 1, got {self.workers}")
        if self.epochs < 1:
            raise CLIError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < self.workers:
            raise CLIError(f"--batch-size {self.batch_size} is smaller than --workers {self.workers}: "
                           "every worker needs at least one image per step")
        if self.batch_size % self.workers:
            raise CLIError(f"--batch-size {self.batch_size} is the global batch and must be divisible by "
                           f"--workers {self.workers}")
        if self.in_chans not in (1, 3):
            raise CLIError(f"--in-chans must be 1 (one HU window) or 3 (three windows), got {self.in_chans}")
        if self.checkpoint_every < 1:
            raise CLIError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.max_failures < -1:
            raise CLIError(f"--max-failures must be >= -1 (-1 = retry forever), got {self.max_failures}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise CLIError(f"--placement-strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                           f"got {self.placement_strategy!r}")
        if self.gpus_per_worker < 0:
            raise CLIError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.img_size is not None and self.img_size < 16:
            raise CLIError(f"--img-size must be >= 16, got {self.img_size}")
        if not self.experiment or "/" in self.experiment:
            raise CLIError(f"--experiment must be a non-empty name without '/', got {self.experiment!r}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise CLIError(f"--steps-per-epoch must be >= 1, got {self.steps_per_epoch}")

    @property
    def per_worker_batch(self) -> int:
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
            raise CLIError(f"unknown pre-training settings {unknown}")
        return cls(**d)

    def as_params(self) -> dict[str, str]:
        """Flat string params for MLflow (nested options as JSON)."""
        out = {}
        for k, v in self.to_dict().items():
            out[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)
        return out


def parse_method_options(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"--method-option expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out

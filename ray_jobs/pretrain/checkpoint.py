"""What a pre-training checkpoint holds, and how it is written and read back.

A checkpoint is a folder: ``state.pt`` (method state incl. EMA targets / queues / prototypes,
optimiser, RNG; the lr / weight-decay schedule is a function of the step and the training time, so
it needs no state), ``progress.json`` (step counters and training time, readable without torch)
and, in the final one, ``encoder.pt`` (timm-layout state_dict) + ``encoder_config.json``. The folder
is what Ray Train uploads to ``--storage``; the fine-tuning study reads the encoder files from it
directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
ENCODER_FILE = "encoder.pt"
ENCODER_CONFIG_FILE = "encoder_config.json"


@dataclass
class Progress:
    """Where training is; ``step`` is the global optimiser step (continues across restarts).

    ``train_time_s`` is the training-loop time spent up to this checkpoint (rank 0's clock, summed over
    restarts): a time-budgeted run resumed after a crash continues its budget from here instead of
    starting it over. Time between this checkpoint and a crash is not counted, as its steps are redone.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    images_seen: int = 0
    restarts: int = 0
    finished: bool = False
    train_time_s: float = 0.0


def save(path: str, *, method: torch.nn.Module, optimizer, progress: Progress,
         extra: dict[str, Any] | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    state = {
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "extra": extra or {},
    }
    # non-tensor method state (e.g. a queue pointer kept as a Python int) if the method exposes it
    if hasattr(method, "extra_state_dict"):
        state["method_extra"] = method.extra_state_dict()
    torch.save(state, os.path.join(path, STATE_FILE))
    with open(os.path.join(path, PROGRESS_FILE), "w") as f:
        json.dump(asdict(progress), f, indent=1)


def load_progress(path: str) -> Progress:
    with open(os.path.join(path, PROGRESS_FILE)) as f:
        return Progress(**json.load(f))


def load(path: str, *, method: torch.nn.Module, optimizer) -> Progress:
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    method.load_state_dict(state["method"])
    if "method_extra" in state and hasattr(method, "load_extra_state_dict"):
        method.load_extra_state_dict(state["method_extra"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return load_progress(path)


def save_encoder(path: str, encoder_state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    os.makedirs(path, exist_ok=True)
    torch.save(encoder_state, os.path.join(path, ENCODER_FILE))
    with open(os.path.join(path, ENCODER_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)

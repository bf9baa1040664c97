"""What a pre-training checkpoint holds, and how it is written and read back.

A checkpoint is a folder: ``state.pt`` (method state incl. EMA targets / queues / prototypes,
optimiser, RNG; the lr / weight-decay schedule is a function of the step and the training time, so
it needs no state), ``progress.json`` (step counters and training time, readable without torch)
and, in the final one, ``encoder.pt`` (timm-layout state_dict) + ``encoder_config.json``. The folder
is what Ray Train uploads to ``--storage``; the fine-tuning study reads the encoder files from it
directly.

Every folder ends with ``manifest.json``: the name and size of each file it holds, written after them,
so a folder whose files were only partly uploaded (Ray Train uploads a folder's files in parallel) is
told from a complete one. ``state.pt`` is read with ``torch.load(weights_only=True)``: a checkpoint is
data, and a file planted in the storage can hold no code that runs when a worker resumes from it.
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
MANIFEST_FILE = "manifest.json"


class UnreadableCheckpoint(Exception):
    """``state.pt`` of a checkpoint could not be read back (cut short, missing, or not plain data)."""


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
    write_manifest(path)


def write_manifest(path: str) -> None:
    """List every file of the checkpoint folder ``path`` with its size, in a file written after them."""
    files = {n: os.path.getsize(os.path.join(path, n)) for n in sorted(os.listdir(path))
             if n != MANIFEST_FILE and os.path.isfile(os.path.join(path, n))}
    tmp = os.path.join(path, f".{MANIFEST_FILE}.tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
    os.replace(tmp, os.path.join(path, MANIFEST_FILE))


def load_progress(path: str) -> Progress:
    with open(os.path.join(path, PROGRESS_FILE)) as f:
        return Progress(**json.load(f))


def read_state(path: str) -> dict[str, Any]:
    """The contents of ``state.pt``, as plain data only (tensors, numbers, strings, containers).

    Raises :class:`UnreadableCheckpoint` with one line saying why when the file is missing, cut short,
    or holds anything else (a pickled object whose loading would run code is refused, not run).
    """
    file = os.path.join(path, STATE_FILE)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UnreadableCheckpoint(f"{file}: missing") from e
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnreadableCheckpoint(f"{file}: not a readable checkpoint ({type(e).__name__}: {first[:200]})") from e
    if not isinstance(state, dict) or not {"method", "optimizer", "torch_rng"} <= state.keys():
        raise UnreadableCheckpoint(f"{file}: not a pre-training checkpoint (method/optimizer/torch_rng missing)")
    return state


def load(path: str, *, method: torch.nn.Module, optimizer) -> Progress:
    """Restore ``method`` and ``optimizer`` from the checkpoint folder ``path``; its progress.

    Nothing is changed when ``state.pt`` is unreadable (:class:`UnreadableCheckpoint`), so the caller
    can try an older checkpoint instead.
    """
    state = read_state(path)
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
    write_manifest(path)

"""Refuse, before any worker starts, to resume an experiment with settings its checkpoint cannot take.

Ray Train resumes a run by its name: the same ``--experiment`` under the same ``--storage`` picks up
the latest checkpoint. When the settings changed in between (another backbone, method options, batch
or image size) the checkpoint's tensors no longer fit, and the run would fail inside the workers on a
state_dict mismatch, be retried ``--max-failures`` times and end with a traceback. The first run of an
experiment writes the settings that shape its state next to its checkpoints; a later run compares
and stops with one line naming what differs.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ctssl_base import storage
from ctssl_base.errors import UserError
from ray_jobs.pretrain import orphans
from ray_jobs.pretrain.config import PretrainConfig

log = logging.getLogger(__name__)

SETTINGS_FILE = "ctssl_run_settings.json"


def identity(cfg: PretrainConfig, img_size: int, steps_per_epoch: int,
             method_options: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint's tensors and its schedules depend on (JSON-normalised).

    Operational knobs (cluster address, tracking URI, failure budget, checkpoint cadence, cache size)
    are left out: changing them on a resume is legitimate.
    """
    ident = {
        "method": cfg.method, "backbone": cfg.backbone, "in_chans": cfg.in_chans, "img_size": img_size,
        "data": cfg.data, "selection": cfg.selection, "batch_size": cfg.batch_size, "workers": cfg.workers,
        "epochs": cfg.epoch_limit, "steps_per_epoch": steps_per_epoch, "lr": cfg.lr,
        "weight_decay": cfg.weight_decay, "warmup_epochs": cfg.warmup_epochs, "seed": cfg.seed,
        "method_options": method_options,
        # a budget sets every schedule's length: a resume with another one would bend them mid-run
        "time_budget_s": cfg.time_budget_s, "max_steps": cfg.max_steps,
    }
    return json.loads(json.dumps(ident, sort_keys=True, default=str))


def _has_checkpoint(fs, run_dir: str) -> bool:  # noqa: ANN001 - fsspec filesystem
    try:
        return bool(orphans.checkpoint_dirs(fs.ls(run_dir, detail=True)))
    except FileNotFoundError:
        return False


def _paths(cfg: PretrainConfig):  # noqa: ANN202 - (fs, run folder, settings file)
    fs, root = storage.open_fs(cfg.storage)
    run_dir = storage.join(root, cfg.experiment)
    return fs, run_dir, storage.join(run_dir, SETTINGS_FILE)


def check(cfg: PretrainConfig, ident: dict[str, Any]) -> bool:
    """Raise :class:`UserError` when ``cfg.experiment`` already has checkpoints made with other settings;
    return whether it has checkpoints (a resume) made with these."""
    fs, run_dir, path = _paths(cfg)
    if not (fs.exists(path) and _has_checkpoint(fs, run_dir)):
        return False
    before = storage.read_json(fs, path)
    diff = [k for k in sorted(set(before) | set(ident)) if before.get(k) != ident.get(k)]
    if diff:
        changes = "; ".join(f"{k}: {before.get(k)!r} -> {ident.get(k)!r}" for k in diff)
        raise UserError(f"--experiment {cfg.experiment!r} in {cfg.storage} already has checkpoints made with "
                        f"other settings ({changes}); a resume would not fit them. Use a new --experiment "
                        "name, or rerun with the original settings to continue that run")
    log.info("resuming experiment %s with the settings its checkpoints were made with", cfg.experiment)
    return True


def record(cfg: PretrainConfig, ident: dict[str, Any]) -> None:
    """Write ``ident`` next to the checkpoints, just before training starts (a run refused by a later
    check leaves nothing behind). Not called on a resume: the file there already matches."""
    fs, run_dir, path = _paths(cfg)
    storage.ensure_dir(fs, run_dir)
    storage.write_json_atomic(fs, path, ident)

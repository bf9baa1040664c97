"""Checkpoint folders of a run that trains in this process, in the layout Ray Train uses.

Under Ray Train the controller uploads each reported checkpoint to ``STORAGE/EXPERIMENT/checkpoint_<time>``
and keeps the newest two. A run that trains in the driver process (one local worker, see
:func:`ray_jobs.pretrain.driver.runs_in_process`) has no controller, so this does the same: the
same folder names, so either way of running can resume the other's checkpoints and the orphan
pruning and the fine-tuning study read them alike.

A folder appears complete or not at all: on a local disk it is written under a hidden name and
renamed; on an object store ``progress.json`` is written last, and a folder without it is never
taken as a checkpoint (and is removed by the next save).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid

from ctssl_base import storage
from ray_jobs.pretrain import orphans
from ray_jobs.pretrain.checkpoint import PROGRESS_FILE

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"


class CheckpointStore:
    def __init__(self, storage_url: str, experiment: str, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.url = storage_url
        self.fs, root = storage.open_fs(storage_url)
        self.run_dir = storage.join(root, experiment)
        self.keep = keep
        self.local = storage.is_local(storage_url)

    def _folders(self) -> list[str]:
        try:
            return sorted(orphans.checkpoint_dirs(self.fs.ls(self.run_dir, detail=True)))
        except FileNotFoundError:
            return []

    def _step(self, folder: str) -> int | None:
        """The step of a complete checkpoint folder; None when it has no readable ``progress.json``."""
        try:
            with self.fs.open(storage.join(folder, PROGRESS_FILE), "rb") as f:
                return int(json.loads(f.read())["step"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def complete(self) -> list[str]:
        """Paths of the complete checkpoint folders, oldest (lowest step) first."""
        steps = [(s, f) for f in self._folders() if (s := self._step(f)) is not None]
        return [f for _, f in sorted(steps)]

    def latest(self) -> str | None:
        """Path (in the storage's filesystem) of the checkpoint with the highest step, or None."""
        done = self.complete()
        return done[-1] if done else None

    def save(self, local_dir: str) -> str:
        """Copy the checkpoint folder ``local_dir`` into the run folder; return its path there. Older
        checkpoints beyond the newest ``keep`` are then removed, as are incomplete ones."""
        name = f"{orphans.PREFIX}{dt.datetime.now():%Y-%m-%d_%H-%M-%S.%f}"
        dest = storage.join(self.run_dir, name)
        if self.local:
            os.makedirs(self.run_dir, exist_ok=True)
            tmp = storage.join(self.run_dir, f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}")
            shutil.copytree(local_dir, tmp)
            os.replace(tmp, dest)
        else:
            for n in sorted(os.listdir(local_dir), key=lambda n: n == PROGRESS_FILE):  # progress.json last
                self.fs.put_file(os.path.join(local_dir, n), storage.join(dest, n))
        self._prune(keep_path=dest)
        return dest

    def _prune(self, keep_path: str) -> None:
        done = self.complete()
        kept = set(done[-self.keep:]) | {keep_path}
        for f in self._folders():
            if f not in kept:
                self.fs.rm(f, recursive=True)
        if self.local:
            for entry in os.listdir(self.run_dir):
                if entry.startswith(PARTIAL_PREFIX):  # left by a process killed while copying
                    shutil.rmtree(os.path.join(self.run_dir, entry), ignore_errors=True)

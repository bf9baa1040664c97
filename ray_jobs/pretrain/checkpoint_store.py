"""Checkpoint folders of a run that trains in this process, in the layout Ray Train uses.

Under Ray Train the controller uploads each reported checkpoint to ``STORAGE/EXPERIMENT/checkpoint_<time>``
and keeps the newest two. A run that trains in the driver process (one local worker, see
:func:`ray_jobs.pretrain.sizing.runs_in_process`) has no controller, so this does the same: the
same folder names, so either way of running can resume the other's checkpoints and the orphan
pruning and the fine-tuning study read them alike.

A folder appears complete or not at all: on a local disk it is written under a hidden name and
renamed; on an object store ``manifest.json`` (each file's name and size) is written last. A folder
counts as a checkpoint only when every file its manifest lists is there with that size (one without a
manifest, written by an older version, needs ``progress.json`` and ``state.pt``); any other folder is
never taken as a checkpoint and is removed by the next save. Ray Train's own uploads (its files in
parallel) are judged the same way.
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
from ray_jobs.pretrain.checkpoint import MANIFEST_FILE, PROGRESS_FILE, STATE_FILE

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"
#: sub-folder of the run folder holding the budget-curve checkpoints (``fraction_<f>``); the rotation
#: only looks at ``checkpoint_*`` folders, so these stay until the run folder is removed
MILESTONES = "milestones"


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

    def _whole(self, folder: str) -> bool:
        """Every file the folder's manifest lists is there with its size (no manifest: state + progress)."""
        try:
            sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size")
                     for e in self.fs.ls(folder, detail=True) if e.get("type") != "directory"}
            if MANIFEST_FILE not in sizes:
                return PROGRESS_FILE in sizes and bool(sizes.get(STATE_FILE))
            with self.fs.open(storage.join(folder, MANIFEST_FILE), "rb") as f:
                want = json.loads(f.read())["files"]
            return all(n in sizes and int(sizes[n]) == int(size) for n, size in want.items())
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def _step(self, folder: str) -> int | None:
        """The step of a complete checkpoint folder; None when it is incomplete or has no readable
        ``progress.json``."""
        if not self._whole(folder):
            return None
        try:
            with self.fs.open(storage.join(folder, PROGRESS_FILE), "rb") as f:
                return int(json.loads(f.read())["step"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def complete(self) -> list[str]:
        """Paths of the complete checkpoint folders, oldest (lowest step) first."""
        steps = [(s, f) for f in self._folders() if (s := self._step(f)) is not None]
        return [f for _, f in sorted(steps)]

    def older(self, than: str) -> list[str]:
        """The complete checkpoints before the folder named like ``than`` (a path in any form), newest
        first: where a resume goes when ``than`` cannot be read."""
        name = than.rstrip("/").rsplit("/", 1)[-1]
        done = self.complete()
        names = [f.rstrip("/").rsplit("/", 1)[-1] for f in done]
        return list(reversed(done[:names.index(name)] if name in names else done))

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
            # progress.json, then the manifest, last
            for n in sorted(os.listdir(local_dir), key=lambda n: (n == MANIFEST_FILE, n == PROGRESS_FILE)):
                self.fs.put_file(os.path.join(local_dir, n), storage.join(dest, n))
        self._prune(keep_path=dest)
        return dest

    @staticmethod
    def milestone_name(fraction: float) -> str:
        return f"fraction_{fraction:g}"

    def milestones(self) -> dict[float, str]:
        """The complete milestone checkpoints of the run: budget fraction -> folder URL (a plain path on
        local storage; with the scheme on object storage, so a reader opens it with ``storage.open_fs``)."""
        base = storage.join(self.run_dir, MILESTONES)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if e.get("type") == "directory" and name.startswith("fraction_") and self._step(e["name"]) is not None:
                try:
                    out[float(name[len("fraction_"):])] = storage.full_url(self.url, e["name"].rstrip("/"))
                except ValueError:
                    continue
        return dict(sorted(out.items()))

    def save_milestone(self, local_dir: str, fraction: float) -> str:
        """Copy ``local_dir`` to ``MILESTONES/fraction_<f>`` (whole or not at all, as :meth:`save`);
        never pruned. An existing complete one is replaced (a resumed run redoing the step)."""
        base = storage.join(self.run_dir, MILESTONES)
        dest = storage.join(base, self.milestone_name(fraction))
        if self.local:
            os.makedirs(base, exist_ok=True)
            tmp = storage.join(base, f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}")
            shutil.copytree(local_dir, tmp)
            if os.path.exists(dest):
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        else:
            for n in sorted(os.listdir(local_dir), key=lambda n: (n == MANIFEST_FILE, n == PROGRESS_FILE)):
                self.fs.put_file(os.path.join(local_dir, n), storage.join(dest, n))
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

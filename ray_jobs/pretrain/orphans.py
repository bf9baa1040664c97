"""Remove checkpoint folders that Ray Train never registered.

A worker killed while it uploads a checkpoint (or after the upload, before the controller records
it) leaves a complete-looking ``checkpoint_<time>`` folder that Ray Train does not know about, so
``num_to_keep`` never deletes it. Each such crash would leave a full model state in the bucket
forever, and a person browsing the run folder could not tell the stray copy from the kept ones.
After a run has finished, every registered checkpoint is known, so anything else is safe to delete.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ctssl_base import storage

log = logging.getLogger(__name__)

PREFIX = "checkpoint_"


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def checkpoint_dirs(entries: Iterable[dict]) -> list[str]:
    """Paths of the checkpoint folders among ``fs.ls(..., detail=True)`` entries (Ray Train's
    ``checkpoint_manager_snapshot.json`` shares the prefix but is a file)."""
    return [e["name"] for e in entries if e.get("type") == "directory" and _name(e["name"]).startswith(PREFIX)]


def prune_unregistered(storage_url: str, experiment: str, registered: Iterable[str]) -> list[str]:
    """Delete ``checkpoint_*`` folders of ``experiment`` whose names are not in ``registered``
    (paths or names of the checkpoints Ray Train kept); return the removed folder names."""
    keep = {_name(p) for p in registered}
    if not keep:  # nothing known to keep: refuse rather than wipe the run
        return []
    fs, root = storage.open_fs(storage_url)
    run_dir = storage.join(root, experiment)
    try:
        entries = fs.ls(run_dir, detail=True)
    except FileNotFoundError:
        return []
    removed = []
    for path in sorted(checkpoint_dirs(entries)):
        if _name(path) not in keep:
            fs.rm(path, recursive=True)
            removed.append(_name(path))
    if removed:
        log.info("removed %d checkpoint folder(s) Ray Train never registered (left by a worker that died "
                 "while saving): %s", len(removed), ", ".join(removed))
    return removed

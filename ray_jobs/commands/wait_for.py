"""``ctssl wait-for``: block until a stage's input is committed in object storage.

The chart chains its stages with this (an init container on each Ray head): pre-training starts only
when the prep manifest exists, fine-tuning only when every method's final checkpoint does. Polling
the commit marker, rather than the Kubernetes objects, means a stage can also wait for data that a
run outside the cluster produced.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import time
from collections.abc import Callable

from data_prep import storage
from data_prep.errors import UserError
from ray_jobs.errors import CLIError

NAME = "wait-for"
HELP = "wait until a stage's input (prep manifest, final checkpoint, file) is committed"
DESCRIPTION = """\
Poll object storage until every URL is ready, logging a line per poll with the time waited, then
exit 0. Exit 2 with the URLs still missing when --timeout passes.

  manifest    URL/_manifest.json is a committed prep or selection output
  checkpoint  URL is a pre-training run folder (STORAGE/EXPERIMENT) whose final
              checkpoint (the one holding encoder.pt) is written
  file        URL itself exists

Example:
  ctssl wait-for s3://bucket/study/shards --what manifest --timeout 86400
"""

log = logging.getLogger("ctssl.wait_for")

# A finished `ctssl pretrain --storage S --experiment NAME` leaves its final Ray Train checkpoint in
# S/NAME/checkpoint_*/ and only that one holds the encoder (ray_jobs.pretrain.checkpoint); each file is
# one atomic object, so the checkpoint counts once all of these are there.
FINAL_CHECKPOINT_FILES = ("encoder.pt", "encoder_config.json", "progress.json")


def _manifest_ready(url: str) -> tuple[bool, str]:
    from data_prep.errors import ManifestError
    from data_prep.shards import read_manifest

    try:
        m = read_manifest(url)
    except ManifestError as e:
        return False, str(e)
    rows = sum(int(s.get("rows", 0)) for s in m.get("shards", []))
    return True, f"{m.get('kind', 'prep')} manifest, {len(m.get('shards', []))} shards, {rows} rows"


def _file_ready(url: str) -> tuple[bool, str]:
    fs, path = storage.open_fs(url)
    if fs.exists(path):
        return True, "exists"
    return False, "does not exist yet"


def _checkpoint_ready(url: str) -> tuple[bool, str]:
    fs, root = storage.open_fs(url)
    if not fs.exists(root):
        return False, "no run folder yet"
    folders = [root] + sorted((p for p in fs.ls(root, detail=False)
                               if posixpath.basename(p.rstrip("/")).startswith("checkpoint_")), reverse=True)
    for folder in folders:
        if all(fs.exists(storage.join(folder, f)) for f in FINAL_CHECKPOINT_FILES):
            return True, f"final checkpoint {posixpath.basename(folder.rstrip('/'))}"
    return False, f"{len(folders) - 1} checkpoint(s), none final yet (no {FINAL_CHECKPOINT_FILES[0]})"


CHECKS: dict[str, Callable[[str], tuple[bool, str]]] = {
    "manifest": _manifest_ready,
    "checkpoint": _checkpoint_ready,
    "file": _file_ready,
}


def _fmt(seconds: float) -> str:
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", nargs="+", metavar="URL", help="what to wait for (local path, file:// or s3://)")
    p.add_argument("--what", choices=sorted(CHECKS), default="manifest", help="kind of marker (default manifest)")
    p.add_argument("--timeout", type=float, default=86400.0, metavar="S", help="give up after S seconds")
    p.add_argument("--poll", type=float, default=30.0, metavar="S", help="seconds between polls (default 30)")


def wait_for(urls: list[str], what: str, timeout: float, poll: float,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Return when every URL is ready; raise :class:`CLIError` naming the missing ones on timeout."""
    if timeout <= 0 or poll <= 0:
        raise CLIError(f"--timeout and --poll must be positive (got {timeout}, {poll})")
    check = CHECKS[what]
    start = clock()
    pending = list(dict.fromkeys(urls))
    reasons: dict[str, str] = {}
    while True:
        for url in list(pending):
            try:
                # fsspec keeps directory listings; a poll must see the bucket as it is now
                storage.open_fs(url)[0].invalidate_cache()
                ok, detail = check(url)
            except UserError as e:  # unreadable URL, bad credentials: keep waiting, say why
                ok, detail = False, str(e)
            except Exception as e:  # noqa: BLE001 - transient storage errors must not end the wait
                ok, detail = False, f"{type(e).__name__}: {e}"
            if ok:
                pending.remove(url)
                log.info("ready: %s (%s)", url, detail)
            else:
                reasons[url] = detail
        elapsed = clock() - start
        if not pending:
            log.info("all %d input(s) ready after %s", len(urls), _fmt(elapsed))
            return
        if elapsed >= timeout:
            missing = "; ".join(f"{u} ({reasons[u]})" for u in pending)
            raise CLIError(f"timed out after {_fmt(elapsed)} waiting for {what}: {missing}")
        log.info("waiting for %d %s(s), %s elapsed, timeout in %s: %s (%s)", len(pending), what, _fmt(elapsed),
                 _fmt(timeout - elapsed), pending[0], reasons[pending[0]])
        sleep(min(poll, max(timeout - elapsed, 0.0)))


def run(args: argparse.Namespace) -> int:
    wait_for(args.urls, args.what, args.timeout, args.poll)
    return 0

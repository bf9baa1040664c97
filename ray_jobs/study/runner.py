"""Running a study as one Ray driver, stage by stage, reusing what an earlier run finished.

Each finished stage leaves ``<storage>/.stages/<stage>.json``: the settings it ran with, a
fingerprint of those settings and of the markers of the stages it needs, a fresh token, and its
result. A stage is reused when its fingerprint matches and its output still exists; otherwise it runs
and says why (never run, a setting changed, an input was redone, its output is gone). A stage redone
gets a new token, so everything that needs it is redone too, and nothing else is. The markers live
beside the data, not beside the driver, so a driver restarted on another node (a retried RayJob)
finds them; pre-training and prep resume their own half-finished work from checkpoints and commit
records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any

from ctssl_base import ray_connect, storage
from ctssl_base.errors import UserError
from ctssl_base.lease import Lease
from ray_jobs import tracking
from ray_jobs.study.spec import Study
from ray_jobs.study.stages import Context, Stage, plan

log = logging.getLogger("ctssl.study")

MARKERS = ".stages"
SENTINEL = ".ctssl-study.json"  # names the study a storage root / workdir belongs to; `--fresh` needs it
# what the stages write, relative to the storage root and to the workdir: all that `--fresh` deletes
STORAGE_OUTPUTS = (MARKERS, "shards", "runs", "study", "report", "mlflow.db")
WORKDIR_OUTPUTS = ("phantom", "report", "deid.key")


def mark_root(url: str, name: str) -> None:
    """Leave the sentinel naming study ``name`` in the root ``url`` (a folder or object-store prefix)."""

    fs, base = storage.open_fs(url)
    path = storage.join(base, SENTINEL)
    if not fs.exists(path):
        storage.ensure_dir(fs, base)
        storage.write_json_atomic(fs, path, {"study": name})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Markers:
    """The stage markers of one study under its storage root (local folder or object store)."""

    def __init__(self, root: str, *, create: bool = True):
        self.fs, base = storage.open_fs(root)
        self.dir = storage.join(base, MARKERS)
        if create:  # `ctssl study plan` only reads: it leaves the storage root as it found it
            storage.ensure_dir(self.fs, self.dir)

    def _path(self, name: str) -> str:
        return storage.join(self.dir, f"{name}.json")

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            return storage.read_json(self.fs, self._path(name))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:
            log.warning("stage marker %s unreadable (%s): the stage runs again", name, e)
            return None

    def write(self, name: str, marker: dict[str, Any]) -> None:
        storage.write_json_atomic(self.fs, self._path(name), marker)


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out


def _why(marker: dict[str, Any] | None, settings_json: Any, inputs: dict[str, str], output_ok: bool) -> str:
    """"" when the finished stage can be reused, else the reason it runs."""
    if marker is None:
        return "not run yet"
    changed = _changes(marker.get("settings", {}), settings_json)
    if changed:
        return "settings changed: " + "; ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
    redone = [n for n, tok in inputs.items() if marker.get("inputs", {}).get(n) != tok]
    if redone:
        return f"its input was redone: {', '.join(redone)}"
    if not output_ok:
        return "its output is missing"
    return ""


def resolve_gpus(study: Study) -> float:
    """``gpusPerWorker: auto``: one per worker when the connected cluster has GPUs, else none.

    An autoscaling cluster whose GPU workers start at zero replicas has no GPU yet when the driver
    starts; its head says how many it may add (``CTSSL_AUTOSCALER_MAX_GPUS``, set by the Helm chart),
    so the study asks for GPUs and the autoscaler brings them up instead of the study training on CPU.
    """
    want = study.spec["resources"]["gpusPerWorker"]
    if want != "auto":
        return float(want)
    try:
        if float(os.environ.get("CTSSL_AUTOSCALER_MAX_GPUS") or 0) > 0:
            return 1.0
    except ValueError:
        log.warning("CTSSL_AUTOSCALER_MAX_GPUS=%r is not a number: ignored", os.environ["CTSSL_AUTOSCALER_MAX_GPUS"])
    import ray

    return 1.0 if float(ray.cluster_resources().get("GPU", 0)) > 0 else 0.0


def run(study: Study, address: str | None = None, until: str | None = None) -> dict[str, Any]:
    """Run every stage that is not already finished with the same settings; returns their results.

    ``until`` names the last stage to run (with every stage before it in the plan's order, which holds
    all it needs): an archive's data stages can be prepared and reduced now and pre-trained later, and
    the next run reuses them. The driver holds the lease on the storage root meanwhile: a second driver of the study
    is refused in one line naming the holder, and changes nothing."""

    with Lease(study.storage, f"study {study.name}"):
        return _run(study, address, until)


def upto(stages: list[Stage], until: str | None, origin: str = "--until") -> list[Stage]:
    """The stages up to and including ``until`` (all of them for None); an unknown name is refused with
    the list of the study's stages."""
    if until is None:
        return stages
    names = [s.name for s in stages]
    if until not in names:
        raise UserError(f"{origin} {until!r}: no such stage in this study (its stages: {', '.join(names)})")
    return stages[:names.index(until) + 1]


def _run(study: Study, address: str | None, until: str | None = None) -> dict[str, Any]:
    tracking_uri = tracking.resolve_tracking_uri(study.spec["tracking"]["uri"], study.storage)
    stages = upto(plan(study), until)
    study.workdir.mkdir(parents=True, exist_ok=True)
    markers = Markers(study.storage)
    mark_root(study.storage, study.name)
    mark_root(str(study.workdir.resolve()), study.name)
    ray_connect.connect(address)
    ctx = Context(study=study, address=address, tracking_uri=tracking_uri, gpus_per_worker=resolve_gpus(study))
    print(f"study {study.name}: {len(stages)} stages, storage {study.storage}, "
          f"MLflow {tracking.redact_uri(tracking_uri)}, "
          f"{ctx.gpus_per_worker:g} GPU per worker", flush=True)
    tokens: dict[str, str] = {}
    t_all = time.perf_counter()
    for i, st in enumerate(stages, 1):
        head = f"[{i}/{len(stages)}] {st.name}: {st.title}"
        settings_json, inputs, fingerprint, marker, why = check_stage(st, ctx, markers, tokens)
        if not why:
            print(f"{head} - reusing the finished stage from {marker['finished']} ({marker['seconds']:.0f}s then)",
                  flush=True)
            ctx.results[st.name] = marker["result"]
            tokens[st.name] = marker["token"]
            continue
        print(f"{head} ... ({why})", flush=True)
        ctx.fingerprint = fingerprint
        t0 = time.perf_counter()
        result = st.run(ctx)
        dt = time.perf_counter() - t0
        token = uuid.uuid4().hex
        markers.write(st.name, {"settings": settings_json, "inputs": inputs, "fingerprint": fingerprint,
                                "token": token, "result": result, "seconds": dt,
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        ctx.results[st.name] = result
        tokens[st.name] = token
        print(f"{head} done in {dt:.0f}s (total {(time.perf_counter() - t_all) / 60:.1f} min)", flush=True)
    return ctx.results


def check_stage(st: Stage, ctx: Context, markers: Markers, tokens: dict[str, str]
                ) -> tuple[Any, dict[str, str], str, dict[str, Any] | None, str]:
    """(settings as JSON, input tokens, fingerprint, marker, why it runs: "" to reuse) for one stage.

    The one rule of reuse, shared by the run and by `ctssl study plan`, which asks it of every stage
    before anything runs; ``tokens`` holds the tokens of the stages before this one."""
    settings_json = json.loads(json.dumps(st.settings, default=str))
    inputs = {n: tokens[n] for n in st.needs if n in tokens}
    fingerprint = _digest({"settings": settings_json, "inputs": inputs})
    marker = markers.read(st.name)
    output_ok = bool(marker) and _safe_done(st, ctx, marker.get("result", {}))
    return settings_json, inputs, fingerprint, marker, _why(marker, settings_json, inputs, output_ok)


def _safe_done(st: Stage, ctx: Context, result: dict[str, Any]) -> bool:
    try:
        return bool(st.done(ctx, result))
    except (KeyError, TypeError, OSError):
        return False

"""The prep pipeline: discover series, load them in parallel, write shards, commit the manifest.

Units of work are *chunks* of whole series, each written as one shard plus a commit record, so:
- memory is bounded by one chunk's compressed shard and one series' slices, whatever the dataset size;
- a crash loses at most the chunks in flight: a rerun reads the commit records, deletes files no
  record names, and processes only series no record covers (no duplicates);
- ``--shard-index I --num-shards K`` splits the series list across K independent processes (a
  Kubernetes Indexed Job); whichever finishes last finds every series committed and writes the
  manifest.
Workers pseudonymise what they load (a DICOM folder's series are only known once read), so the
key travels to them in memory, never to storage or logs.

Rejects are redacted twice. A worker redacts its commit record with the identifiers of its chunk and
names a rejected file only by a keyed digest of its path; the process that writes the manifest
rebuilds each path from its own file listing and redacts it, and every other reject and ignored file,
with the identifiers of the whole run (keyed digests in every commit record, see
:class:`~data_prep.deid.PhiIndex`). So an identifier that only another worker, an earlier run or
another ``--shard-index`` read from a header still never reaches the manifest, a commit or stdout.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ctssl_base import storage
from ctssl_base.errors import UserError
from ctssl_base.lease import Lease
from ctssl_base.settings import setting
from data_prep import intensity, reader_warnings, shards, volume_qc
from data_prep.deid import REDACTED, PhiIndex, Pseudonymizer, redact
from data_prep.dhash import dhash64_hu
from data_prep.labels import check_labels_csv
from data_prep.records import Reject, SeriesTask
from data_prep.schema import SCHEMA_VERSION
from data_prep.sources import get_source, source_names
from data_prep.sources.base import PrepOptions, detect_source

log = logging.getLogger("ctssl.prep")


def _native_or_size(text: str) -> int | None:
    """``--size``: pixels, or 0 for the native matrix (None)."""
    try:
        return int(text) or None
    except ValueError:
        raise UserError(f"--size expects pixels (0 = the native matrix), got {text!r}") from None


@dataclass
class PrepConfig:
    """The settings of one prep run: the one table ``ctssl prep``'s options, a study file's ``prep`` keys,
    the schema's defaults there and the help text are made from (:mod:`ctssl_base.settings`)."""

    src: str  # the command's positional SRC; a study's data source
    dst: str  # the command's positional DST; the study's shards folder
    source: str | None = setting(None, choices=tuple(source_names()), help="input layout (default: detected)")
    size: int | None = setting(
        256, read=_native_or_size,
        help="output in-plane size; aspect kept by padding with air (default {default}; 0 = native)")
    dataset: str | None = setting(None, help="dataset name stored in the 'source' column (default: the layout name)")
    labels_csv: str | None = setting(None, flag="--labels",
                                     help="CSV with columns file,label (paths relative to the CSV)")
    workers: int = setting(1, help="parallel prep processes (Ray tasks)")
    #: "ray" (local or --address cluster), "local" (in-process, no Ray) or "auto" (local for one worker)
    executor: str = setting("ray", choices=("ray", "local", "auto"), cli_default="auto",
                            help="'local' runs in this process without Ray (default auto: local for 1 worker)")
    address: str | None = setting(
        None, help="Ray cluster address (default: a private local Ray; 'auto' = running cluster)")
    shard_index: int = 0  # the command's --shard-index (its default is $JOB_COMPLETION_INDEX)
    num_shards: int = setting(1, help="number of processes splitting the work")
    rows_per_shard: int = setting(1024, help="slices per Parquet shard")
    max_reject_fraction: float | None = setting(
        None, parse=float, help="fail (exit 3) when more than this fraction of inputs is rejected")
    progress: bool = setting(True, flag="--no-progress", action="store_false", help="progress bar / lines",
                             flag_help="no progress bar / lines")
    #: what a series flagged by the volume checks gets (data_prep.volume_qc): written and listed
    #: ("warn"), left out and listed as rejects ("skip"), or the run stops ("strict")
    volume_check: str = setting(
        volume_qc.DEFAULT_POLICY, key="volumeCheck", choices=volume_qc.POLICIES,
        help="a series that is no regular volume (slices at one position, missing slices, gantry tilt, mixed "
             "orientation or size): warn = write it and list its flags (default), skip = leave it out and list it "
             "as rejects, strict = stop naming its series id",
        study_note="See docs/data-format.md; warn lists the flags in the manifest and the report, strict stops "
                   "the study naming the series' pseudonym and flag.")

    def fingerprint_fields(self) -> dict[str, Any]:
        """What must be equal for a rerun to continue an existing output."""
        labels_sha = None
        if self.labels_csv:
            check_labels_csv(self.labels_csv)
            try:
                with open(self.labels_csv, "rb") as f:
                    labels_sha = hashlib.sha256(f.read()).hexdigest()
            except OSError as e:
                raise UserError(f"{self.labels_csv}: labels CSV cannot be read ({e.strerror})") from None
        # Only "skip" writes other shards than "warn": "strict" stops where "warn" would write a flagged
        # series, so an output it completes is the output "warn" makes, and a rerun with either
        # continues it (a strict rerun checks the committed series too). "skip" must not continue a
        # "warn" output (it would hold flagged series of the first run) nor the other way round.
        return {"source": self.source, "size": self.size, "dataset": self.dataset, "labels_sha256": labels_sha,
                "schema_version": SCHEMA_VERSION,
                **({"volume_check": "skip"} if self.volume_check == "skip" else {}),
                # DICOM tasks are series of the whole input (they were top-level folders): an output
                # made with folder tasks is not continued, which would write its series a second time
                **({"series_grouping": "input"} if self.source == "dicom" else {})}


@dataclass
class PrepSummary:
    inputs: int = 0
    series: int = 0
    slices_written: int = 0
    rejected: int = 0
    ignored: int = 0
    resumed_series: int = 0
    removed_orphans: int = 0
    seconds: float = 0.0
    committed: bool = False
    rejects: list[dict[str, str]] = field(default_factory=list)
    #: the volume checks: policy, counts per flag, the flagged series (as in the manifest)
    volume_qc: dict[str, Any] = field(default_factory=dict)
    #: warnings of the file readers while loading (total, counts per kind, redacted texts; as in the manifest)
    reader_warnings: dict[str, Any] = field(default_factory=dict)

    @property
    def reject_fraction(self) -> float:
        return self.rejected / self.inputs if self.inputs else 0.0


# ------------------------------------------------------------------------------------- worker side
def process_chunk(dst: str, tag: str, tasks: list[dict[str, Any]], opts: PrepOptions,
                  rows_per_shard: int, fingerprint: str, pseudo: Pseudonymizer,
                  volume_check: str = volume_qc.DEFAULT_POLICY) -> dict[str, Any]:
    """Load the chunk's series, write its shard(s) and commit record; return the record.

    Each series is checked as a volume (:mod:`data_prep.volume_qc`) before it is written: the flags
    of the chunk go into its commit record, so that a resumed run reports the series of earlier runs."""
    source = get_source(tasks[0]["task"].source)
    writer: shards.ShardWriter | None = None
    shard_records: list[dict[str, Any]] = []
    raw_rejects: list[tuple[dict[str, Any], Reject]] = []  # (task item, reject), redacted once all is read
    phi: set[str] = set()
    patients: set[str] = set()
    series_ids: set[str] = set()
    flagged: list[dict[str, Any]] = []
    captured: list[tuple[str, str]] = []  # reader warnings while loading: recorded redacted, never printed
    slices = 0
    inputs = 0

    def flush() -> None:
        nonlocal writer
        if writer is not None and writer.rows:
            rec = writer.finish(dst, f"part-{tag}-{len(shard_records):03d}.parquet")
            shard_records.append(rec.as_dict())
        writer = None

    for item in tasks:
        task: SeriesTask = item["task"]
        inputs += len(task.inputs)
        failed: UserError | None = None
        with reader_warnings.capture() as got:
            try:
                series_list = source.load_many(task, opts)
            except UserError as e:
                failed = e
        captured.extend(got)
        if failed is not None:
            base = task.options.get("base", "/")
            raw_rejects.extend((item, Reject(os.path.relpath(p, base), str(failed))) for p in task.inputs)
            continue
        for data in series_list:
            # only what the source marks as identifying: patient/study/series of NIfTI, MedMNIST and
            # image folders are made from file names, and redacting those would blank out the names
            # of the rejects themselves (DICOM's PatientID and UIDs are in data.phi already)
            phi.update(data.phi)
            raw_rejects.extend((item, r) for r in data.rejects)
            if not data.slices:
                continue
            series_id = pseudo("series", f"{task.source}:{data.series}")
            flags = volume_qc.check_volume(data.slices)
            if flags:
                entry = {"series_id": series_id, "slices": len(data.slices), "written": volume_check != "skip",
                         "flags": [{"flag": f.flag, "reason": redact(f.reason, phi)} for f in flags]}
                if volume_check == "strict":
                    raise UserError(volume_qc.strict_message(series_id, entry["flags"]))
                flagged.append(entry)
                if volume_check == "skip":
                    why = volume_qc.skip_reason(flags)
                    raw_rejects.extend((item, Reject(s.input, why)) for s in data.slices)
                    continue
            if series_id in series_ids:  # a series is written once: its slice ids would repeat
                raise UserError(f"series {series_id}: loaded twice in one chunk; its slice ids would repeat "
                                "(the source must give one series per id)")
            _check_slice_index(series_id, [s.slice_index for s in data.slices])
            hu = np.stack([s.hu for s in data.slices])
            n = len(hu)
            patient_id = pseudo("patient", data.patient)
            patients.add(patient_id)
            series_ids.add(series_id)
            table = shards.table_from_arrays(
                hu,
                slice_id=[f"{series_id}-{s.slice_index:05d}" for s in data.slices],
                patient_id=[patient_id] * n,
                study_id=[pseudo("study", data.study)] * n,
                series_id=[series_id] * n,
                slice_index=[s.slice_index for s in data.slices],
                z_mm=[None if math.isnan(s.z_mm) else s.z_mm for s in data.slices],
                spacing_mm=[s.spacing_mm for s in data.slices],
                source=[data.dataset] * n,
                label=[s.label for s in data.slices],
                dhash=dhash64_hu(hu),
            )
            if writer is None:
                writer = shards.ShardWriter()
            writer.write(table)
            slices += n
            del hu, table
            if writer.rows >= rows_per_shard:
                flush()
    flush()
    # Redacted with the identifiers of the whole chunk, not only of the reject's own series: a folder
    # of unreadable files has none of its own. The digests let the manifest writer do the same with
    # the identifiers of the whole run.
    inputs_of: dict[str, dict[str, str]] = {}
    rejects = []
    for item, r in raw_rejects:
        if item["task_id"] not in inputs_of:
            inputs_of[item["task_id"]] = _inputs_by_rel(item["task"])
        rejects.append(_commit_reject(item["task_id"], inputs_of[item["task_id"]], r, phi, pseudo))
    # The readers' warnings name the file they read: its path becomes <input> (its folders may be
    # identifiers this chunk never read) and the chunk's identifiers are redacted; the manifest
    # writer redacts again with the whole run's.
    chunk_paths = [p for it in tasks for p in it["task"].inputs]
    roots = [it["task"].options.get("base", "") for it in tasks]
    clean_cache: dict[str, str] = {}

    def clean(text: str) -> str:
        if text not in clean_cache:
            clean_cache[text] = redact(reader_warnings.scrub_paths(text, chunk_paths, roots), phi)
        return clean_cache[text]

    record = {"tag": tag, "tasks": [t["task_id"] for t in tasks], "shards": shard_records,
              "rejects": rejects, "slices": slices, "inputs": inputs, "patients": sorted(patients),
              "series": sorted(series_ids), "fingerprint": fingerprint, "phi": pseudo.phi_digests(phi),
              "volume_qc": sorted(flagged, key=lambda e: e["series_id"]),
              "reader_warnings": reader_warnings.summarize(captured, clean)}
    shards.write_commit(dst, tag, record)
    return record


def _check_slice_index(series_id: str, index: list[int]) -> None:
    """Refuse a series whose slice_index is not 0..n-1 once each: its slice ids (series id + index)
    would repeat or leave holes, and the readers and reduction strategies rely on them being unique."""
    if sorted(index) != list(range(len(index))):
        dup = sorted({i for i in index if index.count(i) > 1})
        raise UserError(f"series {series_id}: slice_index is not 0..{len(index) - 1} once each"
                        + (f" (repeated: {dup[:5]})" if dup else "") + "; refusing to commit repeated slice ids")


#: stands for the rejected file's own path in a reason stored in a commit record (exception messages
#: often quote the path, and the path is only ever written redacted by the manifest writer)
INPUT_MARK = "<input>"


def _inputs_by_rel(task: SeriesTask) -> dict[str, str]:
    """The task's inputs keyed by the relative path that sources name rejects by."""
    base = task.options.get("base", "/")
    return {os.path.relpath(p, base): p for p in task.inputs}


def _input_of(name: str, inputs: dict[str, str]) -> str | None:
    """The input (relative path) a reject name designates: the name itself, or its part before a
    ``#`` / ``:`` suffix (``file#z3``, ``file.npz:train``); None when it names no input of the task."""
    if name in inputs:
        return name
    for i, ch in enumerate(name):
        if ch in "#:" and name[:i] in inputs:
            return name[:i]
    return None


def _commit_reject(task_id: str, inputs: dict[str, str], r: Reject, phi: set[str],
                   pseudo: Pseudonymizer) -> dict[str, str]:
    """A reject as stored in a commit record. A rejected input file is named by a keyed digest of its
    path, not by the path: its folders may be named by identifiers this chunk never read (another
    chunk's PatientID), which only the manifest writer, holding the whole run's, can redact."""
    rel = _input_of(r.input, inputs)
    if rel is None:  # a name that is no input path (nothing to rebuild it from): redacted as it is
        return {"input": redact(r.input, phi), "reason": redact(r.reason, phi)}
    reason = r.reason
    path = inputs[rel]
    for form in sorted({os.path.abspath(path), path}, key=len, reverse=True):
        reason = reason.replace(form, INPUT_MARK)
    out = {"task": task_id, "file": pseudo("file", rel), "reason": redact(reason, phi)}
    if r.input != rel:
        out["suffix"] = redact(r.input[len(rel):], phi)
    return out


def _manifest_rejects(discovered: list[Reject], commits: list[dict[str, Any]], items: list[dict[str, Any]],
                      index: PhiIndex, pseudo: Pseudonymizer) -> list[dict[str, str]]:
    """Every reject of the run, each path and reason redacted with every identifier of the run; paths
    of rejected files rebuilt from this process's listing of the input."""
    tasks = {it["task_id"]: it["task"] for it in items}
    by_digest: dict[str, dict[str, str]] = {}
    out = [{"input": index.redact(r.input), "reason": index.redact(r.reason)} for r in discovered]
    for c in commits:
        for r in c["rejects"]:
            if "file" not in r:
                out.append({"input": index.redact(r["input"]), "reason": index.redact(r["reason"])})
                continue
            tid = r["task"]
            if tid not in by_digest:
                task = tasks.get(tid)
                by_digest[tid] = {pseudo("file", rel): rel for rel in _inputs_by_rel(task)} if task else {}
            rel = by_digest[tid].get(r["file"])
            # a file that is gone from the input since its chunk was committed cannot be named again
            shown = index.redact(rel) if rel is not None else REDACTED
            out.append({"input": shown + index.redact(r.get("suffix", "")),
                        "reason": index.redact(r["reason"]).replace(INPUT_MARK, shown)})
    return out


def process_chunk_one_thread(*args: Any) -> dict[str, Any]:
    """:func:`process_chunk` for a parallel worker that owns one CPU: the numba dhash kernel would
    otherwise start a thread per core in every worker, so N workers would fight over the same cores
    and adding workers would not add throughput."""
    import numba

    numba.set_num_threads(1)
    return process_chunk(*args)


# ------------------------------------------------------------------------------------- driver side
def _chunks(items: list[dict[str, Any]], sizes: list[int], target_rows: int,
            min_chunks: int) -> list[list[dict[str, Any]]]:
    """Group whole series into chunks of about ``target_rows`` slices (at least ``min_chunks``)."""
    total = sum(sizes)
    target = max(1, min(target_rows, math.ceil(total / max(1, min_chunks))))
    chunks: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    rows = 0
    for it, n in zip(items, sizes, strict=True):
        if cur and rows + n > target:
            chunks.append(cur)
            cur, rows = [], 0
        cur.append(it)
        rows += n
    if cur:
        chunks.append(cur)
    return chunks


def _chunk_tag(chunk: list[dict[str, Any]], shard_index: int) -> str:
    """Shard files are named by the index that owns them, so one index's cleanup never touches
    another index's work in flight."""
    digest = hashlib.sha1("\n".join(sorted(c["task_id"] for c in chunk)).encode()).hexdigest()[:16]
    return f"i{shard_index:03d}-{digest}"


def run_prep(cfg: PrepConfig, key: bytes) -> PrepSummary:
    """Prep ``cfg.src`` into ``cfg.dst``. From its first write on, the run holds the lease of its
    ``--shard-index`` of DST (:mod:`ctssl_base.lease`): a second prep of the same index, which would
    delete this one's shards in flight as orphans, is refused in one line before it writes."""
    with contextlib.ExitStack() as held:
        return _run_prep(cfg, key, held)


def _run_prep(cfg: PrepConfig, key: bytes, held: contextlib.ExitStack) -> PrepSummary:
    t0 = time.perf_counter()
    if not (0 <= cfg.shard_index < cfg.num_shards):
        raise UserError(f"--shard-index {cfg.shard_index} is outside 0..{cfg.num_shards - 1}")
    if cfg.workers < 1:
        raise UserError("--workers must be at least 1")
    volume_qc.check_policy(cfg.volume_check)
    pseudo = Pseudonymizer(key)
    if cfg.labels_csv:
        check_labels_csv(cfg.labels_csv)
    source = get_source(cfg.source) if cfg.source else detect_source(cfg.src)
    cfg.source = source.name
    cfg.dataset = cfg.dataset or source.name
    opts = PrepOptions(size=cfg.size, dataset=cfg.dataset, labels_csv=cfg.labels_csv)

    log.info("discovering %s inputs under the source folder", source.name)
    # the readers' warnings of the driver (header pass, slice counts): captured like a worker's
    driver_warnings: list[tuple[str, str]] = []
    with reader_warnings.capture() as got:
        tasks, discover_rejects = source.discover(cfg.src, opts)
    driver_warnings.extend(got)
    if not tasks:
        # Committing an empty output would let the next stage go ahead on nothing; and the
        # destination is not even created. SRC is the user's own argument: no identifier to redact.
        found = [f"{n} {what}" for n, what in ((len(discover_rejects), "rejected"),
                                               (len(source.ignored), "non-image files ignored")) if n]
        raise UserError(f"no input found under {cfg.src} (--source {source.name})"
                        + (f": {', '.join(found)}" if found else ""))
    items = [{"task": t, "task_id": pseudo("task", f"{t.source}:{t.key}")} for t in tasks]
    all_task_ids = {it["task_id"] for it in items}

    storage.check_writable(cfg.dst)
    held.enter_context(Lease(cfg.dst, f"prep (index {cfg.shard_index} of {cfg.num_shards})",
                             part=f"i{cfg.shard_index:03d}", tidy=True))
    # the key enters only as a salted scrypt hash (salted by the source, which a resume must repeat)
    key_check = pseudo.key_check(os.path.abspath(cfg.src) if storage.is_local(cfg.src) else cfg.src)
    fingerprint = {**cfg.fingerprint_fields(), "key": key_check["hash"]}
    _check_existing(cfg.dst, fingerprint)

    fp = _fp_digest(fingerprint)
    commits = [c for c in shards.read_commits(cfg.dst) if c.get("fingerprint") == fp]
    done = {tid for c in commits for tid in c["tasks"]}
    keep = {s["path"] for c in commits for s in c["shards"]}
    # temp files are only ever this index's own: another index may be writing its own right now
    removed = shards.remove_orphans(cfg.dst, keep, prefix=f"part-i{cfg.shard_index:03d}-",
                                    commit_prefix=f"i{cfg.shard_index:03d}-",
                                    manifest_temps=cfg.num_shards == 1)
    if removed:
        log.info("removed %d orphan file(s) left by an interrupted run", len(removed))

    mine = [it for i, it in enumerate(items) if i % cfg.num_shards == cfg.shard_index]
    todo = [it for it in mine if it["task_id"] not in done]
    summary = PrepSummary(resumed_series=len(mine) - len(todo), removed_orphans=len(removed))
    if summary.resumed_series:
        log.info("resuming: %d of %d series already committed, %d to do", summary.resumed_series, len(mine), len(todo))

    with reader_warnings.capture() as got:
        sizes = [source.count_slices(it["task"]) for it in todo]
        chunks = _chunks(todo, sizes, cfg.rows_per_shard, min_chunks=cfg.workers * 4)
        chunk_sizes = [sum(source.count_slices(c["task"]) for c in ch) for ch in chunks]
    driver_warnings.extend(got)
    _execute(cfg, opts, chunks, chunk_sizes, fp, pseudo)

    # Re-read: with --num-shards > 1 other indexes may have committed meanwhile.
    commits = [c for c in shards.read_commits(cfg.dst) if c.get("fingerprint") == fp]
    covered = {tid for c in commits for tid in c["tasks"]}
    committed = all_task_ids <= covered
    index = PhiIndex(pseudo)
    for c in commits:
        index.add(c.get("phi", {}))
    # the identifiers the source read while discovering (DICOM headers of every file, duplicates included)
    index.add_values(getattr(source, "phi", ()))
    seen: dict[str, str] = {}
    for c in commits:
        for sid in c.get("series", []):
            if seen.setdefault(sid, c["tag"]) != c["tag"]:
                raise UserError(f"{cfg.dst}: series {sid} is in two commits ({seen[sid]}, {c['tag']}); its slice "
                                "ids repeat; remove the output and prep again")
    rejects = _manifest_rejects(discover_rejects, commits, items, index, pseudo)
    ignored = [index.redact(x) for x in source.ignored]
    n_inputs = sum(c["inputs"] for c in commits) + len(discover_rejects)
    summary.inputs = n_inputs
    # Series are only known once loaded (a DICOM folder may hold several): count distinct ids.
    summary.series = len({s for c in commits for s in c.get("series", [])}) or len(tasks)
    summary.slices_written = sum(c["slices"] for c in commits)
    summary.rejected = len(rejects)
    summary.ignored = len(source.ignored)
    summary.rejects = rejects
    summary.volume_qc = _volume_qc(commits, index, cfg.volume_check)
    src_roots = [cfg.src, os.path.dirname(os.path.abspath(cfg.src))] if storage.is_local(cfg.src) else []
    driver_entries = reader_warnings.summarize(
        driver_warnings, lambda t: reader_warnings.scrub_paths(t, [], src_roots))
    summary.reader_warnings = reader_warnings.merge(
        [*driver_entries, *(e for c in commits for e in c.get("reader_warnings", []))], index.redact)
    if cfg.volume_check == "strict" and summary.volume_qc["series"]:
        # series an earlier run (with "warn", which shares this output) committed: strict holds for them too
        first = summary.volume_qc["series"][0]
        raise UserError(volume_qc.strict_message(first["series_id"], first["flags"]))
    if committed:
        shard_list = sorted((s for c in commits for s in c["shards"]), key=lambda s: s["path"])
        shards.write_manifest(cfg.dst, {
            "kind": "prep",
            "intensity": getattr(source, "intensity", "hu"),
            # 8-bit sources have no physical scale: models standardise them with these (data_prep.intensity)
            **({intensity.KEY: intensity.stats_of_shards(cfg.dst, shard_list)}
               if getattr(source, "intensity", "hu") != "hu" else {}),
            "shards": shard_list,
            "counts": {"inputs": n_inputs, "series": summary.series, "slices_written": summary.slices_written,
                       "rejected": len(rejects), "ignored": len(ignored),
                       "patients": len({p for c in commits for p in c.get("patients", [])})},
            "rejects": rejects,
            "ignored": ignored,
            "volume_qc": summary.volume_qc,
            "reader_warnings": summary.reader_warnings,
            "config": {**{k: v for k, v in asdict(cfg).items()
                          if k in ("source", "size", "dataset", "rows_per_shard", "volume_check")},
                       "labels": bool(cfg.labels_csv), "fingerprint": _fp_digest(fingerprint),
                       "deid_key_check": key_check},
        })
        summary.committed = True
    else:
        log.info("shard %d/%d done; the manifest is written by the last index to finish",
                 cfg.shard_index, cfg.num_shards)
    summary.seconds = time.perf_counter() - t0
    if cfg.max_reject_fraction is not None and summary.reject_fraction > cfg.max_reject_fraction:
        raise RejectThresholdExceeded(summary, cfg.max_reject_fraction)
    return summary


class RejectThresholdExceeded(UserError):
    def __init__(self, summary: PrepSummary, limit: float):
        super().__init__(f"{summary.rejected} of {summary.inputs} inputs rejected "
                         f"({summary.reject_fraction:.1%} > --max-reject-fraction {limit:.1%}); "
                         "the good inputs were written, see the rejects in the manifest")
        self.summary = summary


def _volume_qc(commits: list[dict[str, Any]], index: PhiIndex, policy: str) -> dict[str, Any]:
    """The manifest's ``volume_qc``: every flagged series of the run (reasons redacted with the
    identifiers of the whole run, like the rejects), the number of series per flag, the policy."""
    series = sorted(({**e, "flags": [{"flag": f["flag"], "reason": index.redact(f["reason"])} for f in e["flags"]]}
                     for c in commits for e in c.get("volume_qc", [])), key=lambda e: e["series_id"])
    return {"policy": policy, "flagged": len(series), "counts": volume_qc.counts(series), "series": series}


def _fp_digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(fp.items())).encode()).hexdigest()[:16]


def _check_existing(dst: str, fingerprint: dict[str, Any]) -> None:
    try:
        m = shards.read_manifest(dst)
    except UserError:
        return
    if m.get("kind") != "prep":
        raise UserError(f"{dst}: holds a {m.get('kind')} output, not a prep output; choose another destination")
    shards.refuse_other_format(dst, m)  # one output, one shard format
    if m.get("config", {}).get("fingerprint") != _fp_digest(fingerprint):
        raise UserError(f"{dst}: already holds a prep output made with other settings (source, size, dataset, "
                        "labels, --volume-check skip or de-identification key differ); choose a new destination")


def _execute(cfg: PrepConfig, opts: PrepOptions, chunks: list[list[dict[str, Any]]], chunk_sizes: list[int],
             fp: str, pseudo: Pseudonymizer) -> list[dict[str, Any]]:
    from ctssl_base.progress import Progress

    total = sum(chunk_sizes)
    records: list[dict[str, Any]] = []
    if not chunks:
        return records
    with Progress(total=total, unit="slices", desc="prep", enabled=cfg.progress) as bar:
        if cfg.executor == "local" or (cfg.executor == "auto" and cfg.workers == 1):
            for ch, n in zip(chunks, chunk_sizes, strict=True):
                records.append(process_chunk(cfg.dst, _chunk_tag(ch, cfg.shard_index), ch, opts, cfg.rows_per_shard, fp,
                                             pseudo, cfg.volume_check))
                bar.update(n)
            return records
        import ray

        from ctssl_base import ray_connect

        # a new local Ray gets --workers CPUs and no dashboard; a cluster is used as it is
        ray_connect.connect(cfg.address, num_cpus=cfg.workers, include_dashboard=False, configure_logging=False)
        remote = ray.remote(num_cpus=1, max_retries=2)(process_chunk_one_thread)
        pseudo_ref = ray.put(pseudo)
        pending: dict[Any, int] = {}
        queue = list(zip(chunks, chunk_sizes, strict=True))
        while queue or pending:
            # Exactly ``workers`` tasks in flight: the Ray cluster may have more CPUs than asked for
            # (a shared local Ray, a big cluster), and --workers is the user's limit on parallelism.
            while queue and len(pending) < cfg.workers:
                ch, n = queue.pop(0)
                pending[remote.remote(cfg.dst, _chunk_tag(ch, cfg.shard_index), ch, opts, cfg.rows_per_shard, fp,
                                      pseudo_ref, cfg.volume_check)] = n
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                n = pending.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
                    raise cause from None
                records.append(rec)
                bar.update(n)
    return records


"""``ctssl study plan``: what a study will cost before it runs.

A team books GPUs and storage before a study starts, so the plan answers in numbers: for every stage
the runner would run (the same :func:`ray_jobs.study.stages.plan`, and the same reuse rule,
:func:`ray_jobs.study.runner.check_stage`), the work (slices, optimiser steps, trials), the wall time
and GPU-hours on the study's resources, the GPUs an autoscaler would bring up at the peak, and the
bytes it leaves in storage. The rates come from ``calibration.json`` beside this module: figures
measured in docs/benchmarks.md (each with its date and machine), and rules where nothing was measured;
the plan names every rule it leaned on, so a reader knows which numbers are measurements and which are
extrapolations. Where the data already has committed shards, their measured slice count and bytes
replace the spec's estimate.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ctssl_base import storage
from ctssl_base.errors import UserError
from data_prep import shards
from ray_jobs.finetune.config import default_recipes
from ray_jobs.pretrain.budget import Budget
from ray_jobs.pretrain.config import PretrainConfig, parse_duration
from ray_jobs.study.runner import Markers, check_stage
from ray_jobs.study.spec import Study
from ray_jobs.study.stages import Context
from ray_jobs.study.stages import plan as stage_plan

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
DEVICES = ("auto", "cpu", "gpu")
#: prep decodes smaller inputs faster, but the output side does not shrink: the speed-up is capped here
MAX_PREP_SPEEDUP = 4.0
#: a GPU step on small images is bound by kernel launches, not pixels: smaller inputs plan as this size
GPU_MIN_PX = 112


@cache
def calibration() -> dict[str, Any]:
    return json.loads(CALIBRATION_FILE.read_text())


def figure(key: str) -> Any:
    return calibration()["figures"][key]["value"]


@dataclass
class Options:
    """How to plan: the device the study's ``gpusPerWorker: auto`` resolves to, the cluster's size
    where the spec leaves it open, and slice counts that the spec cannot state."""

    device: str = "auto"  # auto: as the spec's gpusPerWorker says (auto -> cpu unless an autoscaler says GPUs)
    gpu_type: str | None = None
    max_gpus: int | None = None  # the autoscaler's cap ($CTSSL_AUTOSCALER_MAX_GPUS)
    cpus: int | None = None  # CPUs of the machine / cluster that runs in-process work and CPU trials
    slices: dict[str, int] = field(default_factory=dict)  # role -> slices, for sources the plan cannot count
    classes: int | None = None  # classes of the labelled set, where it cannot be read
    look: bool = True  # read the storage root: committed shards and finished stages


@dataclass
class Pool:
    slices: int | None
    origin: str  # where the count comes from
    measured: bool = False
    bytes: int | None = None  # committed shard bytes (measured) when known
    classes: int | None = None
    input_px: int | None = None


@dataclass
class Row:
    stage: str
    title: str
    work: str
    wall_s: float | None
    gpus: float = 0.0
    gpu_hours: float = 0.0
    storage_bytes: int = 0
    where: str = "storage"  # storage root, or the driver's workdir (phantom DICOM)
    status: str = "runs"  # "runs (why)" or "reused"
    basis: list[str] = field(default_factory=list)  # calibration keys this row leaned on
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    study: str
    device: str
    gpu_type: str | None
    rows: list[Row]
    peak_gpus: int
    peak_note: str
    notes: list[str]

    @property
    def wall_s(self) -> float | None:
        todo = [r.wall_s for r in self.rows if r.status != "reused"]
        return None if any(w is None for w in todo) else sum(todo)

    @property
    def gpu_hours(self) -> float:
        return sum(r.gpu_hours for r in self.rows if r.status != "reused")

    @property
    def storage_bytes(self) -> int:
        return sum(r.storage_bytes for r in self.rows if r.where == "storage")

    @property
    def workdir_bytes(self) -> int:
        return sum(r.storage_bytes for r in self.rows if r.where == "workdir")

    def figures(self) -> dict[str, list[str]]:
        """The calibration entries the plan used, by kind (measured / derived / assumed)."""
        used = sorted({k for r in self.rows for k in r.basis})
        out: dict[str, list[str]] = {"measured": [], "derived": [], "assumed": []}
        for key in used:
            out[calibration()["figures"][key]["kind"]].append(key)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"study": self.study, "device": self.device, "gpu_type": self.gpu_type,
                "stages": [asdict(r) for r in self.rows],
                "totals": {"wall_s": self.wall_s, "gpu_hours": self.gpu_hours, "storage_bytes": self.storage_bytes,
                           "workdir_bytes": self.workdir_bytes, "peak_gpus": self.peak_gpus},
                "peak_note": self.peak_note, "notes": self.notes,
                "figures": {kind: {k: calibration()["figures"][k] for k in keys}
                            for kind, keys in self.figures().items()}}

    def text(self) -> str:
        where = (f"{self.gpu_type.upper()} GPUs" if self.device == "gpu" and self.gpu_type else "CPUs")
        lines = [f"study {self.study}: plan on {where}, before anything runs", ""]
        table = [("stage", "work", "wall", "GPU-h", "storage")]
        for r in self.rows:
            wall = "reused" if r.status == "reused" else fmt_duration(r.wall_s)
            gpuh = "-" if not r.gpu_hours else f"{r.gpu_hours:,.1f}"
            store = fmt_bytes(r.storage_bytes) + (" (workdir)" if r.where == "workdir" else "")
            table.append((r.stage, r.work, wall, gpuh, store))
        table.append(("total", "", fmt_duration(self.wall_s), f"{self.gpu_hours:,.1f}" if self.gpu_hours else "-",
                      fmt_bytes(self.storage_bytes)))
        widths = [min(max(len(t[i]) for t in table), 110 if i == 1 else 200) for i in range(5)]
        for j, t in enumerate(table):
            cells = [t[0].ljust(widths[0]), _clip(t[1], widths[1]).ljust(widths[1]),
                     t[2].rjust(widths[2]), t[3].rjust(widths[3]), t[4].rjust(widths[4])]
            lines.append("  ".join(cells).rstrip())
            if j == 0 or j == len(table) - 2:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(f"peak GPUs the autoscaler may bring up: {self.peak_gpus} ({self.peak_note})")
        if self.workdir_bytes:
            lines.append(f"the driver's workdir holds {fmt_bytes(self.workdir_bytes)} more (phantom DICOM)")
        for r in self.rows:
            if r.status.startswith("runs (") and r.status != "runs (not run yet)":
                lines.append(f"{r.stage} {r.status}")
        lines += [f"note: {n}" for n in self.notes]
        figs = self.figures()
        lines.append("")
        lines.append("figures behind this plan (ray_jobs/study/calibration.json):")
        for kind in ("measured", "derived", "assumed"):
            for key in figs[kind]:
                f = calibration()["figures"][key]
                when = f" {f['date']}, {calibration()['machines'].get(f.get('machine'), f.get('machine'))}" \
                    if f.get("date") else ""
                said = [f["value"]] if isinstance(f["value"], str) and key.endswith("_rule") else []
                said += [t for t in (f.get("source"), None if kind == "measured" else f.get("note")) if t]
                lines.append(f"  {kind:8s} {key}:{when}{' - ' if said else ''}{'; '.join(said)}")
        return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def fmt_bytes(n: int) -> str:
    if not n:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------ the data
def _manifest(url: str) -> dict[str, Any] | None:
    """The committed manifest at ``url``, or None when there is none (or it cannot be read)."""

    try:
        return shards.read_manifest(url)
    except (UserError, OSError, ValueError):
        return None


def _count_local(src: dict[str, Any]) -> tuple[int | None, str]:
    """Slices of a local source that has no shards yet, counted without decoding it (or None)."""
    path = Path(src.get("path") or "")
    if not path.exists():
        return None, ""
    if src["type"] == "medmnist" and path.is_file():
        import numpy as np

        n = 0
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("_images.npy"):
                    with z.open(name) as f:  # the array's header only, not its pixels
                        major, _ = np.lib.format.read_magic(f)
                        read = (np.lib.format.read_array_header_1_0 if major == 1
                                else np.lib.format.read_array_header_2_0)
                        n += int(read(f)[0][0])
        return n, f"counted in {path.name}"
    if src["type"] in ("dicom", "imagefolder") and path.is_dir():
        skip = (".csv", ".json", ".txt", ".md")
        n = sum(1 for _, _, files in os.walk(path) for f in files if not f.lower().endswith(skip))
        return n, "files under the source folder (one slice each)"
    return None, ""


def _npz_classes(path: Path) -> int | None:
    try:
        with np.load(path) as z:
            labels = [z[k].ravel() for k in z.files if k.endswith("_labels")]
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return len(np.unique(np.concatenate(labels))) if labels else None


def _classes_of(url: str) -> int | None:
    try:
        col = shards.read_table(url, columns=["label"], verify=False).column("label")
    except Exception:  # noqa: BLE001 - no label column, unreadable: the plan assumes instead
        return None
    return len({v for v in col.to_pylist() if v is not None}) or None


def pool(study: Study, role: str, opts: Options) -> Pool:
    """The size of a source: measured shards first, then --slices, the phantom's spec, a local count."""

    src = study.spec["data"][role]
    url = src["path"] if src["type"] == "shards" else storage.join(study.storage, "shards", role)
    m = _manifest(url) if opts.look else None
    classes = None
    if role == "labelled":
        if src["type"] == "phantom":
            from data_prep.phantom import REGION_CLASSES

            classes = len(REGION_CLASSES) if src.get("task", "region") == "region" else 2
        elif src["type"] == "medmnist" and Path(src["path"]).is_file():
            classes = _npz_classes(Path(src["path"]))
        classes = opts.classes or classes
    if m is not None and m.get("kind", "prep") == "prep":
        rows = sum(int(s["rows"]) for s in m.get("shards", []))
        size = sum(int(s.get("bytes") or 0) for s in m.get("shards", []))
        if role == "labelled" and classes is None:
            classes = _classes_of(url)
        return Pool(rows, f"measured: {rows:,} slices in the committed shards at {url}", True, size or None, classes)
    input_px = src.get("renderSize", 128) if src["type"] == "phantom" else None
    if role in opts.slices:
        return Pool(opts.slices[role], "given (--slices)", classes=classes, input_px=input_px)
    if src["type"] == "phantom":
        n = src["patients"] * src["slices"]
        return Pool(n, f"spec: {src['patients']} patients x {src['slices']} slices", classes=classes,
                    input_px=input_px)
    n, how = _count_local(src) if src["type"] != "shards" else (None, "")
    if n is not None:
        return Pool(n, how, classes=classes)
    what = f"the shards at {url} cannot be read here" if src["type"] == "shards" else \
        f"no shards yet and {src.get('path')} cannot be counted here"
    return Pool(None, f"unknown: {what}; give --slices {role}=N", classes=classes)


# ------------------------------------------------------------------------------ rates
def _bb(backbone: str) -> str:
    """The calibrated backbone a timm name is planned as (resnet18 / resnet50)."""
    return backbone if backbone in ("resnet18", "resnet50") else "resnet50"


def cpu_img_s(method: str, backbone: str, size: int, cores: float) -> float:
    """Images/s of one pre-training worker on ``cores`` CPU cores."""
    base = figure("pretrain.cpu.resnet18_64px")[method]
    cost = figure("pretrain.cpu.resnet50_cost")[method] if _bb(backbone) == "resnet50" else 1.0
    return base / cost / (size / 64) ** 2 * cores / calibration()["reference_cpus"]


def gpu_img_s(method: str, backbone: str, size: int, gpu_type: str) -> float:
    """Images/s of one pre-training worker on one GPU."""
    base = figure(f"pretrain.gpu.{gpu_type}.resnet50_224px")[method]
    cost = 1.0 if _bb(backbone) == "resnet50" else 1.0 / figure("pretrain.cpu.resnet50_cost")[method]
    return base / cost / (max(size, GPU_MIN_PX) / 224) ** 2


def finetune_core_s_per_image(backbone: str, size: int) -> float:
    """CPU core-seconds of one fine-tuning training step per image."""
    per_image = figure("finetune.cpu_epoch") / 256 * calibration()["reference_cpus"]
    cost = figure("pretrain.cpu.resnet50_cost")["byol"] if _bb(backbone) == "resnet50" else 1.0
    return per_image * cost * (size / 64) ** 2


def gpu_speedup(gpu_type: str) -> float:
    """GPU img/s over one CPU core's, for the same resnet50 BYOL step at 224 px (the fine-tuning rule)."""
    return gpu_img_s("byol", "resnet50", 224, gpu_type) / cpu_img_s("byol", "resnet50", 224, 1)


@dataclass
class TrialWork:
    trials: int
    recipes: int
    epochs: int
    core_s: float  # modelled compute of one trial on average (CPU core-seconds)
    test_images: int


def trial_work(slices: int, classes: int, folds: int, val_fraction: float, sizes: list[Any], recipes: int,
               epochs: int, bn_recalibrate: bool, core_s_per_image: float, encoders: int, seeds: int) -> TrialWork:
    """The average trial of a fine-tuning grid: every recipe trains ``epochs`` epochs on the trial's
    training images, validates each epoch and tests once (``epochs`` is the most early stopping allows)."""
    test = slices / folds
    rest = slices - test
    val = rest * val_fraction
    train_pool = rest - val
    share = figure("finetune.eval_share")
    per_trial = []
    for s in sizes:
        n_train = train_pool if s == "all" else min(int(s) * classes, train_pool)
        epoch = n_train * (1 + (share if bn_recalibrate else 0.0)) + val * share
        per_trial.append((recipes * epochs * epoch + test * share) * core_s_per_image)
    return TrialWork(trials=encoders * len(sizes) * folds * seeds, recipes=recipes, epochs=epochs,
                     core_s=sum(per_trial) / len(per_trial), test_images=int(test))


@cache
def trial_overhead_s() -> float:
    """Per-trial cost beyond its compute: the study benchmark's trial time minus its modelled compute."""
    cfg = calibration()["figures"]["finetune.study_bench"]["config"]
    w = trial_work(cfg["slices"], cfg["classes"], cfg["folds"], cfg["valFraction"], cfg["samplesPerClass"],
                   cfg["recipes"], cfg["epochs"], True, finetune_core_s_per_image(cfg["backbone"], cfg["size"]), 1, 1)
    measured = figure("finetune.study_bench")
    return max(0.0, measured["trial_seconds"] / measured["trials"] - w.core_s)


def keep_share(study: Study, level: int) -> tuple[float, str]:
    """The share of the pool a reduction keeps, when no selection has been committed yet."""
    key = f"reduce.keep_hash6.{'phantom' if study.spec['data']['pretrain']['type'] == 'phantom' else 'ct'}"
    return figure(key)["kept"] / figure(key)["of"], key


def spec_budget(study: Study) -> list[float]:
    """The budget curve's fractions (``pretrain.budgetCurve``); empty when off."""
    return list(study.spec["pretrain"].get("budgetCurve") or [])


def report_s_per_trial() -> float:
    measured = figure("report.per_trial_s")
    return measured["minutes"] * 60 / measured["trials"]


def shard_bytes(slices: int, size: int, kind: str) -> int:
    return int(slices * size * size * 2 / figure("storage.pixel_bytes_per_byte")[kind])


# ------------------------------------------------------------------------------ the plan
def make_plan(study: Study, opts: Options | None = None) -> Plan:
    """The plan of ``study``: one row per stage the runner derives, in its order."""

    opts = opts or Options()
    spec, res = study.spec, study.spec["resources"]
    cal = calibration()
    notes: list[str] = []
    device = _device(study, opts, notes)
    gpu_type = None
    if device == "gpu":
        gpu_type = (opts.gpu_type or cal["gpu_types"][0]).lower()
        if gpu_type not in cal["gpu_types"]:
            raise UserError(f"--gpu-type {gpu_type}: no calibration for it; measured: {', '.join(cal['gpu_types'])}")
        if opts.gpu_type is None:
            notes.append(f"GPU type {gpu_type.upper()} (the only one measured; --gpu-type picks another)")
    cpus = opts.cpus or cal["reference_cpus"]
    max_gpus = opts.max_gpus
    if max_gpus is None and os.environ.get("CTSSL_AUTOSCALER_MAX_GPUS", "").strip().isdigit():
        max_gpus = int(os.environ["CTSSL_AUTOSCALER_MAX_GPUS"])

    named = {study.method_settings(m)["backbone"] for m in study.methods()} | {spec["finetune"]["backbone"]}
    uncalibrated = sorted(b for b in named if b and _bb(b) != b)
    if uncalibrated:
        notes.append(f"backbone {', '.join(uncalibrated)}: not calibrated, planned as resnet50")
    pools = {role: pool(study, role, opts) for role in ("pretrain", "labelled")}
    for role, p in pools.items():
        notes.append(f"{role} set: {p.origin}")
    stages = stage_plan(study)
    status = _reuse(study, stages, opts, notes)
    by_encoder = {f"pretrain-{study.encoder_name(m, lv)}": (m, lv) for m in study.methods() for lv in study.levels()}
    kept: dict[str, tuple[int | None, bool]] = {}
    rows: list[Row] = []
    want = res["gpusPerWorker"]  # --device gpu on a file that says 0 (or auto) plans one GPU per worker
    gpus_per_worker = 0.0 if device == "cpu" else (float(want) if want != "auto" and float(want) > 0 else 1.0)
    peak, peak_why = 0.0, ["no stage asks for GPUs"]

    for st in stages:
        name = st.name
        if name.startswith("phantom-"):
            role = name.split("-", 1)[1]
            src, n = spec["data"][role], pools[role].slices or 0
            render = src.get("renderSize", 128)
            rate = figure("phantom.write_512") * (512 / render) ** 2
            rows.append(Row(name, st.title, f"{n:,} slices of {render} px DICOM", n / rate,
                            storage_bytes=n * (render * render * 2 + 1500), where="workdir",
                            basis=["phantom.write_512"], details={"slices": n}))
        elif name.startswith("prep-"):
            role = name.split("-", 1)[1]
            src, p = spec["data"][role], pools[role]
            workers = 1 if src["type"] == "phantom" else res["prepWorkers"]
            if src["type"] == "phantom":
                key = "prep.dicom_uncompressed"
            elif src["type"] == "dicom":
                key = figure("prep.dicom_planned_codec")
            else:
                key = "prep.other_sources"
            basis = [key, "prep.start_s"] + (["prep.dicom_planned_codec"] if src["type"] == "dicom" else [])
            measured_px = cal["figures"][key]["input_px"]  # a CT matrix; only a phantom's own size is known
            rate = figure(key) * min(MAX_PREP_SPEEDUP, (measured_px / (p.input_px or measured_px)) ** 2)
            kind = "phantom" if src["type"] == "phantom" else "ct"
            if p.bytes is not None:
                stored = p.bytes
            else:
                stored = shard_bytes(p.slices, src["size"], kind) if p.slices else 0
                basis.append("storage.pixel_bytes_per_byte")
            wall = None if p.slices is None else p.slices / (rate * workers) + figure("prep.start_s")
            work = (f"{p.slices:,} slices" if p.slices else "? slices") + f" -> {src['size']} px, " \
                + _plural(workers, "worker")
            rows.append(Row(name, st.title, work, wall, storage_bytes=stored, basis=basis,
                            details={"slices": p.slices, "measured": p.measured}))
        elif name.startswith("reduce-"):
            level = st.settings["level"]
            n = pools["pretrain"].slices
            label = study.level_label(level)
            m = _manifest(_url(study, "shards", f"pretrain-{label}")) if opts.look else None
            if m is not None and m.get("kind") == "selection":
                k, how = int(m["counts"]["kept_rows"]), "measured: the committed selection"
                basis = ["reduce.hash_volume", "reduce.start_s"]
            else:
                share, key = keep_share(study, level)
                k = None if n is None else int(round(n * share))
                kind = calibration()["figures"][key]["kind"]
                how = f"planned at {share:.1%}, " + ("the share measured on a phantom pool" if kind == "measured"
                                                     else "an assumed share")
                basis = ["reduce.hash_volume", "reduce.start_s", key]
            kept[label] = (k, how.startswith("measured"))
            wall = None if n is None else n / figure("reduce.hash_volume") + figure("reduce.start_s")
            work = f"{_n(n)} -> {_n(k)} slices kept ({how})"
            small = figure("storage.small_outputs")
            rows.append(Row(name, st.title, work, wall,
                            storage_bytes=(k or 0) * small["selection_bytes_per_kept_slice"],
                            basis=[*basis, "storage.small_outputs"],
                            details={"slices": n, "kept": k, "measured": how.startswith("measured")}))
        elif name.startswith("pretrain-"):
            method, level = by_encoder[name]
            rows.append(_pretrain_row(study, st, method, level, pools, kept, device, gpu_type, gpus_per_worker,
                                      cpus, PretrainConfig, parse_duration))
            if rows[-1].gpus > peak:
                peak, peak_why = rows[-1].gpus, [f"pre-training: {res['workers']} worker(s) x {gpus_per_worker:g} GPU"]
        elif name == "finetune":
            row, conc = _finetune_row(study, st, pools, device, gpu_type, cpus, max_gpus, default_recipes, notes)
            rows.append(row)
            if device == "gpu":
                if conc > peak:
                    peak, peak_why = conc, [f"fine-tuning: {conc} trials at once, 1 GPU each"]
                elif conc == peak:
                    peak_why.append(f"fine-tuning: {conc} trials at once")
        elif name == "budget-finetune":
            runs = sum(1 for r in rows if r.stage.startswith("pretrain-"))
            row, _ = _finetune_row(study, st, pools, device, gpu_type, cpus, max_gpus, default_recipes, notes,
                                   encoders=1 + runs * len(spec_budget(study)), sizes=study.budget_sizes())
            rows.append(row)
        elif name in ("budget", "linear"):
            runs = sum(1 for r in rows if r.stage.startswith("pretrain-"))
            n = 1 + runs * (len(spec_budget(study)) if name == "budget" else 1)
            what = (f"{n} checkpoints probed (random init included)" if name == "budget" else
                    f"{n} encoders probed at {len(study.spec['finetune']['samplesPerClass'])} sizes")
            rows.append(_probe_row(study, st, pools, device, gpu_type, cpus, n, what))
        elif name == "report":
            ft = next((r for r in rows if r.stage == "finetune"), None)
            # a linear-only study's report reads one table from its parent run: about one trial's cost
            trials = ft.details["trials"] if ft else 1
            rows.append(Row(name, st.title, f"{trials:,} trials collected" if ft else "the linear probe's cells",
                            trials * report_s_per_trial(),
                            storage_bytes=figure("storage.small_outputs")["report_bytes"],
                            basis=["report.per_trial_s", "storage.small_outputs"]))
    for r in rows:
        r.status = status.get(r.stage, "runs")
    if device == "gpu":
        _gpu_notes(study, rows, gpu_type, notes)
    peak_gpus = int(math.ceil(peak))
    if max_gpus is not None and peak_gpus > max_gpus:
        peak_why.append(f"capped by the autoscaler's {max_gpus}")
        peak_gpus = max_gpus
    return Plan(study.name, device, gpu_type, rows, peak_gpus, "; ".join(peak_why), notes)


def _gpu_notes(study: Study, rows: list[Row], gpu_type: str, notes: list[str]) -> None:
    """Say which GPU figures are measured and which are extrapolated, and by which rule."""
    measured = calibration()["figures"][f"pretrain.gpu.{gpu_type}.resnet50_224px"]
    size = study.spec["data"]["pretrain"]["size"]
    backbones = sorted({study.method_settings(m)["backbone"] for m in study.methods()})
    if size == 224 and backbones == ["resnet50"]:
        notes.append(f"GPU pre-training: measured step rates ({measured['unit']}, {measured['date']})")
    else:
        notes.append(f"GPU pre-training: extrapolated from the {gpu_type.upper()} rates measured for resnet50 at "
                     f"224 px to {', '.join(backbones)} at {size} px (pretrain.pixel_rule"
                     + (", pretrain.cpu.resnet50_cost" if backbones != ["resnet50"] else "") + ")")
    if any(r.stage == "finetune" and r.wall_s is not None for r in rows):
        notes.append(f"GPU fine-tuning: extrapolated, not measured: the CPU's per-image cost / "
                     f"{gpu_speedup(gpu_type):,.0f} (the GPU over one CPU core for the same BYOL step), plus the "
                     "CPU-measured per-trial overhead")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _n(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _url(study: Study, *parts: str) -> str:
    return storage.join(study.storage, *parts)


def _device(study: Study, opts: Options, notes: list[str]) -> str:
    if opts.device not in DEVICES:
        raise UserError(f"--device {opts.device}: choose from {', '.join(DEVICES)}")
    want = study.spec["resources"]["gpusPerWorker"]
    if opts.device != "auto":
        return opts.device
    if want != "auto":
        return "gpu" if float(want) > 0 else "cpu"
    if (opts.max_gpus or 0) > 0 or os.environ.get("CTSSL_AUTOSCALER_MAX_GPUS", "0").strip() not in ("", "0"):
        notes.append("gpusPerWorker: auto, planned on GPUs (the autoscaler may add them)")
        return "gpu"
    notes.append("gpusPerWorker: auto, planned on CPUs (--device gpu plans a cluster with GPUs)")
    return "cpu"


def _pretrain_row(study: Study, st: Any, method: str, level: int | None, pools: dict[str, Pool],
                  kept: dict[str, tuple[int | None, bool]], device: str, gpu_type: str | None,
                  gpus_per_worker: float, cpus: int, PretrainConfig: Any, parse_duration: Any) -> Row:  # noqa: N803
    from ray_jobs.pretrain.sizing import auto_batch_size

    res = study.spec["resources"]
    s = study.method_settings(method)
    size = study.spec["data"]["pretrain"]["size"]
    if study.spec["data"]["pretrain"]["type"] == "shards" and pools["pretrain"].measured:
        size = _manifest_size(study) or size
    rows_n = pools["pretrain"].slices if level is None else kept.get(study.level_label(level), (None, False))[0]
    workers = res["workers"]
    budget_s = parse_duration(s["timeBudget"]) if s["timeBudget"] else None
    cfg = PretrainConfig(method=method, data="", storage="", experiment="", epochs=s["epochs"],
                         max_steps=s["maxSteps"], time_budget_s=budget_s)
    basis: list[str] = []
    if device == "gpu":
        img_s = gpu_img_s(method, s["backbone"], size, gpu_type) * min(gpus_per_worker, 1.0) * workers
        basis += [f"pretrain.gpu.{gpu_type}.resnet50_224px", "pretrain.gpu_rule", "pretrain.pixel_rule"]
        start = figure("pretrain.start_s")["ray"]
    else:
        cores = cpus if workers == 1 else res["cpusPerWorker"]
        img_s = cpu_img_s(method, s["backbone"], size, cores) * workers
        basis += ["pretrain.cpu.resnet18_64px", "pretrain.pixel_rule", "pretrain.core_rule"]
        start = figure("pretrain.start_s")["in_process" if workers == 1 else "ray"]
    basis.append("pretrain.start_s")
    if _bb(s["backbone"]) == "resnet50":
        basis.append("pretrain.cpu.resnet50_cost")
    if _bb(s["backbone"]) != s["backbone"]:
        basis.append("pretrain.backbone_rule")
    gpus = workers * gpus_per_worker if device == "gpu" else 0.0
    ckpt_mb = figure("storage.checkpoint_mb")[_bb(s["backbone"])][method]
    enc_mb = figure("storage.encoder_mb")[_bb(s["backbone"])]
    basis += ["storage.checkpoint_mb", "storage.encoder_mb"]
    if rows_n is None:
        return Row(st.name, st.title, "? slices: steps unknown", None, gpus=gpus,
                   storage_bytes=int((2 * ckpt_mb + enc_mb) * 1e6), basis=basis)
    batch = s["batch"] or auto_batch_size(rows_n, workers)[0]
    spe = max(1, (rows_n // workers) // max(1, batch // workers))
    budget = Budget.plan(spe, cfg.epoch_limit, s["maxSteps"], budget_s)
    steps = budget.step_cap
    train_s = None if steps is None else steps * batch / img_s
    if budget_s is not None and (train_s is None or train_s > budget_s):
        train_s, steps = budget_s, int(budget_s * img_s / batch)
    wall = train_s + start
    # a checkpoint every checkpointEvery steps and a last one; the newest two are kept
    saves = min(2, (steps or 0) // study.spec["pretrain"]["checkpointEvery"] + 1)
    store = (saves * ckpt_mb + enc_mb) * 1e6
    bound = (f"{cfg.epoch_limit} epochs x {spe:,} steps" if cfg.epoch_limit and steps == cfg.epoch_limit * spe
             else ("time budget " + s["timeBudget"] if budget_s and train_s == budget_s else "maxSteps"))
    work = f"{rows_n:,} slices, batch {batch}, {steps:,} steps ({bound}), {img_s:,.0f} img/s"
    if device == "gpu":
        work += f" on {workers * gpus_per_worker:g} GPU{'s' if workers * gpus_per_worker > 1 else ''}"
    return Row(st.name, st.title, work, wall, gpus=gpus, gpu_hours=wall * gpus / 3600, storage_bytes=int(store),
               basis=basis, details={"method": method, "level": level, "slices": rows_n, "batch": batch,
                                     "steps": steps, "img_s": img_s})


def _manifest_size(study: Study) -> int | None:
    m = _manifest(study.spec["data"]["pretrain"]["path"])
    return (m or {}).get("config", {}).get("size")


def _probe_row(study: Study, st: Any, pools: dict[str, Pool], device: str, gpu_type: str | None, cpus: int,
               encoders: int, work: str) -> Row:
    """A linear-probe stage (budget curve, linear): each encoder embeds the labelled set once (on the
    driver's CPUs, or on one GPU worker in a GPU study), then a logistic regression per cell in the
    driver: the per-encoder figure measured on the demo."""
    ft = study.spec["finetune"]
    p = pools["labelled"]
    basis = ["finetune.cpu_epoch", "finetune.eval_share", "pretrain.pixel_rule", "budget.per_checkpoint_s"]
    if p.slices is None:
        return Row(st.name, st.title, work + "; ? labelled slices", None, basis=basis)
    backbone = ft["backbone"] or study.method_settings(study.methods()[0])["backbone"]
    per_image = finetune_core_s_per_image(backbone, study.spec["data"]["labelled"]["size"]) * figure(
        "finetune.eval_share")
    if device == "gpu":
        rate, where = gpu_speedup(gpu_type), "on 1 GPU"
        basis += ["finetune.gpu_rule", f"pretrain.gpu.{gpu_type}.resnet50_224px"]
    else:
        rate, where = cpus, f"on the driver's {cpus} CPUs"
    demo = calibration()["figures"]["budget.per_checkpoint_s"]["config"]
    demo_embed = demo["slices"] * finetune_core_s_per_image(demo["backbone"], demo["size"]) * figure(
        "finetune.eval_share") / demo["cpus"]
    probing = max(0.0, figure("budget.per_checkpoint_s") - demo_embed)  # the measured figure less its embedding
    wall = encoders * (p.slices * per_image / rate + probing)
    gpu_h = encoders * p.slices * per_image / rate / 3600 if device == "gpu" else 0.0
    return Row(st.name, st.title, f"{work} ({p.slices:,} slices, {where})", wall, gpus=1 if device == "gpu" else 0,
               gpu_hours=gpu_h, basis=basis)


def _finetune_row(study: Study, st: Any, pools: dict[str, Pool], device: str, gpu_type: str | None, cpus: int,
                  max_gpus: int | None, default_recipes: Any, notes: list[str], encoders: int | None = None,
                  sizes: list[Any] | None = None) -> tuple[Row, int]:
    """A fine-tuning stage's row: the study's ``finetune`` stage, or (``encoders``, ``sizes`` given) the
    budget-finetune stage, which fine-tunes that many encoders at those sizes with the same settings."""
    ft, res = study.spec["finetune"], study.spec["resources"]
    if sizes is not None:
        ft = {**ft, "samplesPerClass": list(sizes)}
    p = pools["labelled"]
    classes = p.classes
    basis = ["finetune.cpu_epoch", "finetune.eval_share", "finetune.study_bench", "pretrain.pixel_rule"]
    if classes is None:
        classes = 2
        notes.append("labelled set: 2 classes assumed (--classes N sets them)")
    recipes = 1 if ft["protocol"] == "fixed" else len(ft["recipes"] or default_recipes(ft["epochs"]))
    if encoders is None:
        encoders = len(study.methods()) * len(study.levels()) + (1 if ft["random"] else 0)
    backbone = ft["backbone"] or study.method_settings(study.methods()[0])["backbone"]
    size = study.spec["data"]["labelled"]["size"]
    per_image = finetune_core_s_per_image(backbone, size if device == "cpu" else max(size, GPU_MIN_PX))
    if _bb(backbone) == "resnet50":
        basis.append("pretrain.cpu.resnet50_cost")
    if _bb(backbone) != backbone:
        basis.append("pretrain.backbone_rule")
    n_trials = encoders * len(ft["samplesPerClass"]) * ft["folds"] * len(ft["seeds"])
    if p.slices is None:
        work = (f"{encoders} encoders x {len(ft['samplesPerClass'])} sizes x {ft['folds']} folds x "
                f"{len(ft['seeds'])} seeds = {n_trials:,} trials; ? labelled slices")
        return Row(st.name, st.title, work, None, basis=basis, details={"trials": n_trials}), 0
    w = trial_work(p.slices, classes, ft["folds"], ft["valFraction"], list(ft["samplesPerClass"]), recipes,
                   ft["epochs"], ft["batchNormRecalibrate"], per_image, encoders, len(ft["seeds"]))
    overhead = trial_overhead_s()
    if device == "gpu":
        trial_s = w.core_s / gpu_speedup(gpu_type) + overhead
        conc = res["maxConcurrentTrials"] or (max_gpus or w.trials)
        conc = min(conc, w.trials, max_gpus or w.trials)
        basis += ["finetune.gpu_rule", f"pretrain.gpu.{gpu_type}.resnet50_224px"]
        if not res["maxConcurrentTrials"] and max_gpus is None:
            notes.append(f"maxConcurrentTrials is not set: fine-tuning may ask for one GPU per trial "
                         f"({w.trials:,}); set it, or --max-gpus, to the GPUs the cluster may have")
    else:
        trial_s = w.core_s + overhead
        conc = min(res["maxConcurrentTrials"] or cpus, cpus, w.trials)
    waves = math.ceil(w.trials / conc)
    wall = waves * trial_s
    stopping = ft.get("stopping", "fixed")
    epochs = f"<= {ft['epochs']}" if stopping == "early" else f"{ft['epochs']}"
    work = (f"{w.trials:,} trials ({encoders} encoders x {len(ft['samplesPerClass'])} sizes x {ft['folds']} folds"
            f" x {len(ft['seeds'])} seeds), {_plural(recipes, 'recipe')} x {epochs} epochs, {conc} at once, "
            f"{fmt_duration(trial_s)} each")
    early = ("fine-tuning stops early: its figures are for every recipe running all its epochs (an upper bound "
             "unless a recipe is extended)")
    if stopping == "early" and early not in notes:  # once, for the finetune and budget-finetune rows alike
        notes.append(early)
    gpus = float(conc) if device == "gpu" else 0.0
    small = figure("storage.small_outputs")
    store = w.trials * (w.test_images * small["trial_bytes_per_test_image"] + small["trial_bytes"])
    basis.append("storage.small_outputs")
    return Row(st.name, st.title, work, wall, gpus=gpus, gpu_hours=w.trials * trial_s / 3600 if gpus else 0.0,
               storage_bytes=store, basis=basis,
               details={"trials": w.trials, "trial_s": trial_s, "concurrent": conc, "recipes": recipes,
                        "classes": classes, "labelled_slices": p.slices}), conc


def _reuse(study: Study, stages: list[Any], opts: Options, notes: list[str]) -> dict[str, str]:
    """stage -> "reused" or "runs (why)", by the runner's own rule, reading the stage markers only."""
    if not opts.look:
        return {}

    out: dict[str, str] = {}
    try:
        markers = Markers(study.storage, create=False)
        ctx = Context(study=study, address=None, tracking_uri="")
        tokens: dict[str, str] = {}
        for st in stages:
            _, _, _, marker, why = check_stage(st, ctx, markers, tokens)
            if why:
                out[st.name] = f"runs ({why})"
                tokens[st.name] = f"planned-{st.name}"  # a new token: the stages that need it run too
            else:
                out[st.name] = "reused"
                tokens[st.name] = marker["token"]
                ctx.results[st.name] = marker["result"]
    except Exception as e:  # noqa: BLE001 - an unreachable store: plan as if nothing ran, and say so
        notes.append(f"storage {study.storage} not readable ({type(e).__name__}): planned as if nothing ran")
        return {}
    done = sum(v == "reused" for v in out.values())
    if done:
        notes.append(f"{done} of {len(stages)} stages finished with the same settings: reused, no cost left")
    return out


def parse_slices(items: list[str] | None) -> dict[str, int]:
    """``--slices pretrain=244000 --slices labelled=25221`` (or comma-separated) -> {role: slices}."""
    out: dict[str, int] = {}
    for item in items or []:
        for tok in item.split(","):
            role, _, value = tok.strip().partition("=")
            if role not in ("pretrain", "labelled") or not value.strip().isdigit() or int(value) < 1:
                raise UserError(f"--slices {tok.strip()!r}: expected pretrain=N or labelled=N (N >= 1)")
            out[role] = int(value)
    return out

"""The stages of a study, derived from its spec: what each runs, what it needs, what settings it has.

A study is a small graph: phantom cohorts (when a source is generated) -> prep of each source ->
one reduction per threshold level -> one pre-training run per method x level -> the fine-tuning study
-> the report. Each stage calls the same function its CLI command calls; its ``settings`` are the
spec values its output depends on (the runner fingerprints them together with the stages it needs),
and ``done`` checks that the output a finished marker points at still exists.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctssl_base import settings, storage
from ctssl_base.errors import UserError
from data_prep import shards
from data_prep.deid import load_key
from data_prep.phantom.cohort import write_cohort
from data_prep.prep import PrepConfig
from data_prep.reduce import reduce_dataset
from data_prep.volume_qc import summary_lines
from ray_jobs import tracking
from ray_jobs.finetune.config import FinetuneConfig
from ray_jobs.pretrain.config import PretrainConfig, parse_monitor_every
from ray_jobs.study.spec import PHANTOM_KEYS, Study
from ray_jobs.trial_record import SizeSpec

log = logging.getLogger("ctssl.study")


@dataclass
class Context:
    """What every stage may read: the study, the Ray address, the results of finished stages."""

    study: Study
    address: str | None
    tracking_uri: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    gpus_per_worker: float = 0.0
    fingerprint: str = ""  # of the stage being run: names its resumable Ray runs

    def url(self, *parts: str) -> str:
        return storage.join(self.study.storage, *parts)


@dataclass
class Stage:
    name: str
    title: str
    settings: dict[str, Any]
    run: Callable[[Context], dict[str, Any]]
    done: Callable[[Context, dict[str, Any]], bool]
    needs: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- checks
def _committed(url: str) -> bool:
    try:
        shards.read_manifest(url)
        return True
    except UserError:
        return False


def _exists(url: str) -> bool:
    fs, path = storage.open_fs(url)
    return fs.exists(path)


# ----------------------------------------------------------------------------------------- data
def _phantom_dir(study: Study, role: str) -> Path:
    return study.workdir.resolve() / "phantom" / role


def _phantom(role: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        from ctssl_base.progress import Progress

        src = ctx.study.spec["data"][role]
        dst = _phantom_dir(ctx.study, role)
        shutil.rmtree(dst, ignore_errors=True)  # a cohort half-written by a crashed run is redone whole
        seed = ctx.study.spec["seed"] + (1000 if role == "labelled" else 0)
        with Progress(total=src["patients"] * src["slices"], unit="slices", desc=f"phantom {role}",
                      every_s=5.0) as bar:
            write_cohort(dst, patients=src["patients"], slices=src["slices"], size=src.get("renderSize", 128),
                         seed=seed, progress=bar.update)
        return {"folder": str(dst)}

    return run


def _deid_key(study: Study) -> bytes:
    every_phantom = all(study.spec["data"][r]["type"] == "phantom" for r in ("pretrain", "labelled"))
    return load_key(study.spec["deid"]["keyFile"], allow_generate=every_phantom,
                    generated_path=str(study.workdir.resolve() / "deid.key"))


def _prep(role: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        from data_prep.prep import run_prep

        study = ctx.study
        src = study.spec["data"][role]
        section = study.spec.get("prep", {})  # the prep keys of PrepConfig's table; the source's own below
        if src["type"] == "phantom":
            folder = _phantom_dir(study, role)
            labels = str(folder / f"labels_{src.get('task', 'region')}.csv") if role == "labelled" else None
            pc = settings.from_section(
                PrepConfig, section, src=str(folder), dst=ctx.url("shards", role), source="dicom", size=src["size"],
                dataset=src.get("dataset") or f"phantom-{role}", labels_csv=labels,
                executor="local")  # the phantom lies on the driver's disk only
        else:
            pc = settings.from_section(
                PrepConfig, section, src=src["path"], dst=ctx.url("shards", role), source=src["type"],
                size=src["size"], dataset=src.get("dataset"), labels_csv=src.get("labels"),
                workers=study.spec["resources"]["prepWorkers"], executor="ray", address=ctx.address)
        s = run_prep(pc, _deid_key(study))
        print(f"    {role}: {s.slices_written} slices from {s.series} series, {s.rejected} rejected -> {pc.dst}",
              flush=True)

        for line in summary_lines(s.volume_qc):
            print(f"    {line}", flush=True)
        return {"url": pc.dst, "slices": s.slices_written, "rejected": s.rejected,
                "volume_flagged": s.volume_qc.get("flagged", 0)}

    return run


def _volume_check(study: Study) -> str:
    return study.spec.get("prep", {}).get("volumeCheck", "warn")


def _prep_settings(study: Study, src: dict[str, Any]) -> dict[str, Any]:
    """The prep stage's settings: the source's keys, and the volume check where it changes the shards.

    Only "skip" writes other shards than "warn" ("strict" stops where "warn" would write a flagged
    series), so changing warn <-> strict redoes nothing downstream; a finished prep is checked against
    strict by :func:`_prep_done` instead."""
    out = {k: v for k, v in src.items() if k not in PHANTOM_KEYS}
    if _volume_check(study) == "skip":
        out["volumeCheck"] = "skip"
    return out


def _prep_done(ctx: Context, r: dict[str, Any]) -> bool:
    """The prep output is committed, and under strict holds no flagged series (else prep runs again,
    and stops naming one)."""

    try:
        m = shards.read_manifest(r["url"])
    except UserError:
        return False
    return _volume_check(ctx.study) != "strict" or not m.get("volume_qc", {}).get("flagged")


def data_url(ctx: Context, role: str) -> str:
    """Where a source's shards are: prepped by the study, or given as already-prepped shards."""
    src = ctx.study.spec["data"][role]
    return src["path"] if src["type"] == "shards" else ctx.results[f"prep-{role}"]["url"]


def _reduce(level: int) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        study = ctx.study
        strategy = study.spec["reduction"]["strategy"]
        dst = ctx.url("shards", f"pretrain-{study.level_label(level)}")
        summary = reduce_dataset(data_url(ctx, "pretrain"), dst, strategy, threshold=level, progress=True)
        print(f"    {strategy} <= {level}: kept {summary['kept']} of {summary['total']} slices "
              f"({summary['kept'] / max(1, summary['total']):.0%})", flush=True)
        return {"url": dst, "kept": summary["kept"], "total": summary["total"]}

    return run


# ----------------------------------------------------------------------------------------- training
def _pretrain(method: str, level: int | None) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        from ray_jobs.pretrain.driver import run_pretrain

        study = ctx.study
        s = study.method_settings(method)
        res = study.spec["resources"]
        encoder = study.encoder_name(method, level)
        label = study.level_label(level)
        selection = None if level is None else ctx.results[f"reduce-{label}"]["url"]
        # the pretrain section's keys through PretrainConfig's table, this method's overrides on top
        pc = settings.from_section(
            PretrainConfig, {**study.spec["pretrain"], **s}, method=method, data=data_url(ctx, "pretrain"),
            selection=selection, **_monitor_settings(ctx),
            workers=res["workers"], cpus_per_worker=res["cpusPerWorker"], gpus_per_worker=ctx.gpus_per_worker,
            # the fingerprint in the name: a restarted driver resumes this run, a changed setting starts anew
            storage=ctx.url("runs"), experiment=f"{study.name}-{encoder}-{ctx.fingerprint[:8]}",
            address=ctx.address, tracking_uri=ctx.tracking_uri, seed=study.spec["seed"],
            method_options=s["options"], mlflow_experiment=study.name, register_as=f"{study.name}-{encoder}",
            tags={"ctssl.stage": "pretrain", "ctssl.study": study.name, "encoder": encoder, "reduction": label})
        pc.validate()
        r = run_pretrain(pc)
        print(f"    {encoder}: {r.summary()}", flush=True)
        from ray_jobs.pretrain.checkpoint_store import CheckpointStore

        kept = CheckpointStore(pc.storage, pc.experiment).milestones() if pc.keep_at_fractions else {}
        return {"checkpoint": r.checkpoint_path, "run_id": r.run_id, "steps": r.steps,
                "train_time_s": r.train_time_s, "encoder": encoder, "method": method, "reduction": label,
                "milestones": {str(f): p for f, p in kept.items()}}

    return run


def _monitor_settings(ctx: Context) -> dict[str, Any]:
    """The online probe's PretrainConfig fields: fold 0 of the fine-tuning study's own folds (same
    patients, validation share and seed), so the probe embeds training and validation slices of the
    labelled set and never one of that fold's test patients. Not part of the stage's settings: the
    probe only watches, so changing it does not redo a finished pre-training run."""

    mon, ft = ctx.study.spec["pretrain"]["monitor"], ctx.study.spec["finetune"]
    if not mon["enabled"]:
        return {}
    steps, seconds = parse_monitor_every(str(mon["every"]))
    return {"monitor_data": data_url(ctx, "labelled"), "monitor_every": steps, "monitor_every_s": seconds,
            "monitor_k": mon["k"], "monitor_slices": mon["slices"], "monitor_folds": ft["folds"],
            "monitor_val_fraction": ft["valFraction"], "monitor_fold_seed": ctx.study.spec["seed"]}


def _finetune(ctx: Context) -> dict[str, Any]:
    from ray_jobs.finetune.study import run_study

    study = ctx.study
    ft = study.spec["finetune"]
    pre = [r for k, r in ctx.results.items() if k.startswith("pretrain-")]
    encoders = (["random"] if ft["random"] else []) + [f"{r['encoder']}={r['checkpoint']}" for r in pre]
    tags = {r["encoder"]: {"ctssl.stage": "finetune", "method": r["method"], "reduction": r["reduction"]}
            for r in pre}
    fc = FinetuneConfig.from_study(
        ft, data=data_url(ctx, "labelled"), storage=ctx.url("study"), experiment=study.name, encoders=encoders,
        gpus_per_trial=1.0 if ctx.gpus_per_worker > 0 else 0.0,
        max_concurrent=study.spec["resources"]["maxConcurrentTrials"], address=ctx.address,
        tracking_uri=ctx.tracking_uri, fold_seed=study.spec["seed"], encoder_tags=tags)
    r = run_study(fc)
    print(r.summary_markdown(), flush=True)
    return {"parent_run_id": r.parent_run_id, "trials": r.trials, "failed": r.failed}


def study_run_id(ctx: Context) -> str:
    """The study's parent MLflow run: the fine-tuning study's, else (``evaluation: linear``) the linear
    stage's."""
    return (ctx.results.get("finetune") or ctx.results["linear"])["parent_run_id"]


def _report_done(ctx: Context, r: dict[str, Any]) -> bool:
    """The local report exists, and so does its upload when the storage is remote."""

    return Path(r["html"]).exists() and ("uploaded" not in r or _exists(storage.join(r["uploaded"], "report.html")))


def _report(ctx: Context) -> dict[str, Any]:
    from ray_jobs.report.build import ReportConfig, build_report

    study = ctx.study
    rep = study.spec["report"]
    local = study.workdir.resolve() / "report"
    paths = build_report(ReportConfig(experiment=study.name, out=str(local), tracking_uri=ctx.tracking_uri,
                                      study_run=study_run_id(ctx),
                                      target_auc=rep["targetAuc"], margin=rep["margin"], log_to_run=True,
                                      prep_manifests={r: data_url(ctx, r) for r in ("pretrain", "labelled")},
                                      embedding_maps=_maps_input(ctx),
                                      budget_curve=ctx.results.get("budget", {}).get("csv"),
                                      budget_finetune=ctx.results.get("budget-finetune", {}).get("csv"),
                                      linear_probe=ctx.results.get("linear", {}).get("csv")))
    res = {"markdown": paths.markdown, "html": paths.html, "plot": paths.plot, "folder": str(local),
           **_alias_best(ctx, paths.summary_csv)}
    if not storage.is_local(study.storage):  # and beside the shards, where the cluster's users look
        fs, root = storage.open_fs(ctx.url("report"))
        for f in sorted(local.iterdir()):
            if f.is_file():
                storage.write_bytes_atomic(fs, storage.join(root, f.name), f.read_bytes())
        res["uploaded"] = ctx.url("report")
    return res


def _maps_input(ctx: Context) -> Any:
    """The report's embedding maps (``report.embeddingMaps``): every encoder the study pre-trained and,
    for reference, random init on the fine-tuning's baseline network; None when switched off."""
    from ray_jobs.finetune.frozen_views import load_maps_data
    from ray_jobs.report.embedding_maps import MapsInput

    spec = ctx.study.spec
    if not spec["report"].get("embeddingMaps", True):
        return None
    pre = [r for k, r in ctx.results.items() if k.startswith("pretrain-")]
    return MapsInput(labelled=data_url(ctx, "labelled"), pool=data_url(ctx, "pretrain"),
                     encoders=["random", *(f"{r['encoder']}={r['checkpoint']}" for r in pre)],
                     backbone=spec["finetune"]["backbone"], tracking_uri=ctx.tracking_uri, seed=spec["seed"],
                     load=load_maps_data)


def best_at_smallest(summary_csv: str, encoders: set[str]) -> tuple[str, str, float] | None:
    """(size, encoder, mean AUC) of the encoder among ``encoders`` with the highest mean test AUC at the
    smallest training-set size of the report's summary table (its ``summary.csv``); None when none of
    them has a finite AUC there. The verdict's text says whether that encoder also beats the baseline."""

    import pandas as pd

    table = pd.read_csv(summary_csv)
    if table.empty:
        return None
    smallest = min(table["size"].astype(str), key=lambda s: SizeSpec.from_label(s).sort_key())
    at = table[(table["size"].astype(str) == smallest) & table["encoder"].isin(encoders)]
    at = at[at["auc_mean"].map(lambda v: math.isfinite(float(v)))]
    if at.empty:
        return None
    row = at.sort_values(["auc_mean", "encoder"], ascending=[False, True]).iloc[0]
    return smallest, str(row["encoder"]), float(row["auc_mean"])


def _alias_best(ctx: Context, summary_csv: str) -> dict[str, Any]:
    """Alias ``best-at-<smallest size>`` on the registered version of the pre-trained encoder with the
    best mean test AUC at the smallest size (moved off the study's other encoders), and the study run
    tagged with its ``models:/`` URI; {} when no pre-trained encoder has a result there. A registry
    that refuses costs a warning: the report is written either way."""

    pre = {r["encoder"]: r for k, r in ctx.results.items() if k.startswith("pretrain-")}
    best = best_at_smallest(summary_csv, set(pre))
    if best is None:
        return {}
    size, encoder, auc = best
    names = {e: f"{ctx.study.name}-{e}" for e in pre}  # the pre-training stage's register_as
    alias = f"best-at-{size}"
    try:
        cl = tracking.client(ctx.tracking_uri)
        version = tracking.register_alias(cl, names[encoder], pre[encoder]["run_id"], alias, clear=names.values())
        uri = f"models:/{names[encoder]}@{alias}"
        tracking.set_tags(cl, study_run_id(ctx), {f"best_encoder_at_{size}": uri})
    except Exception as e:  # noqa: BLE001 - the registry is down or refuses: the report still stands
        log.warning("could not set alias %s on %s (%s)", alias, names[encoder], e)
        return {}
    print(f"    best mean AUC at {size}: {encoder} ({auc:.3f}) -> {uri} (version {version.version})", flush=True)
    return {"best_at_smallest": {"size": size, "encoder": encoder, "auc_mean": auc, "model_uri": uri}}


# ----------------------------------------------------------------------------------------- the plan
def plan(study: Study) -> list[Stage]:
    """The study's stages in an order that runs each after the stages it needs."""
    spec = study.spec
    out: list[Stage] = []
    for role in ("pretrain", "labelled"):
        src = spec["data"][role]
        if src["type"] == "phantom":
            keys = ("patients", "slices", "renderSize", "task")
            out.append(Stage(f"phantom-{role}", f"synthetic CT cohort ({role}, DICOM)",
                             {**{k: src.get(k) for k in keys}, "seed": spec["seed"]}, _phantom(role),
                             lambda c, r: (Path(r["folder"]) / "phantom.json").exists()))
        if src["type"] != "shards":
            out.append(Stage(f"prep-{role}", f"prep of the {role} set to Parquet shards",
                             _prep_settings(study, src), _prep(role), _prep_done,
                             needs=[f"phantom-{role}"] if src["type"] == "phantom" else []))
    pool_needs = [] if spec["data"]["pretrain"]["type"] == "shards" else ["prep-pretrain"]
    for level in study.levels():
        if level is not None:
            label = study.level_label(level)
            out.append(Stage(f"reduce-{label}", f"{spec['reduction']['strategy']} reduction of the pool at {level}",
                             {"strategy": spec["reduction"]["strategy"], "level": level,
                              "pool": spec["data"]["pretrain"].get("path")},
                             _reduce(level), lambda c, r: _committed(r["url"]), needs=list(pool_needs)))
    res = {k: spec["resources"][k] for k in ("workers", "cpusPerWorker", "gpusPerWorker")}
    pretrain_names = []
    for method in study.methods():
        for level in study.levels():
            enc = study.encoder_name(method, level)
            needs = list(pool_needs) + ([f"reduce-{study.level_label(level)}"] if level is not None else [])
            out.append(Stage(f"pretrain-{enc}", f"pre-training {method} on "
                             + ("all slices" if level is None else f"the {study.level_label(level)} selection"),
                             {**study.method_settings(method), "level": level, "resources": res,
                              "checkpointEvery": spec["pretrain"]["checkpointEvery"], "seed": spec["seed"],
                              # the budget curve's checkpoints are written while training: on, it is a setting
                              **({"budgetCurve": spec["pretrain"]["budgetCurve"]}
                                 if spec["pretrain"].get("budgetCurve") else {})},
                             _pretrain(method, level), lambda c, r: _exists(r["checkpoint"]), needs=needs))
            pretrain_names.append(f"pretrain-{enc}")
    labelled_needs = [] if spec["data"]["labelled"]["type"] == "shards" else ["prep-labelled"]
    evaluation = spec["finetune"]["evaluation"]
    if evaluation != "linear":
        out.append(Stage("finetune", "fine-tuning study (Ray Tune)",
                         {**{k: v for k, v in spec["finetune"].items() if k != "evaluation"},
                          "labelled": spec["data"]["labelled"].get("path"),
                          "maxConcurrentTrials": spec["resources"]["maxConcurrentTrials"], "seed": spec["seed"]},
                         _finetune, lambda c, r: True, needs=labelled_needs + pretrain_names))
    # what the probing stages come after: the fine-tuning study (whose folds and parent run they share),
    # else the labelled set and the encoders themselves
    after = ["finetune"] if evaluation != "linear" else labelled_needs + pretrain_names
    probes = []
    if evaluation != "finetune":
        from ray_jobs.study import linear_stage

        probes.append(Stage("linear", "linear probe of every encoder at every training-set size",
                            {k: spec["finetune"][k] for k in ("samplesPerClass", "folds", "seeds", "valFraction",
                                                              "backbone", "evaluation")},
                            linear_stage.run_stage, linear_stage.done, needs=list(after)))
    if spec["pretrain"].get("budgetCurve"):
        from ray_jobs.study.budget_curve import run_stage as _budget

        if (fr := spec["pretrain"]["budgetCurve"]) != sorted(fr):
            raise UserError(f"{study.source}: pretrain.budgetCurve must be sorted ascending, got {fr}")
        # after the stage whose parent MLflow run it logs to: the fine-tuning study's, else the linear one's
        parent = ["finetune"] if evaluation != "linear" else ["linear"]
        at = 0 if evaluation != "linear" else 1
        probes.insert(at, Stage(
            "budget", "gain versus pre-training budget (linear probe on budget-curve checkpoints)",
            {k: spec["pretrain"].get(k) for k in ("budgetCurve", "budgetSizes")}, _budget,
            lambda c, r: Path(r["csv"]).exists(), needs=list(parent)))
        if spec["pretrain"].get("budgetFinetune"):
            from ray_jobs.study.budget_curve import run_finetune_stage

            probes.insert(at + 1, Stage(
                "budget-finetune", "the budget-curve checkpoints fine-tuned (Ray Tune)",
                {**{k: spec["pretrain"].get(k) for k in ("budgetCurve", "budgetSizes")},
                 **{k: v for k, v in spec["finetune"].items() if k != "evaluation"},
                 "maxConcurrentTrials": spec["resources"]["maxConcurrentTrials"], "seed": spec["seed"]},
                run_finetune_stage, lambda c, r: Path(r["csv"]).exists(), needs=list(parent)))
    elif spec["pretrain"].get("budgetFinetune"):
        raise UserError(f"{study.source}: pretrain.budgetFinetune fine-tunes the budget curve's checkpoints: "
                        "give pretrain.budgetCurve as well")
    out += probes
    out.append(Stage("report", "report", dict(spec["report"]), _report,
                     _report_done,
                     needs=[s.name for s in out if s.name in ("finetune", "budget", "budget-finetune", "linear")]))
    return out


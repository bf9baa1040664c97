"""``ctssl demo``: the whole study on one machine, stage by stage, each stage reusable.

The stages are the same functions the CLI and the Helm chart run (phantom, prep, reduce, pretrain,
finetune, report), called in-process with a small configuration. Each finished stage leaves a
marker ``OUT/.stages/<stage>.json`` holding the hash of the settings that made it; a second run skips
a stage whose marker matches and whose output is still committed, and says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("ctssl.demo")

METHODS = ("byol", "mocov2", "swav", "spark")


@dataclass
class DemoConfig:
    out: str = "ctssl-demo"
    storage: str | None = None  # URL for shards and checkpoints (default OUT/store); s3:// works too
    pretrain_patients: int = 24
    labelled_patients: int = 24
    slices: int = 32  # per pre-training patient
    labelled_slices: int = 24  # per labelled patient
    render_size: int = 128  # phantom DICOM size
    size: int = 64  # prep / training resolution
    seed: int = 0
    task: str = "region"  # downstream label: "region" or "lesion"
    backbone: str = "resnet18"
    methods: tuple[str, ...] = METHODS
    pretrain_epochs: int = 8
    pretrain_batch: int = 64
    pretrain_workers: int = 1
    reduce_threshold: int = 6  # dhash Hamming distance (the paper's best setting)
    folds: int = 3
    samples_per_class: str = "5,20,all"
    finetune_epochs: int = 8
    finetune_protocol: str = "tuned"  # each encoder's recipe chosen on validation (ctssl finetune's default)
    # two recipes (the full grid of four doubles the demo's longest stage): lr 1e-3 with the backbone
    # trained from the start or frozen for the first 2 epochs, each encoder picking on validation
    finetune_recipes: str | None = "1e-3:0,1e-3:2"
    finetune_batch: int = 32
    max_concurrent: int = 2
    # SparK's 768-wide decoder costs 2.5x a contrastive step at demo scale; 256 keeps its share fair.
    # At 64 px a ResNet's 32-px patches make a 2x2 grid: a mask ratio of 0.5 is what it can realise.
    extra: dict[str, Any] = field(default_factory=lambda: {"spark_options": {"decoder_width": 256,
                                                                             "mask_ratio": 0.5}})

    def storage_url(self) -> str:
        return self.storage or str(Path(self.out).resolve() / "store")

    def tracking_uri(self) -> str:
        return f"sqlite:///{Path(self.out).resolve() / 'mlflow.db'}"


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[DemoConfig], dict[str, Any]]
    settings: Callable[[DemoConfig], dict[str, Any]]
    done: Callable[[DemoConfig, dict[str, Any]], bool]


def _url(cfg: DemoConfig, *parts: str) -> str:
    from data_prep import storage

    return storage.join(cfg.storage_url(), *parts)


def _committed(url: str) -> bool:
    from data_prep import shards
    from data_prep.errors import UserError

    try:
        shards.read_manifest(url)
        return True
    except UserError:
        return False


# ----------------------------------------------------------------------------------------- stages
def _phantom(cfg: DemoConfig) -> dict[str, Any]:
    import shutil

    from data_prep.phantom.cohort import write_cohort
    from data_prep.progress import Progress

    out = {}
    cohorts = (("pretrain", cfg.pretrain_patients, cfg.slices, cfg.seed),
               ("labelled", cfg.labelled_patients, cfg.labelled_slices, cfg.seed + 1000))
    with Progress(total=sum(p * s for _, p, s, _ in cohorts), unit="slices", desc="phantom", every_s=5.0) as bar:
        for name, patients, slices, seed in cohorts:
            dst = Path(cfg.out) / "phantom" / name
            shutil.rmtree(dst, ignore_errors=True)  # this stage is being redone: a cohort from a crashed run goes
            write_cohort(dst, patients=patients, slices=slices, size=cfg.render_size, seed=seed, progress=bar.update)
            out[name] = str(dst)
    return out


def _prep(cfg: DemoConfig) -> dict[str, Any]:
    from data_prep.deid import load_key
    from data_prep.prep import PrepConfig, run_prep

    key = load_key(None, allow_generate=True, generated_path=str(Path(cfg.out) / "deid.key"))
    res = {}
    for name, labels in (("pretrain", None), ("labelled", f"labels_{cfg.task}.csv")):
        src = Path(cfg.out) / "phantom" / name
        pc = PrepConfig(src=str(src), dst=_url(cfg, "shards", name), size=cfg.size, dataset=f"phantom-{name}",
                        labels_csv=str(src / labels) if labels else None, executor="local")
        s = run_prep(pc, key)
        res[name] = {"slices": s.slices_written, "rejected": s.rejected, "url": pc.dst}
        print(f"    {name}: {s.slices_written} slices from {s.series} series, {s.rejected} rejected -> {pc.dst}")
    return res


def _reduce(cfg: DemoConfig) -> dict[str, Any]:
    from data_prep.reduce import reduce_dataset

    summary = reduce_dataset(_url(cfg, "shards", "pretrain"), _url(cfg, "shards", "pretrain-dhash"), "hash",
                             threshold=cfg.reduce_threshold, progress=True)
    print(f"    dhash <= {cfg.reduce_threshold}: kept {summary['kept']} of {summary['total']} slices "
          f"({summary['kept'] / max(1, summary['total']):.0%})")
    return {"kept": summary["kept"], "total": summary["total"]}


def _pretrain_one(method: str) -> Callable[[DemoConfig], dict[str, Any]]:
    def run(cfg: DemoConfig) -> dict[str, Any]:
        # A pre-training run resumes by experiment name, so the name carries the settings' digest:
        # changed settings start a new run instead of resuming an incompatible checkpoint.
        tag = _digest(_pretrain_settings(cfg, method))[:8]
        from ray_jobs.pretrain.config import PretrainConfig
        from ray_jobs.pretrain.driver import run_pretrain

        pc = PretrainConfig(method=method, data=_url(cfg, "shards", "pretrain"),
                            selection=_url(cfg, "shards", "pretrain-dhash"), backbone=cfg.backbone,
                            workers=cfg.pretrain_workers, epochs=cfg.pretrain_epochs,
                            batch_size=cfg.pretrain_batch, storage=_url(cfg, "runs"),
                            experiment=f"demo-pretrain-{method}-{tag}", address="local",
                            tracking_uri=cfg.tracking_uri(), checkpoint_every=50, seed=cfg.seed,
                            method_options=dict(cfg.extra.get(f"{method}_options", {})))
        r = run_pretrain(pc)
        print(f"    {method}: {r.summary()}")
        return {"checkpoint": r.checkpoint_path, "run_id": r.run_id}

    return run


def _finetune(cfg: DemoConfig) -> dict[str, Any]:
    from ray_jobs.finetune.config import FinetuneConfig, parse_recipes, parse_sizes
    from ray_jobs.finetune.study import run_study

    encoders = ["random"] + [f"{m}={_final_checkpoint(cfg, m)}" for m in cfg.methods]
    fc = FinetuneConfig(data=_url(cfg, "shards", "labelled"), storage=_url(cfg, "study"),
                        experiment="demo-study", encoders=encoders, backbone=cfg.backbone,
                        sizes=parse_sizes(samples_per_class=cfg.samples_per_class), folds=cfg.folds,
                        epochs=cfg.finetune_epochs, protocol=cfg.finetune_protocol,
                        recipes=[r.to_text() for r in parse_recipes(cfg.finetune_recipes) or []] or None,
                        frozen_epochs=min(2, cfg.finetune_epochs), lr=1e-3, batch_size=cfg.finetune_batch, max_concurrent=cfg.max_concurrent, address="local",
                        tracking_uri=cfg.tracking_uri(), val_fraction=0.25)
    r = run_study(fc)
    print(r.summary_markdown())
    return {"parent_run_id": r.parent_run_id, "trials": r.trials, "failed": r.failed}


def _report(cfg: DemoConfig) -> dict[str, Any]:
    from ray_jobs.report.build import ReportConfig, build_report

    paths = build_report(ReportConfig(experiment="demo-study", out=str(Path(cfg.out) / "report"),
                                      tracking_uri=cfg.tracking_uri()))
    return {"markdown": paths.markdown, "html": paths.html, "plot": paths.plot}


def _final_checkpoint(cfg: DemoConfig, method: str) -> str:
    marker = _read_marker(cfg, f"pretrain-{method}")
    if not marker:
        raise RuntimeError(f"pre-training of {method} has not finished")
    return marker["result"]["checkpoint"]


_DATA_KEYS = ("pretrain_patients", "labelled_patients", "slices", "labelled_slices", "render_size", "seed")
_PREP_KEYS = (*_DATA_KEYS, "size", "task", "storage")
_PRETRAIN_KEYS = (*_PREP_KEYS, "reduce_threshold", "backbone", "pretrain_epochs", "pretrain_batch")


def _pretrain_settings(cfg: DemoConfig, method: str) -> dict[str, Any]:
    d = asdict(cfg)
    return {**{k: d[k] for k in _PRETRAIN_KEYS}, "options": cfg.extra.get(f"{method}_options", {})}


def stages(cfg: DemoConfig) -> list[Stage]:
    base = {k: v for k, v in asdict(cfg).items() if k not in ("out", "max_concurrent")}

    def keys(*names: str) -> Callable[[DemoConfig], dict[str, Any]]:
        return lambda c: {n: base[n] for n in names}

    data_keys, prep_keys, pre_keys = _DATA_KEYS, _PREP_KEYS, _PRETRAIN_KEYS
    out = [
        Stage("phantom", "synthetic CT cohorts (DICOM)", _phantom, keys(*data_keys),
              lambda c, r: all((Path(p) / "phantom.json").exists() for p in r.values())),
        Stage("prep", "prep to Parquet shards", _prep, keys(*prep_keys),
              lambda c, r: all(_committed(v["url"]) for v in r.values())),
        Stage("reduce", "hash reduction of the pre-training set", _reduce, keys(*prep_keys, "reduce_threshold"),
              lambda c, r: _committed(_url(c, "shards", "pretrain-dhash"))),
    ]
    for m in cfg.methods:
        out.append(Stage(f"pretrain-{m}", f"pre-train {m}", _pretrain_one(m),
                         lambda c, m=m: _pretrain_settings(c, m),
                         lambda c, r: _exists(r["checkpoint"])))
    out.append(Stage("finetune", "fine-tuning study (Ray Tune)", _finetune,
                     keys(*pre_keys, "extra", "methods", "folds", "samples_per_class", "finetune_epochs",
                          "finetune_protocol", "finetune_recipes", "finetune_batch"),
                     lambda c, r: True))
    out.append(Stage("report", "report", _report, lambda c: {"after": "finetune"},
                     lambda c, r: Path(r["html"]).exists()))
    return out


def _exists(url: str) -> bool:
    from data_prep import storage

    fs, path = storage.open_fs(url)
    return fs.exists(path)


def _marker_path(cfg: DemoConfig, name: str) -> Path:
    return Path(cfg.out) / ".stages" / f"{name}.json"


def _read_marker(cfg: DemoConfig, name: str) -> dict[str, Any] | None:
    p = _marker_path(cfg, name)
    return json.loads(p.read_text()) if p.exists() else None


def _digest(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    all_stages = stages(cfg)
    t_all = time.perf_counter()
    invalidated = False
    results: dict[str, Any] = {}
    for i, st in enumerate(all_stages, 1):
        digest = _digest(st.settings(cfg))
        marker = _read_marker(cfg, st.name)
        head = f"[{i}/{len(all_stages)}] {st.name}: {st.title}"
        if not invalidated and marker and marker["settings"] == digest and st.done(cfg, marker["result"]):
            print(f"{head} - reusing the finished stage from {marker['finished']} ({marker['seconds']:.0f}s then)",
                  flush=True)
            results[st.name] = marker["result"]
            continue
        invalidated = True  # every later stage depends on this one's output
        print(f"{head} ...", flush=True)
        t0 = time.perf_counter()
        res = st.run(cfg)
        dt = time.perf_counter() - t0
        _marker_path(cfg, st.name).parent.mkdir(parents=True, exist_ok=True)
        tmp = _marker_path(cfg, st.name).with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": digest, "result": res, "seconds": dt,
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1, default=str))
        os.replace(tmp, _marker_path(cfg, st.name))
        elapsed = time.perf_counter() - t_all
        print(f"{head} done in {dt:.0f}s (total {elapsed / 60:.1f} min)", flush=True)
        results[st.name] = res
    return results

"""``ctssl demo``: the whole study on this machine with the embedded defaults."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from ctssl_base.errors import UserError
from ray_jobs.finetune.config import parse_recipes, parse_sizes
from ray_jobs.study.spec import SCHEMA_FILE, from_dict, method_names

NAME = "demo"
HELP = "run the whole study on this machine: phantom -> prep -> reduce -> 4 methods -> fine-tuning -> report"
DESCRIPTION = """\
Runs every stage of ctssl on one machine with no cluster, no GPU and no network: a synthetic CT
phantom cohort (DICOM), prep to Parquet shards, dhash reduction, pre-training of BYOL, MoCo v2, SwAV
and SparK (one worker each, in this process), a fine-tuning study on a local Ray (4 encoders + random
init x training-set sizes x patient-level folds) tracked in MLflow (SQLite), and the report: about
12 minutes on 2 CPU cores. A second run reuses finished stages.

Scaling it up (same stages, bigger settings):
  ctssl demo --pretrain-patients 200 --labelled-patients 100 --slices 64 --size 128 \\
             --backbone resnet50 --pretrain-epochs 100 --folds 5 --samples-per-class 5,10,20,40,60,100,all
  ctssl demo --storage s3://bucket/ctssl-demo      # shards and checkpoints in S3 ($CTSSL_S3_ENDPOINT_URL)

The demo is the bundled study file examples/phantom.yaml with these flags applied; --print-spec shows
the resulting study file, to edit and run with `ctssl study run -f` (docs/study-spec.md).
"""


def _bundled() -> dict:
    return yaml.safe_load((SCHEMA_FILE.parent / "examples" / "phantom.yaml").read_text())


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = _bundled()["spec"]
    pool, lab, pre, ft = d["data"]["pretrain"], d["data"]["labelled"], d["pretrain"], d["finetune"]
    p.add_argument("--out", default=d["workdir"],
                   help=f"folder for everything the demo writes (default ./{d['workdir']})")
    p.add_argument("--storage", help="URL for shards and checkpoints (default OUT/store; s3://... works)")
    p.add_argument("--pretrain-patients", type=int, default=pool["patients"], help="unlabelled phantom patients")
    p.add_argument("--labelled-patients", type=int, default=lab["patients"], help="labelled phantom patients")
    p.add_argument("--slices", type=int, default=pool["slices"], help="slices per pre-training phantom patient")
    p.add_argument("--labelled-slices", type=int, default=lab["slices"], help="slices per labelled patient")
    p.add_argument("--size", type=int, default=pool["size"], help="prep and training resolution (pixels)")
    p.add_argument("--task", choices=("region", "lesion"), default=lab["task"], help="downstream label")
    p.add_argument("--backbone", default=pre["backbone"], help="timm CNN (default resnet18)")
    p.add_argument("--methods", default=",".join(pre["methods"]), help=f"subset of {','.join(method_names())}")
    p.add_argument("--pretrain-epochs", type=int, default=pre["epochs"])
    p.add_argument("--pretrain-batch", type=int, default=pre["batch"])
    p.add_argument("--folds", type=int, default=ft["folds"], help="patient-level folds")
    p.add_argument("--samples-per-class", default=",".join(map(str, ft["samplesPerClass"])),
                   help="training-set sizes")
    p.add_argument("--finetune-epochs", type=int, default=ft["epochs"])
    p.add_argument("--finetune-protocol", choices=("tuned", "fixed"), default="tuned",
                   help=f"tuned (default): each encoder's recipe chosen on validation; fixed: lr {ft['lr']:g}, "
                        f"{ft['frozenEpochs']} epoch(s) frozen for every encoder")
    p.add_argument("--finetune-recipes", metavar="LR:FROZEN,...", default=",".join(ft["recipes"]),
                   help=f"the tuned grid (default {','.join(ft['recipes'])}; ctssl finetune's own default has "
                        "four recipes)")
    p.add_argument("--seed", type=int, default=d.get("seed", 0))
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing finished stages")
    p.add_argument("--print-spec", action="store_true", help="print the study file these flags make, then exit")


def demo_study(args: argparse.Namespace) -> dict:
    """The bundled phantom study with the flags applied (a plain study document)."""

    doc = _bundled()
    d = doc["spec"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        raise UserError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(method_names())}")
    if args.finetune_recipes:
        for r in parse_recipes(args.finetune_recipes) or []:
            if r.frozen_epochs > args.finetune_epochs:
                raise UserError(f"--finetune-recipes: {r.to_text()} freezes more than --finetune-epochs "
                                f"{args.finetune_epochs}")
    out = Path(args.out).resolve()
    d["workdir"] = str(out)
    d["storage"] = args.storage or str(out / "store")
    d["tracking"] = {"uri": f"sqlite:///{out / 'mlflow.db'}"}
    d["seed"] = args.seed
    d["data"]["pretrain"].update(patients=args.pretrain_patients, slices=args.slices, size=args.size)
    d["data"]["labelled"].update(patients=args.labelled_patients, slices=args.labelled_slices, size=args.size,
                                 task=args.task)
    pre = d["pretrain"]
    pre.update(backbone=args.backbone, epochs=args.pretrain_epochs, batch=args.pretrain_batch)
    pre["methods"] = {m: pre["methods"].get(m) or {} for m in methods}
    ft = d["finetune"]
    ft.update(folds=args.folds, epochs=args.finetune_epochs, protocol=args.finetune_protocol,
              samplesPerClass=["all" if z.value < 0 else z.value
                               for z in parse_sizes(samples_per_class=args.samples_per_class)],
              recipes=[x.strip() for x in args.finetune_recipes.split(",") if x.strip()] or None,
              frozenEpochs=min(ft["frozenEpochs"], args.finetune_epochs))
    return doc


def run(args: argparse.Namespace) -> int:
    from ray_jobs.commands.study import run_study

    doc = demo_study(args)
    if args.print_spec:
        print(yaml.safe_dump(doc, sort_keys=False), end="")
        return 0
    study = from_dict(doc, "ctssl demo")
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    return run_study(study, None)

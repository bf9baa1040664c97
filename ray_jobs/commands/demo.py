"""``ctssl demo``: the whole study on this machine with the embedded defaults."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

NAME = "demo"
HELP = "run the whole study on this machine: phantom -> prep -> reduce -> 4 methods -> fine-tuning -> report"
DESCRIPTION = """\
Runs every stage of ctssl on one machine with no cluster, no GPU and no network: a synthetic CT
phantom cohort (DICOM), prep to Parquet shards, dhash reduction, pre-training of BYOL, MoCo v2, SwAV
and SparK on a local Ray, a fine-tuning study (4 encoders + random init x training-set sizes x
patient-level folds) tracked in MLflow (SQLite), and the report. A second run reuses finished stages.

Scaling it up (same stages, bigger settings):
  ctssl demo --pretrain-patients 200 --labelled-patients 100 --slices 64 --size 128 \\
             --backbone resnet50 --pretrain-epochs 100 --folds 5 --samples-per-class 5,10,20,40,60,100,all
  ctssl demo --storage s3://bucket/ctssl-demo      # shards and checkpoints in S3 ($CTSSL_S3_ENDPOINT_URL)

Real data instead of the phantom: run the stages yourself (docs/quickstart.md), e.g.
  ctssl prep /data/LIDC-IDRI s3://b/lidc --workers 8       ctssl reduce s3://b/lidc s3://b/lidc-dhash --strategy hash
  ctssl pretrain --method spark --data s3://b/lidc --selection s3://b/lidc-dhash ...
  ctssl finetune --data s3://b/organsmnist --encoder spark=s3://b/runs/spark/final ...   ctssl report ...
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ray_jobs.demo import METHODS, DemoConfig

    d = DemoConfig()
    p.add_argument("--out", default=d.out, help="folder for everything the demo writes (default ./ctssl-demo)")
    p.add_argument("--storage", help="URL for shards and checkpoints (default OUT/store; s3://... works)")
    p.add_argument("--pretrain-patients", type=int, default=d.pretrain_patients, help="unlabelled phantom patients")
    p.add_argument("--labelled-patients", type=int, default=d.labelled_patients, help="labelled phantom patients")
    p.add_argument("--slices", type=int, default=d.slices, help="slices per pre-training phantom patient")
    p.add_argument("--labelled-slices", type=int, default=d.labelled_slices, help="slices per labelled patient")
    p.add_argument("--size", type=int, default=d.size, help="prep and training resolution (pixels)")
    p.add_argument("--task", choices=("region", "lesion"), default=d.task, help="downstream label")
    p.add_argument("--backbone", default=d.backbone, help="timm CNN (default resnet18)")
    p.add_argument("--methods", default=",".join(d.methods), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    p.add_argument("--pretrain-batch", type=int, default=d.pretrain_batch)
    p.add_argument("--folds", type=int, default=d.folds, help="patient-level folds")
    p.add_argument("--samples-per-class", default=d.samples_per_class, help="training-set sizes")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--finetune-protocol", choices=("tuned", "fixed"), default=d.finetune_protocol,
                   help="tuned (default): each encoder's recipe chosen on validation; fixed: lr 1e-3, 2 epochs "
                        "frozen for every encoder")
    p.add_argument("--finetune-recipes", metavar="LR:FROZEN,...", default=d.finetune_recipes,
                   help="the tuned grid (default 1e-3:0,1e-3:2; ctssl finetune's own default has four recipes)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of reusing finished stages")


def run(args: argparse.Namespace) -> int:
    from ray_jobs.demo import METHODS, DemoConfig, run_demo
    from ray_jobs.errors import CLIError

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CLIError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.finetune_recipes is not None:
        from ray_jobs.finetune.config import parse_recipes

        for r in parse_recipes(args.finetune_recipes) or []:
            if r.frozen_epochs > args.finetune_epochs:
                raise CLIError(f"--finetune-recipes: {r.to_text()} freezes more than --finetune-epochs "
                               f"{args.finetune_epochs}")
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    cfg = DemoConfig(out=args.out, storage=args.storage, pretrain_patients=args.pretrain_patients,
                     labelled_patients=args.labelled_patients, slices=args.slices,
                     labelled_slices=args.labelled_slices, size=args.size,
                     task=args.task, backbone=args.backbone, methods=methods, pretrain_epochs=args.pretrain_epochs,
                     pretrain_batch=args.pretrain_batch, folds=args.folds, samples_per_class=args.samples_per_class,
                     finetune_epochs=args.finetune_epochs, finetune_protocol=args.finetune_protocol,
                     finetune_recipes=args.finetune_recipes, seed=args.seed)
    res = run_demo(cfg)
    out = Path(cfg.out).resolve()
    print("\nctssl demo finished.")
    print(f"  report:    {res['report']['markdown']}")
    print(f"             {res['report']['html']}")
    print(f"  MLflow UI: {shutil.which('mlflow') or 'mlflow'} ui --backend-store-uri {cfg.tracking_uri()} "
          f"--host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000")
    print(f"  outputs:   {out}")
    return 0

"""``ctssl finetune``: the fine-tuning study (encoders x training-set sizes x folds) as a Ray Tune sweep."""

from __future__ import annotations

import argparse
import dataclasses

from ray_jobs.finetune.config import FinetuneConfig, parse_recipes, parse_sizes

#: the study config's defaults: the flags and the help text quote them from here
D = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
LR = f"{D['lr']:.0e}".replace("e-0", "e-")  # 1e-4, as the papers write it

NAME = "finetune"
HELP = "fine-tuning study on Ray Tune: encoders x training-set sizes x patient-level folds"
DESCRIPTION = f"""\
Fine-tune every encoder (pre-trained encoders and the random-init baseline) on a labelled prep output,
over training-set sizes (reduction levels or samples per class) and patient-level stratified folds,
one Ray Tune trial per (encoder, size, fold, seed). By default (--protocol tuned) every encoder, the
random baseline included, gets its recipe chosen on the validation split: each trial trains every
recipe of a small grid (Adam lr 1e-3 and 1e-4, each with the backbone trained from the start or frozen
for the first 1/7 of the epochs) and keeps the one with the best validation AUC. --protocol fixed
trains one recipe for all (--lr, --frozen-epochs; defaults are Wolf et al. 2023's: lr {LR},
{D['frozen_epochs']} of {D['epochs']} epochs frozen), which can handicap whichever encoder it does
not suit. Each recipe trains until validation stops improving (--stopping early, the default:
--epochs is the maximum, --patience epochs without a validation AUC gain above --min-delta end it,
and a recipe still improving at the maximum continues once, by up to --extend-epochs); the rule is
the same for every encoder and the baseline, and the report leaves cells that ended still improving
out of its verdict. --stopping fixed trains exactly --epochs. Best epoch chosen on validation;
batch-norm statistics re-estimated on the training images before each evaluation. MLflow gets one
parent run per study and one child run per trial.

Encoders (--encoder, repeatable): "random", a pre-training checkpoint or encoder folder (local or s3://),
or runs:/<mlflow-run-id> of a pre-training run; prefix NAME= to choose the label, e.g. byol=s3://b/runs/byol.

Example:
  ctssl finetune --data s3://bucket/covid --encoder random --encoder byol=runs:/3f2a... \\
      --samples-per-class 5,10,20,40,60,100,all --folds 5 --storage s3://bucket/tune --experiment covid-study
"""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="URL", help="labelled prep output (local path or s3://)")
    p.add_argument("--encoder", action="append", dest="encoders", metavar="[NAME=]SOURCE",
                   help="random | checkpoint/encoder folder | runs:/RUN_ID (repeatable; default: random)")
    p.add_argument("--backbone", metavar="NAME",
                   help="timm model for the random-init baseline (default: the pre-trained encoders' backbone; "
                        "resnet50 when random is the only encoder)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--reductions", metavar="PCTS",
                       help="training-set reduction levels in %% (default 0,25,50,75,90)")
    sizes.add_argument("--samples-per-class", metavar="NS",
                       help="training-set sizes as samples per class, e.g. 5,10,20,40,60,100,all")
    p.add_argument("--folds", type=int, default=D["folds"],
                   help=f"patient-level stratified folds (default {D['folds']})")
    p.add_argument("--seeds", type=_int_list, default=[0], metavar="S1,S2", help="subset/initialisation seeds")
    p.add_argument("--val-fraction", type=float, default=D["val_fraction"],
                   help="share of each fold's training patients held out for choosing the best epoch")
    p.add_argument("--epochs", type=int, default=D["epochs"],
                   help="per recipe: the maximum with --stopping early, the exact count with --stopping fixed "
                        f"(default {D['epochs']})")
    p.add_argument("--stopping", choices=("early", "fixed"), default="early",
                   help="early (default): stop each recipe when validation AUC stops improving; fixed: train "
                        "exactly --epochs, as in the papers")
    p.add_argument("--patience", type=int, default=D["patience"], metavar="N",
                   help="--stopping early: epochs without a validation AUC gain (counted once the backbone is "
                        f"unfrozen) that end a recipe (default {D['patience']})")
    p.add_argument("--min-delta", type=float, default=D["min_delta"], metavar="AUC",
                   help=f"--stopping early: the smallest validation AUC gain that counts (default {D['min_delta']:g})")
    p.add_argument("--extend-epochs", type=int, metavar="N",
                   help="--stopping early: a recipe still improving at --epochs continues once by up to N more "
                        "epochs (default: --epochs, i.e. the maximum doubles once; 0: never)")
    p.add_argument("--protocol", choices=("tuned", "fixed"), default="tuned",
                   help="tuned (default): each trial picks its recipe from --recipes on the validation split; "
                        "fixed: one recipe (--lr, --frozen-epochs) for every encoder, as in the papers")
    p.add_argument("--recipes", metavar="LR:FROZEN,...",
                   help="the tuned grid, e.g. 1e-3:0,1e-3:10,1e-4:0,1e-4:10 (default: lr 1e-3 and 1e-4 x "
                        "0 and epochs/7 frozen)")
    p.add_argument("--frozen-epochs", type=int, default=D["frozen_epochs"],
                   help=f"--protocol fixed: epochs with the backbone frozen (default {D['frozen_epochs']})")
    p.add_argument("--lr", type=float, default=D["lr"],
                   help=f"--protocol fixed: Adam learning rate (default {LR})")
    p.add_argument("--no-bn-recalibrate", dest="bn_recalibrate", action="store_false",
                   help="keep batch-norm running averages instead of re-estimating them before each evaluation")
    p.add_argument("--weight-decay", type=float, default=D["weight_decay"])
    p.add_argument("--batch-size", type=int, default=D["batch_size"])
    p.add_argument("--img-size", type=int, metavar="S", help="fine-tuning resolution (default: the shards' size)")
    p.add_argument("--in-chans", type=int, choices=(1, 3), help="default: the encoder's (1 for random)")
    p.add_argument("--cpus-per-trial", type=float, default=D["cpus_per_trial"])
    p.add_argument("--gpus-per-trial", type=float, default=D["gpus_per_trial"])
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: as many as the cluster's resources allow)")
    p.add_argument("--asha", action="store_true",
                   help="stop weak trials early (ASHA on validation AUC); a stopped trial has no test "
                        "metrics: the report names it and leaves it out of the means")
    p.add_argument("--search-target-auc", type=float, metavar="AUC",
                   help="search the smallest samples-per-class reaching this mean test AUC")
    p.add_argument("--search-margin", type=float, metavar="DELTA",
                   help="search the smallest samples-per-class within DELTA of the full-data AUC")
    p.add_argument("--search-candidates", type=_int_list, metavar="NS",
                   help="samples-per-class values the search may try (default 5..200 on a x1.5 ladder)")
    p.add_argument("--storage", required=True, metavar="URL", help="Ray Tune results folder (local or s3://)")
    p.add_argument("--experiment", required=True, metavar="NAME", help="study name (MLflow experiment)")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster (default: $RAY_ADDRESS, else local)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite under a local --storage)")
    p.add_argument("--metrics-ci", type=int, default=0, metavar="N",
                   help="bootstrap resamples for test-metric confidence intervals (0 = off)")


def config_from_args(args: argparse.Namespace):
    sizes = parse_sizes(reductions=args.reductions, samples_per_class=args.samples_per_class)
    return FinetuneConfig(
        data=args.data, encoders=args.encoders or ["random"], backbone=args.backbone, sizes=sizes,
        folds=args.folds, seeds=args.seeds, val_fraction=args.val_fraction, epochs=args.epochs,
        frozen_epochs=args.frozen_epochs, lr=args.lr, weight_decay=args.weight_decay,
        batch_size=args.batch_size, img_size=args.img_size, in_chans=args.in_chans,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent, asha=args.asha, search_target_auc=args.search_target_auc,
        search_margin=args.search_margin, search_candidates=args.search_candidates, storage=args.storage,
        experiment=args.experiment, address=args.address, tracking_uri=args.tracking_uri,
        metrics_ci=args.metrics_ci, protocol=args.protocol,
        recipes=[r.to_text() for r in parse_recipes(args.recipes)] if args.recipes else None,
        bn_recalibrate=args.bn_recalibrate, stopping=args.stopping, patience=args.patience,
        min_delta=args.min_delta, extend_epochs=args.extend_epochs,
    )


def run(args: argparse.Namespace) -> int:
    from ray_jobs.finetune.study import run_study

    result = run_study(config_from_args(args))
    print(result.summary_markdown())
    return 0

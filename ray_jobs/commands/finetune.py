"""``ctssl finetune``: the fine-tuning study (encoders x training-set sizes x folds) as a Ray Tune sweep."""

from __future__ import annotations

import argparse
import dataclasses

from ctssl_base import settings
from ray_jobs.finetune.config import DEFAULT_SAMPLES_PER_CLASS, FinetuneConfig, parse_sizes

#: the defaults the description quotes (the flags and their help come from FinetuneConfig's table)
D = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
LR = f"{D['lr']:.0e}".replace("e-0", "e-")  # 1e-4, as the papers write it
SIZES = ",".join(map(str, DEFAULT_SAMPLES_PER_CLASS))

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of FinetuneConfig's table, then the two ways of naming training-set sizes."""
    settings.add_flags(p, FinetuneConfig)
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--reductions", metavar="PCTS",
                       help="training-set sizes as %% of training images removed, e.g. 0,25,50,75,90")
    sizes.add_argument("--samples-per-class", metavar="NS",
                       help="training-set sizes as images per class, e.g. 5,10,20,40,60,100,all "
                            f"(default {SIZES}, as in a study file)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return settings.from_args(FinetuneConfig, args, encoders=args.encoders or ["random"],
                              sizes=parse_sizes(reductions=args.reductions, samples_per_class=args.samples_per_class))


def run(args: argparse.Namespace) -> int:
    from ray_jobs.finetune.study import run_study

    result = run_study(config_from_args(args))
    print(result.summary_markdown())
    return 0

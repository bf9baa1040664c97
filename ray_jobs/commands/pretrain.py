"""``ctssl pretrain``: self-supervised pre-training on Ray Train (DDP) or, for one local worker, in this
process; data streamed from Parquet shards."""

from __future__ import annotations

import argparse

from ctssl_base.errors import UserError
from ray_jobs.pretrain.config import RUNNERS, PretrainConfig, parse_duration, parse_method_options, parse_monitor_every
from ssl_core.methods import METHOD_NAMES

NAME = "pretrain"
HELP = "pre-train an encoder with BYOL / MoCo v2 / SwAV / SparK on Ray Train"
DESCRIPTION = """\
Pre-train a timm CNN with a self-supervised method on the slices of a prep output (or a selection of
it), with N data-parallel Ray Train workers; one worker on this machine (no --address, no
$RAY_ADDRESS) trains in this process, without starting Ray (--runner). Checkpoints go to --storage
every --checkpoint-every steps and at the end; rerunning with the same --experiment resumes from the
latest checkpoint. Metrics and the final encoder (timm layout) are logged to MLflow.

Example:
  ctssl pretrain --method byol --data s3://bucket/lidc --backbone resnet50 --workers 4 \\
      --gpus-per-worker 1 --epochs 100 --batch-size 256 --storage s3://bucket/runs --experiment byol-r50
  ctssl pretrain --method spark --data ./shards --backbone resnet18 --img-size 160 --time-budget 12m \\
      --storage ./runs --experiment spark-12m
  ray job submit --working-dir . -- ctssl pretrain ... --address auto
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help=" | ".join(METHOD_NAMES))
    p.add_argument("--data", required=True, metavar="URL", help="prep output folder (local path or s3://)")
    p.add_argument("--selection", metavar="URL", help="a selection (reduction output) of --data to train on")
    p.add_argument("--backbone", default="resnet50", metavar="NAME", help="timm model name (default resnet50)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="Ray Train workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="GPUs per worker (default 0)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs per worker (default 1)")
    p.add_argument("--runner", default="auto", choices=RUNNERS,
                   help="where training runs: in this process (one worker, no Ray Train start-up or "
                        "background processes), on Ray Train workers, or auto (default: in this process "
                        "for --workers 1 without --address / $RAY_ADDRESS, else Ray Train)")
    p.add_argument("--placement-strategy", default="PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
                   help="how workers are placed on nodes (default PACK)")
    p.add_argument("--epochs", type=int, metavar="E",
                   help="epochs to train (default 100); with --time-budget or --max-steps an upper bound "
                        "(default: none)")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="train for this long, e.g. 90s, 12m, 1.5h or plain seconds, then write the final "
                        "checkpoint. Counts the training loop only, from its first step (Ray and worker "
                        "start-up are not counted); lr, weight decay, EMA momentum, warm-up and the other "
                        "schedules run from start to end over the budget; a resumed run continues it")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="train for N optimiser steps (schedules end there); with --time-budget whichever "
                        "comes first")
    p.add_argument("--keep-at-fractions", metavar="F,F,...",
                   help="budget curve: also keep a checkpoint with the encoder at these fractions of the "
                        "budget (steps, or training time with --time-budget), e.g. 0.125,0.25,0.5,1, under "
                        "STORAGE/NAME/milestones, outside the checkpoint rotation; a resumed run keeps them")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="global batch size over all workers (default: sized from the pool: the largest "
                        "power of two <= slices/32, within 32..256, a multiple of --workers)")
    p.add_argument("--storage", required=True, metavar="URL", help="checkpoint folder (local path or s3://)")
    p.add_argument("--experiment", required=True, metavar="NAME",
                   help="run name: checkpoints under STORAGE/NAME, MLflow experiment NAME; rerun resumes")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster: ray://host:10001, auto, or local (default: $RAY_ADDRESS, else local)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite under a local --storage)")
    p.add_argument("--img-size", type=int, metavar="S", help="training resolution (default: the shards' size)")
    p.add_argument("--in-chans", type=int, default=1, choices=(1, 3),
                   help="1 = one HU window, 3 = three CT windows as channels")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="K", help="steps between checkpoints")
    p.add_argument("--max-failures", type=int, default=3, metavar="F",
                   help="worker failures to recover from (restart from the last checkpoint)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the method's, scaled by batch size)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default: the method's)")
    p.add_argument("--warmup-epochs", type=float,
                   help="linear warm-up epochs (default: the method's; with --time-budget at most 10 %% of "
                        "the budget)")
    p.add_argument("--steps-per-epoch", type=int, metavar="N", help="cap on steps per epoch (default: one pass)")
    p.add_argument("--shuffle-buffer", type=int, default=1024, metavar="ROWS", help="per-worker shuffle buffer")
    p.add_argument("--cache-mb", type=int, default=512, metavar="MB",
                   help="keep each worker's epoch in memory when it fits, skipping the data pipeline's "
                        "per-epoch start-up (0 = always stream)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, metavar="STEPS", help="steps between MLflow flushes")
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="method constructor option, e.g. queue_size=1024 (repeatable)")
    p.add_argument("--monitor-data", metavar="URL",
                   help="a labelled prep output: probe the encoder while it trains (k-NN AUC, embedding "
                        "spread) on the training and validation slices of one patient-level fold, logged "
                        "to MLflow as probe.* step metrics")
    p.add_argument("--monitor-every", metavar="N|DURATION",
                   help="probe every N steps (default 100) or every DURATION of training, e.g. 5m; also at "
                        "step 0 and at the last step")
    p.add_argument("--monitor-k", type=int, default=20, metavar="K", help="neighbours of the k-NN probe (default 20)")
    p.add_argument("--monitor-slices", type=int, default=256, metavar="N",
                   help="labelled slices the probe embeds at most (default 256)")


def config_from_args(args: argparse.Namespace):
    every_steps, every_s = parse_monitor_every(args.monitor_every) if args.monitor_every else (None, None)
    return PretrainConfig(
        method=args.method, data=args.data, selection=args.selection, backbone=args.backbone,
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        placement_strategy=args.placement_strategy, runner=args.runner,
        epochs=args.epochs, batch_size=args.batch_size, storage=args.storage, experiment=args.experiment,
        address=args.address, tracking_uri=args.tracking_uri, img_size=args.img_size, in_chans=args.in_chans,
        checkpoint_every=args.checkpoint_every, max_failures=args.max_failures, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, steps_per_epoch=args.steps_per_epoch,
        shuffle_buffer=args.shuffle_buffer, cache_mb=args.cache_mb, seed=args.seed, log_every=args.log_every,
        time_budget_s=parse_duration(args.time_budget) if args.time_budget is not None else None,
        max_steps=args.max_steps, method_options=parse_method_options(args.method_option),
        monitor_data=args.monitor_data, monitor_every=every_steps, monitor_every_s=every_s,
        monitor_k=args.monitor_k, monitor_slices=args.monitor_slices,
        keep_at_fractions=_fractions(args.keep_at_fractions),
    )


def _fractions(text: str | None) -> list[float]:
    """``0.125,0.25,1`` -> [0.125, 0.25, 1.0]; PretrainConfig.validate checks range and order."""

    if not text:
        return []
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise UserError(f"--keep-at-fractions: not a comma-separated list of numbers: {text!r}") from e


def run(args: argparse.Namespace) -> int:
    from ray_jobs.pretrain.driver import run_pretrain

    result = run_pretrain(config_from_args(args))
    print(f"pre-training finished: {result.summary()}")
    return 0

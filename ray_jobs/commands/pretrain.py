"""``ctssl pretrain``: self-supervised pre-training on Ray Train (DDP) or, for one local worker, in this
process; data streamed from Parquet shards."""

from __future__ import annotations

import argparse

from ctssl_base import settings
from ray_jobs.pretrain.config import (
    DEFAULT_MONITOR_EVERY,
    PretrainConfig,
    parse_method_options,
    parse_monitor_every,
)

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
    """The flags of PretrainConfig's table, then the two whose text the command parses itself."""
    settings.add_flags(p, PretrainConfig)
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="method constructor option, e.g. queue_size=1024 (repeatable)")
    p.add_argument("--monitor-every", metavar="N|DURATION",
                   help=f"probe every N steps (default {DEFAULT_MONITOR_EVERY}) or every DURATION of training, "
                        "e.g. 5m; also at step 0 and at the last step")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    every_steps, every_s = parse_monitor_every(args.monitor_every) if args.monitor_every else (None, None)
    return settings.from_args(PretrainConfig, args, method_options=parse_method_options(args.method_option),
                              monitor_every=every_steps, monitor_every_s=every_s)


def run(args: argparse.Namespace) -> int:
    from ray_jobs.pretrain.driver import run_pretrain

    result = run_pretrain(config_from_args(args))
    print(f"pre-training finished: {result.summary()}")
    return 0

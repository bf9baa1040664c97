"""``ctssl reduce``: remove redundant slices from a prep output before pre-training."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Any

from data_prep.reduce import STRATEGIES, get_strategy, reduce_dataset
from data_prep.reduce.report import local_copies
from ray_jobs import tracking
from ray_jobs.names import check_experiment_name
from ray_jobs.tracking import check_tracking_uri

log = logging.getLogger(__name__)

NAME = "reduce"
HELP = "dataset reduction: keep a non-redundant subset of a prep output (hash, SSIM, MI, embeddings, every-n)"
DESCRIPTION = """\
Select the slices of a prep output worth pre-training on and commit the selection at DST as a
manifest over SRC's shards (no pixel copies); DST is then usable wherever a prep output is.
The report (kept fraction overall and per series, threshold, time, examples.png with removed
near-duplicates next to the slice that caused their removal) goes to DST/report/ and, with a
tracking URI, to MLflow.

Strategies (see docs/reduction.md):
  every_n      keep slices 0, n, 2n, ... of each series            --threshold n (>= 1)
  hash         dhash + Hamming distance, the paper's greedy        --threshold max distance (0..64, default 6)
               --scope volume (per series, default) | global (whole dataset, multi-index hash)
  ssim         drop if SSIM to the last kept slice > threshold      --threshold (-1..1, default 0.9)
  mutual_info  same with normalised mutual information             --threshold (0..1, default 0.6)
  embedding    same with cosine similarity of encoder features     --threshold (-1..1, default 0.95)
               --mode kcenter: k-center-greedy diverse subset (threshold = kept fraction)
Instead of --threshold, --target-fraction F searches the threshold that keeps F of the slices.

Examples:
  ctssl reduce data/prep data/prep-hash6 --strategy hash
  ctssl reduce s3://bucket/prep s3://bucket/prep-ssim50 --strategy ssim --target-fraction 0.5
  ctssl reduce data/prep data/prep-kc --strategy embedding --mode kcenter --target-fraction 0.25 \\
      --model resnet18 --checkpoint encoder.pt --tracking-uri sqlite:///mlflow.db
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="prep output (or selection) URL: path, file:// or s3://")
    p.add_argument("dst", metavar="DST", help="where to commit the selection (a new folder/prefix)")
    p.add_argument("--strategy", required=True, metavar="NAME",
                   help=f"one of: {', '.join(sorted(STRATEGIES))}")
    p.add_argument("--threshold", type=float, default=None,
                   help="the strategy's threshold (default: the strategy's default)")
    p.add_argument("--target-fraction", type=float, default=None, metavar="F",
                   help="search the threshold that keeps this fraction of the slices (within --tolerance)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="allowed |kept fraction - target| for --target-fraction (default 0.01)")
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow tracking URI: log the report there (default $MLFLOW_TRACKING_URI, else none)")
    p.add_argument("--experiment", default="ctssl-reduce", help="MLflow experiment name (default ctssl-reduce)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = p.add_argument_group("strategy options")
    for cls in STRATEGIES.values():
        cls.add_arguments(group)


def run(args: argparse.Namespace) -> int:
    check_experiment_name(args.experiment)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:  # before the reduction runs, not after it
        check_tracking_uri(uri, "--tracking-uri" if args.tracking_uri else "$MLFLOW_TRACKING_URI")
    options = get_strategy(args.strategy).options_from_args(args)
    summary = reduce_dataset(args.src, args.dst, args.strategy, threshold=args.threshold,
                             target_fraction=args.target_fraction, options=options,
                             tolerance=args.tolerance, progress=not args.no_progress,
                             inputs=strategy_inputs(args.strategy, options))
    if uri:
        run_id = log_to_mlflow(uri, args.experiment, summary)
        print(f"MLflow run {run_id} in experiment {args.experiment}")
    if summary.get("target_warning"):
        print(f"warning: {summary['target_warning']}")
    print(f"kept {summary['kept']} of {summary['total']} slices ({summary['kept_fraction']:.4f}) with "
          f"{summary['threshold_name']} = {summary['threshold']}; selection committed at {args.dst}; "
          f"report: {summary['report_files']['report.md']}")
    return 0


def strategy_inputs(strategy: str, options: dict[str, Any]) -> dict[str, Any]:
    """What a strategy needs built outside the data layer: the embedding strategy's encoder, loaded
    here from its recorded options (model, checkpoint, size, batch size, windows) and handed in."""
    if strategy != "embedding":
        return {}
    from ssl_core.slice_embedder import SliceEmbedder

    return {"embedder": SliceEmbedder.from_options(options)}


def log_to_mlflow(tracking_uri: str, experiment: str, summary: dict) -> str:
    """One MLflow run per reduction: params, metrics and the report files as artifacts."""

    cl = tracking.client(tracking_uri)
    exp_id = tracking.get_or_create_experiment(cl, experiment)
    run = cl.create_run(exp_id, run_name=f"reduce-{summary['strategy']}", tags={tracking.TAG_KIND: "reduce"})
    rid = run.info.run_id
    params = {"strategy": summary["strategy"], "threshold": summary["threshold"], "source": summary["source"],
              "target_fraction": summary["target_fraction"], **{f"opt.{k}": v for k, v in summary["options"].items()}}
    tracking.log_params(cl, rid, params)
    for key in ("kept_fraction", "kept", "total", "series", "seconds_total", "seconds_features",
                "seconds_select", "slices_per_second"):
        cl.log_metric(rid, key, float(summary[key]))
    with tempfile.TemporaryDirectory() as tmp:
        tracking.log_artifacts(cl, rid, local_copies(summary["report_files"], tmp), artifact_path="reduce_report")
    cl.set_terminated(rid)
    return rid

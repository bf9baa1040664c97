"""``ctssl report``: the study's answer (which method, how many labels) built from MLflow alone."""

from __future__ import annotations

import argparse
import os

from ctssl_base.errors import UserError
from ray_jobs import tracking
from ray_jobs.names import check_experiment_name

NAME = "report"
HELP = "report of a fine-tuning study from MLflow: tables, AUC-vs-size plot, Wilcoxon tests"
DESCRIPTION = """\
Read a fine-tuning study's runs from MLflow (so it works for a study run anywhere, e.g. on Kubernetes)
and write report.md, auc_vs_size.png and a self-contained report.html into --out: mean +- std over
folds of AUC / F1 / accuracy per encoder x size, AUC against training-set size per method with fold
spread, the paired Wilcoxon test of each method against the random-init baseline per size, and each
method's minimal samples per class. A study evaluated by the linear probe alone (its finetune.evaluation:
linear) gets the linear probe's tables instead: AUC per encoder x size and each encoder's paired
difference to the baseline over the same folds x seeds.

With --maps-data and --maps-pool (the labelled and the pre-training prep outputs) the report also
draws "What the encoders learned": a PCA map of the labelled slices per frozen encoder (each
--maps-encoder, NAME=SOURCE as `ctssl finetune --encoder` takes it, and random init for reference)
and each encoder's nearest pool slices of a few labelled ones. A study's report stage draws them
by itself (report.embeddingMaps).

Example:
  ctssl report --experiment covid-study --tracking-uri http://mlflow:5000 --out report/
  ctssl report --experiment covid-study --tracking-uri http://mlflow:5000 --out s3://bucket/covid/report
  ctssl report --experiment covid-study --out report/ --maps-data s3://b/labelled --maps-pool s3://b/pool \
      --maps-encoder simclr=s3://b/runs/simclr
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, metavar="NAME", help="study name (MLflow experiment)")
    p.add_argument("--study-run", metavar="RUN_ID", help="parent run of the study (default: the latest)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--storage", metavar="URL",
                   help="the study's --storage, to find its default SQLite tracking store when no URI is given")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: a local path or a storage URL such as s3://bucket/study/report")
    p.add_argument("--baseline", default="random", help="encoder the Wilcoxon tests compare against")
    p.add_argument("--target-auc", type=float, help="AUC a size must reach (default: the study's setting)")
    p.add_argument("--margin", type=float, help="allowed AUC gap to full data (default: the study's setting)")
    maps = p.add_argument_group("embedding maps (optional)")
    maps.add_argument("--maps-data", metavar="URL", help="labelled prep output: draw the embedding maps of its slices")
    maps.add_argument("--maps-pool", metavar="URL", help="pre-training pool the nearest neighbours are drawn from")
    maps.add_argument("--maps-encoder", action="append", default=[], metavar="NAME=SOURCE",
                      help="a pre-trained encoder to map (repeatable; random init is always mapped for reference)")


def _maps_input(args: argparse.Namespace):  # noqa: ANN202 - embedding_maps.MapsInput or None
    """The embedding maps the flags ask for; None without --maps-data. One line naming the flag missing."""

    if not args.maps_data:
        if args.maps_pool or args.maps_encoder:
            raise UserError("--maps-pool/--maps-encoder need --maps-data (the labelled prep output to map)")
        return None
    if not args.maps_pool:
        raise UserError("--maps-data needs --maps-pool (the pre-training pool the nearest neighbours come from)")

    from ray_jobs.finetune.frozen_views import load_maps_data
    from ray_jobs.report.embedding_maps import MapsInput

    encoders = ["random", *(e for e in args.maps_encoder if e != "random")]
    return MapsInput(labelled=args.maps_data, pool=args.maps_pool, encoders=encoders,
                     tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
                     load=load_maps_data)


def run(args: argparse.Namespace) -> int:
    from ray_jobs.report.build import ReportConfig, build_report

    check_experiment_name(args.experiment)

    if args.tracking_uri:  # checked here to name the flag; $MLFLOW_TRACKING_URI is checked on use
        tracking.check_tracking_uri(args.tracking_uri)

    cfg = ReportConfig(experiment=args.experiment, out=args.out, study_run=args.study_run,
                       tracking_uri=args.tracking_uri, storage=args.storage, baseline=args.baseline,
                       target_auc=args.target_auc, margin=args.margin, embedding_maps=_maps_input(args))
    paths = build_report(cfg)
    print(f"report written: {paths.markdown}, {paths.html}, {paths.plot}")
    return 0

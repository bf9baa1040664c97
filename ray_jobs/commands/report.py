"""``ctssl report``: the study's answer (which method, how many labels) built from MLflow alone."""

from __future__ import annotations

import argparse

NAME = "report"
HELP = "report of a fine-tuning study from MLflow: tables, AUC-vs-size plot, Wilcoxon tests"
DESCRIPTION = """\
Read a fine-tuning study's runs from MLflow (so it works for a study run anywhere, e.g. on Kubernetes)
and write report.md, auc_vs_size.png and a self-contained report.html into --out: mean +- std over
folds of AUC / F1 / accuracy per encoder x size, AUC against training-set size per method with fold
spread, the paired Wilcoxon test of each method against the random-init baseline per size, and each
method's minimal samples per class.

Example:
  ctssl report --experiment covid-study --tracking-uri http://mlflow:5000 --out report/
  ctssl report --experiment covid-study --tracking-uri http://mlflow:5000 --out s3://bucket/covid/report
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


def run(args: argparse.Namespace) -> int:
    from ray_jobs import tracking
    from ray_jobs.names import check_experiment_name
    from ray_jobs.report.build import ReportConfig, build_report

    check_experiment_name(args.experiment)

    if args.tracking_uri:  # checked here to name the flag; $MLFLOW_TRACKING_URI is checked on use
        tracking.check_tracking_uri(args.tracking_uri)

    cfg = ReportConfig(experiment=args.experiment, out=args.out, study_run=args.study_run,
                       tracking_uri=args.tracking_uri, storage=args.storage, baseline=args.baseline,
                       target_auc=args.target_auc, margin=args.margin)
    paths = build_report(cfg)
    print(f"report written: {paths.markdown}, {paths.html}, {paths.plot}")
    return 0

"""``ctssl study validate|plan|run -f study.yaml``: a whole study from one spec file, as one Ray driver."""

from __future__ import annotations

import argparse
import json
import shutil

from ctssl_base import storage
from ctssl_base.errors import UserError
from ray_jobs import tracking
from ray_jobs.study import runner, spec
from ray_jobs.study.runner import SENTINEL, STORAGE_OUTPUTS, WORKDIR_OUTPUTS
from ray_jobs.tracking import redact_uri

NAME = "study"
HELP = "check or run a whole study (data -> reduction -> pre-training -> fine-tuning -> report) from one file"
DESCRIPTION = """\
A study file (apiVersion: ctssl/v1, kind: Study) holds everything a study is: the data, the reduction
levels, the pre-training methods, the fine-tuning study, the resources, MLflow and the storage root.
Examples: examples/*.yaml; every key: docs/study-spec.md.

  ctssl study validate -f study.yaml            # check it (errors name the line and the key)
  ctssl study validate -f study.yaml --print    # ... and show it with every default filled in
  ctssl study plan -f study.yaml                # what it will cost: work, time, GPU-hours, storage
  ctssl study run -f study.yaml                 # on this machine (a private local Ray)
  ctssl study run -f study.yaml --address ray://head:10001
  ray job submit --working-dir . -- ctssl study run -f study.yaml   # on a Ray cluster

A rerun reuses every finished stage (markers under the storage root); a changed setting redoes that
stage and the stages after it that depend on it, and says so.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    v = sub.add_parser("validate", help="check a study file against the schema and its rules")
    v.add_argument("-f", "--file", required=True, help="the study file (YAML)")
    v.add_argument("--print", action="store_true", help="print the study with its defaults filled in (JSON)")
    r = sub.add_parser("run", help="run (or resume) a study")
    r.add_argument("-f", "--file", required=True, help="the study file (YAML)")
    r.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a private local Ray)")
    r.add_argument("--until", metavar="STAGE",
                   help="run the stages up to this one and stop (e.g. prep-pretrain, reduce-hash6; `ctssl study "
                        "validate` lists them); the next run reuses what finished")
    r.add_argument("--fresh", action="store_true",
                   help="first delete what earlier runs of this study wrote (only in roots holding its sentinel)")
    pl = sub.add_parser("plan", help="what the study will cost before it runs: work, wall time, GPU-hours, "
                                     "peak GPUs and storage per stage")
    pl.add_argument("-f", "--file", required=True, help="the study file (YAML)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                    help="plan on CPUs or GPUs (default: as resources.gpusPerWorker says; auto -> CPU unless "
                         "--max-gpus or $CTSSL_AUTOSCALER_MAX_GPUS says the cluster may add GPUs)")
    pl.add_argument("--gpu-type", help="the calibrated GPU type to plan on (default: the first measured, h200)")
    pl.add_argument("--max-gpus", type=int, help="GPUs the autoscaler may add at most (default "
                                                 "$CTSSL_AUTOSCALER_MAX_GPUS)")
    pl.add_argument("--cpus", type=int, help="CPUs for in-process pre-training and CPU trials (default 2, the "
                                             "calibration machine)")
    pl.add_argument("--slices", action="append", metavar="ROLE=N",
                    help="slices of a source the plan cannot count (pretrain=N, labelled=N; committed shards "
                         "are counted instead)")
    pl.add_argument("--classes", type=int, help="classes of the labelled set, where they cannot be read")
    pl.add_argument("--no-storage", action="store_true",
                    help="plan from the file alone: read no shards (of the storage root or a shards source) and no "
                         "stage markers")
    sch = sub.add_parser("schema", help="print the JSON Schema of study files")
    sch.add_argument("--reference", action="store_true", help="print the key table of docs/study-spec.md instead")


def run(args: argparse.Namespace) -> int:
    if args.study_command == "schema":
        print(spec.reference_markdown() if args.reference else json.dumps(spec.schema(), indent=2))
        return 0
    study = spec.load(args.file)
    if args.study_command == "plan":
        from ray_jobs.study import plan

        opts = plan.Options(device=args.device, gpu_type=args.gpu_type, max_gpus=args.max_gpus, cpus=args.cpus,
                            slices=plan.parse_slices(args.slices), classes=args.classes, look=not args.no_storage)
        result = plan.make_plan(study, opts)
        print(json.dumps(result.to_json(), indent=2) if args.json else result.text())
        return 0
    if args.study_command == "validate":
        if args.print:
            print(json.dumps({"apiVersion": spec.API_VERSION, "kind": "Study", "metadata": {"name": study.name},
                              "spec": study.spec}, indent=2))
        else:
            from ray_jobs.study.stages import plan

            names = [s.name for s in plan(study)]
            print(f"{args.file}: valid study {study.name!r}: {len(names)} stages ({', '.join(names)})")
        return 0
    return run_study(study, args.address, fresh=args.fresh, until=args.until)


def run_study(study, address: str | None, *, fresh: bool = False, until: str | None = None) -> int:
    """Run ``study`` and print where its results are (shared with ``ctssl demo``)."""

    if fresh:
        _clean(study)
    res = runner.run(study, address, until)
    if until is not None and until != "report":
        print(f"\nstudy {study.name}: stopped after stage {until} (--until); run it again without --until to go on")
        return 0
    rep = res["report"]
    print(f"\nstudy {study.name} finished.")
    print(f"  report:    {rep['markdown']}")
    print(f"             {rep['html']}")
    if rep.get("uploaded"):
        print(f"             {rep['uploaded']}/report.html")
    uri = study.spec["tracking"]["uri"] or _tracking(study)

    print(f"  MLflow:    experiment {study.name!r} at {redact_uri(uri)}")
    if uri.startswith("sqlite:"):
        print(f"  MLflow UI: {shutil.which('mlflow') or 'mlflow'} ui --backend-store-uri {uri} "
              "--host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000")
    return 0


def _tracking(study) -> str:
    return tracking.resolve_tracking_uri(None, study.storage)


def _clean(study) -> None:
    """Delete what the study's stages wrote, under its storage root and its workdir, and nothing else.

    A root is touched only when it holds the sentinel naming this study (written by its first run), so
    ``storage: /data`` beside a DICOM archive or ``workdir: ~`` loses no file ctssl did not make.
    """

    for url, key in ((study.storage, "storage"), (str(study.workdir.resolve()), "workdir")):
        fs, root = storage.open_fs(url)
        if not fs.exists(root) or not fs.ls(root):
            continue  # nothing there yet
        try:
            owner = storage.read_json(fs, storage.join(root, SENTINEL)).get("study")
        except (FileNotFoundError, ValueError, AttributeError):
            owner = None
        if owner != study.name:
            raise UserError(f"--fresh: {key} {url} has no {SENTINEL} naming study {study.name!r}: "
                            "not a folder this study made; nothing deleted")
    for url, outputs in ((study.storage, STORAGE_OUTPUTS), (str(study.workdir.resolve()), WORKDIR_OUTPUTS)):
        fs, root = storage.open_fs(url)
        for name in outputs:
            path = storage.join(root, name)
            if fs.exists(path):
                fs.rm(path, recursive=True)

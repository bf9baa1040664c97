"""A finished small fine-tuning study, tracked in a SQLite MLflow store, with its report built.

The browser checks need what a user has after ``ctssl finetune`` + ``ctssl report``: a parent run,
its child trials tagged method/size/fold, and ``report.html``. It is made with the real study driver
on a local Ray, only shrunk (2 encoders x 2 sizes x 2 folds, 1 epoch, 32 px), so the UI shows the
same runs and tags a real study would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ray_jobs.finetune.config import FinetuneConfig, parse_sizes
from ray_jobs.finetune.study import run_study
from ray_jobs.report.build import ReportConfig, build_report
from tests.ray_jobs.tiny_data import write_tiny_dataset

EXPERIMENT = "e2e-ui-study"
MODEL = f"{EXPERIMENT}-seeded"  # registered as a study registers its encoders: <study>-<encoder>
ENCODERS = ("random", "seeded")
SIZES = ("n2", "all")
FOLDS = 2


@dataclass(frozen=True)
class ChildRun:
    run_id: str
    name: str
    method: str
    size: str
    fold: str


@dataclass(frozen=True)
class FinishedStudy:
    db: Path
    experiment_id: str
    parent_run_id: str
    parent_name: str
    children: tuple[ChildRun, ...]
    report_html: Path
    seconds: float
    model_version: str = ""  # version of MODEL registered from the encoder's run


def _seeded_encoder(folder: Path) -> Path:
    """An encoder folder as pre-training leaves it (encoder.pt in timm layout + encoder_config.json)."""
    from ssl_core.backbones import create_backbone, export_encoder_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    torch.save(export_encoder_state_dict(create_backbone("resnet18", in_chans=1)), folder / "encoder.pt")
    (folder / "encoder_config.json").write_text(json.dumps({"backbone": "resnet18", "in_chans": 1,
                                                            "method": "seeded"}))
    return folder


def _local_ray() -> bool:
    """Start a local Ray unless this process is already connected; True if we started it."""
    import ray

    from ctssl_base.ray_connect import forwarded_env

    if ray.is_initialized():
        return False
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": forwarded_env()})
    return True


def create_store(db: Path) -> None:
    """Create the SQLite tracking schema now, so a server and the study can then share the file."""
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()


def make_finished_study(root: Path, db: Path) -> FinishedStudy:
    t0 = time.time()
    data = root / "labelled"
    write_tiny_dataset(str(data), patients=8, slices=3, size=32, source="e2e", seed=7)  # 4 disk + 4 square
    uri = f"sqlite:///{db}"
    cfg = FinetuneConfig(
        data=str(data), storage=str(root / "tune"), experiment=EXPERIMENT,
        encoders=["random", f"seeded={_seeded_encoder(root / 'encoder')}"], backbone="resnet18",
        sizes=parse_sizes(samples_per_class=",".join(s.lstrip("n") for s in SIZES)), folds=FOLDS, seeds=[0],
        epochs=1, frozen_epochs=0, batch_size=8, tracking_uri=uri, max_concurrent=2,
    )
    started = _local_ray()
    try:
        res = run_study(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    assert (res.trials, res.failed) == (len(ENCODERS) * len(SIZES) * FOLDS, 0), res
    version = register_encoder(root, uri, root / "encoder")
    return describe_study(root, db, res.parent_run_id, seconds=time.time() - t0, model_version=version)


def register_encoder(root: Path, uri: str, folder: Path) -> str:
    """The seeded encoder as pre-training leaves it in MLflow: a run holding the encoder folder as its
    ``encoder`` artifact, registered as a model version (the same helper a pre-training run uses)."""
    from ray_jobs import tracking

    cl = tracking.client(uri)
    exp = tracking.get_or_create_experiment(cl, f"{EXPERIMENT}-pretrain", (root / "artifacts").as_uri())
    run_id = cl.create_run(exp, run_name="seeded-pretrain", tags={tracking.TAG_STAGE: "pretrain"}).info.run_id
    tracking.log_artifacts(cl, run_id, [str(p) for p in sorted(folder.iterdir())], tracking.ENCODER_ARTIFACT)
    version = tracking.register_artifact(cl, MODEL, run_id, description="seeded resnet18 encoder")
    cl.set_terminated(run_id, status="FINISHED")
    return str(version.version)


def describe_study(root: Path, db: Path, parent_run_id: str, seconds: float = 0.0,
                   model_version: str = "") -> FinishedStudy:
    """What the UI should show for a study in ``db``: its runs and tags; builds the report into ``root``."""
    import mlflow

    uri = f"sqlite:///{db}"
    cl = mlflow.MlflowClient(uri)
    parent = cl.get_run(parent_run_id)
    runs = cl.search_runs([parent.info.experiment_id],
                          filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=100)
    children = tuple(sorted((ChildRun(r.info.run_id, r.info.run_name, r.data.tags["method"], r.data.tags["size"],
                                      r.data.tags["fold"]) for r in runs), key=lambda c: c.name))
    paths = build_report(ReportConfig(experiment=EXPERIMENT, out=str(root / "report"), tracking_uri=uri))
    return FinishedStudy(db=db, experiment_id=parent.info.experiment_id, parent_run_id=parent_run_id,
                         parent_name=parent.info.run_name, children=children,
                         report_html=Path(paths.html), seconds=seconds, model_version=model_version)

"""The MLflow side of a pre-training run: its run (found again on a rerun), its dataset input, the
encoder logged as artifacts at the end and registered as a model version.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

from ray_jobs import tracking
from ray_jobs.pretrain import checkpoint as ckpt_io
from ray_jobs.pretrain.config import PretrainConfig
from ray_jobs.pretrain.data import DataInfo

log = logging.getLogger(__name__)


def open_run(cfg: PretrainConfig, info: DataInfo, tracking_uri: str, img_size: int, spe: int,
                opts: dict, extra_params: dict | None = None) -> str:
    """The run of this experiment (reused when the same --experiment is rerun, so curves continue).

    It lives in ``cfg.mlflow_experiment`` (default: the --experiment name). The run key is the Ray
    experiment's folder (``storage/experiment``), so a restarted driver finds its run again even when
    other pre-training runs of a study share the MLflow experiment. ``cfg.tags`` are set on the run
    (again on a resume, so tags added since are there too), and the shards it trains on are its
    dataset input."""
    cl = tracking.client(tracking_uri)
    exp_id = tracking.get_or_create_experiment(
        cl, cfg.mlflow_experiment_name, tracking.default_artifact_location(tracking_uri, cfg.storage))
    key = f"{cfg.storage.rstrip('/')}/{cfg.experiment}"
    extra_tags = tracking.check_tags(cfg.tags, "pre-training tags")
    found = tracking.find_run(cl, exp_id, {tracking.TAG_RUN_KEY: key})
    if found is not None:
        log.info("resuming MLflow run %s", found.info.run_id)
        if found.info.status != "RUNNING":
            cl.update_run(found.info.run_id, status="RUNNING")
        if extra_tags:
            tracking.set_tags(cl, found.info.run_id, extra_tags)
        log_dataset(cl, found.info.run_id, info)
        return found.info.run_id
    tags = {tracking.TAG_STAGE: "pretrain", "method": cfg.method, "backbone": cfg.backbone, "dataset": info.dataset,
            "selection": cfg.selection or "none", **extra_tags, tracking.TAG_KIND: "pretrain",
            tracking.TAG_RUN_KEY: key}
    run = cl.create_run(exp_id, run_name=f"{cfg.method}-{cfg.backbone}-{cfg.experiment}", tags=tags)
    params = {**cfg.as_params(), "img_size_effective": img_size, "steps_per_epoch": spe, "rows": info.rows,
              "intensity": info.intensity, "method_options_effective": json.dumps(opts, sort_keys=True),
              **(extra_params or {})}
    tracking.log_params(cl, run.info.run_id, params)
    log_dataset(cl, run.info.run_id, info)
    return run.info.run_id


def log_dataset(cl, run_id: str, info: DataInfo) -> None:
    """The shards (and selection) the run trains on, as its MLflow dataset input (digest and counts from
    the manifests). Metadata only: a tracking server that cannot take it costs a warning, not the run."""
    try:
        tracking.log_dataset_input(cl, run_id, info.dataset, info.base_url, info.selection)
    except Exception as e:  # noqa: BLE001 - an older server without dataset inputs, a manifest race
        log.warning("could not log the pre-training data as the run's MLflow dataset input (%s)", e)


def register_encoder(cl, cfg: PretrainConfig, run_id: str) -> str | None:
    """Register the run's logged ``encoder`` folder as a version of ``cfg.register_as`` (None when not
    asked). One version per run: a rerun of the same experiment returns the version it made before.
    The folder is first made an MLflow PyTorch model too (:func:`tracking.register_pytorch_flavour`), so
    ``mlflow.pytorch.load_model`` of the version gives the encoder as a torch module."""
    if not cfg.register_as:
        return None
    tracking.register_pytorch_flavour(cl, run_id, tracking.ENCODER_ARTIFACT)
    tags = {"method": cfg.method, "backbone": cfg.backbone, tracking.TAG_RUN_KEY: f"{cfg.storage.rstrip('/')}/"
            f"{cfg.experiment}", **tracking.check_tags(cfg.tags, "pre-training tags")}
    version = tracking.register_artifact(cl, cfg.register_as, run_id, tracking.ENCODER_ARTIFACT, tags=tags)
    tracking.set_tags(cl, run_id, {"registered_model": cfg.register_as, "registered_version": version.version})
    return str(version.version)


def log_encoder(cl, run_id: str, checkpoint_dir: str) -> None:  # noqa: ANN001 - an MlflowClient
    """Log the checkpoint's encoder weights and config as the run's ``encoder`` artifacts (copies: the
    checkpoint folder may be a read-only download cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in (ckpt_io.ENCODER_FILE, ckpt_io.ENCODER_CONFIG_FILE):
            shutil.copy(os.path.join(checkpoint_dir, name), os.path.join(tmp, name))
        tracking.log_artifacts(cl, run_id, [os.path.join(tmp, ckpt_io.ENCODER_FILE),
                                            os.path.join(tmp, ckpt_io.ENCODER_CONFIG_FILE)], tracking.ENCODER_ARTIFACT)

"""The experiment config: defaults identical to the chart's, URLs derived from one storage root, and
bad values rejected with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray_jobs import experiment_config
from ray_jobs.errors import CLIError
from tests.charts.chart_support import experiment_from_render, render_objects

MINIMAL = {"storage": {"root": "s3://bkt/run1"}, "prep": {"source": "s3://raw/ct"},
           "finetune": {"data": "s3://bkt/labelled"}}


def test_defaults_are_the_charts_defaults() -> None:
    """A minimal hand-written config resolves to exactly what the chart renders for the same inputs."""
    chart = experiment_from_render(render_objects({
        "storage": {"bucket": "bkt", "prefix": "run1"}, "prep": {"source": "s3://raw/ct"},
        "finetune": {"data": "s3://bkt/labelled"}}, name="ctssl"))
    assert experiment_config.resolve(MINIMAL) == chart


def test_stage_urls_derive_from_the_storage_root() -> None:
    cfg = experiment_config.resolve({**MINIMAL, "name": "brain"})
    assert cfg["prep"]["output"] == "s3://bkt/run1/shards"
    assert cfg["reduce"]["output"] == "s3://bkt/run1/selection"
    assert cfg["pretrain"]["data"] == "s3://bkt/run1/shards"
    assert cfg["pretrain"]["storage"] == "s3://bkt/run1/pretrain"
    assert cfg["finetune"]["output"] == "s3://bkt/run1/finetune"
    assert cfg["report"]["output"] == "s3://bkt/run1/report"
    assert cfg["mlflow"]["trackingUri"] == "http://brain-mlflow:5000"
    assert experiment_config.resolve(cfg) == cfg


@pytest.mark.parametrize(("patch", "message"), [
    ({"storage": {"root": ""}}, "storage.root: is required"),
    ({"name": "A_Bad_Name"}, "name: must be a DNS label of at most 30 characters"),
    ({"name": "x" * 31}, "name: must be a DNS label of at most 30 characters"),
    ({"pretrain": {"methods": ["byol", "byol"]}}, "pretrain.methods: lists a method twice"),
    ({"pretrain": {"methods": ["simclr"]}}, "pretrain.methods: unknown method 'simclr'; known: byol, mocov2, swav, spark"),
    ({"ray": {"workers": {"replicas": -2}}}, "ray.workers.replicas: must be an integer >= 1, got -2"),
    ({"prep": {"numShards": 0}}, "prep.numShards: must be an integer >= 1, got 0"),
    ({"prep": {"source": "my folder"}}, "prep.source: must be an s3://, file:// or absolute path URL"),
    ({"finetune": {"data": ""}}, "finetune.data: is required when finetune.enabled"),
    ({"ray": {"head": {"shmSize": "big"}}}, "ray.head.shmSize: must be a Kubernetes quantity"),
    ({"ray": {"wrokers": {}}}, "experiment config: ray.wrokers: unknown key (known: head, initResources, submitter, version, workers)"),
])
def test_bad_values_are_rejected_naming_the_key(patch: dict, message: str) -> None:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for k, v in patch.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    with pytest.raises(CLIError) as err:
        experiment_config.resolve(raw)
    assert message in str(err.value)


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("storage: [unclosed")
    with pytest.raises(CLIError, match=f"^{path}: not valid YAML"):
        experiment_config.load(path)
    with pytest.raises(CLIError, match="cannot read experiment config"):
        experiment_config.load(tmp_path / "missing.yaml")

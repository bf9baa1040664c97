"""values.schema.json stops bad installs before anything is created, naming the key that is wrong."""

from __future__ import annotations

import copy

import pytest

from tests.charts.chart_support import CHART, ci_values

BASE = ci_values(CHART / "ci" / "cpu-small-values.yaml")


def _with(path: str, value) -> dict:
    values = copy.deepcopy(BASE)
    node = values
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return values


def _schema_error(values: dict) -> str:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(values, name="study", namespace="ml")  # install-time validation of merged values
    return str(err.value)


def test_the_ci_values_pass_the_schema() -> None:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        chart.validate_schema(chart.merge_values(BASE))


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("ray.gpuWorkers.maxReplicas", -1, "at '/ray/gpuWorkers/maxReplicas': minimum: got -1, want 0"),
    ("ray.gpuWorkers.gpus", 0, "at '/ray/gpuWorkers/gpus': minimum: got 0, want 1"),
    ("ray.cpuWorkers.replicas", 2, "at '/ray/cpuWorkers': additional properties 'replicas' not allowed"),
    ("ray.autoscaler.upscalingMode", "Fast", "at '/ray/autoscaler/upscalingMode'"),
    ("ray.authMode", "none", "at '/ray/authMode'"),
    ("rayJob.queueName", "Team A", "at '/rayJob/queueName'"),
    ("rayJob.backoffLimit", -1, "at '/rayJob/backoffLimit': minimum: got -1, want 0"),
    ("storage.bucket", "", "at '/storage/bucket': minLength: got 0, want 3"),
    ("storage.bucket", "My_Bucket", "at '/storage/bucket': 'My_Bucket' does not match pattern"),
    ("ray.gpuWorkers.shmSize", "lots", "at '/ray/gpuWorkers/shmSize': 'lots' does not match pattern"),
    ("securityContext.runAsUser", 0, "at '/securityContext/runAsUser': minimum: got 0, want 1"),
    ("deid.key", "", "at '/deid/key': minLength: got 0, want 1"),
])
def test_schema_rejects_bad_values_naming_the_key(path: str, value, expected: str) -> None:
    assert expected in _schema_error(_with(path, value))


def test_schema_requires_a_bucket_when_none_is_given() -> None:
    values = copy.deepcopy(BASE)
    del values["storage"]["bucket"]
    assert "at '/storage/bucket': minLength: got 0, want 3" in _schema_error(values)


def test_external_database_needs_its_secret() -> None:
    values = _with("postgresql.enabled", False)
    assert "at '/postgresql/external/existingSecret': minLength: got 0, want 1" in _schema_error(values)


def test_unknown_top_level_key_is_rejected() -> None:
    values = copy.deepcopy(BASE)
    values["pretrian"] = {"epochs": 3}
    assert "additional properties 'pretrian' not allowed" in _schema_error(values)


def test_longest_allowed_release_name_is_30_characters() -> None:
    assert "at '/fullnameOverride': maxLength: got 31, want 30" in _schema_error(_with("fullnameOverride", "s" * 31))


def test_the_removed_per_stage_values_are_rejected_by_name() -> None:
    """Values files of the per-stage chart (prep Job, one RayJob per method) fail loudly, not silently."""
    for key in ("prep", "pretrain", "finetune", "waitFor", "kuberay-operator"):
        values = copy.deepcopy(BASE)
        values[key] = {"enabled": True}
        assert f"additional properties '{key}' not allowed" in _schema_error(values)

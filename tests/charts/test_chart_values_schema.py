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
    ("pretrain.methods", ["byol", "simclr"], "at '/pretrain/methods/1': value must be one of 'byol', 'mocov2', 'swav', 'spark'"),
    ("ray.workers.replicas", -1, "at '/ray/workers/replicas': minimum: got -1, want 1"),
    ("prep.parallelism", -2, "at '/prep/parallelism': minimum: got -2, want 1"),
    ("prep.numShards", 0, "at '/prep/numShards': minimum: got 0, want 1"),
    ("ray.workers.gpus", -1, "at '/ray/workers/gpus': minimum: got -1, want 0"),
    ("storage.bucket", "", "at '/storage/bucket': minLength: got 0, want 3"),
    ("storage.bucket", "My_Bucket", "at '/storage/bucket': 'My_Bucket' does not match pattern"),
    ("pretrain.batchsize", 64, "at '/pretrain': additional properties 'batchsize' not allowed"),
    ("ray.workers.shmSize", "lots", "at '/ray/workers/shmSize': 'lots' does not match pattern"),
    ("securityContext.runAsUser", 0, "at '/securityContext/runAsUser': minimum: got 0, want 1"),
    ("prep.source", "", "at '/prep/source': minLength: got 0, want 1"),
    ("finetune.data", "", "at '/finetune/data': minLength: got 0, want 1"),
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


def test_longest_allowed_name_keeps_rayjob_names_within_kuberays_limit() -> None:
    from tests.charts.chart_support import render_objects, validation_errors

    longest = "s" * 30
    objs = render_objects({**_with("fullnameOverride", longest), "pretrain": {**BASE["pretrain"],
                                                                             "methods": ["mocov2"]}})
    names = [o["metadata"]["name"] for o in objs if o["kind"] == "RayJob"]
    assert max(len(n) for n in names) == len(f"{longest}-pretrain-mocov2") == 46  # KubeRay allows 47
    assert [e for o in objs for e in validation_errors(o)] == []
    assert "at '/fullnameOverride': maxLength: got 31, want 30" in _schema_error(_with("fullnameOverride", "s" * 31))

"""The chart runs the study exactly as ctssl defines it: one definition of the stages (ctssl's), one schema.

- the RayJob's entrypoint parses with the real `ctssl` parser and reads the file the head mounts from
  the study ConfigMap;
- the rendered study is the values' `study:` block, valid for `ctssl study validate`, with only the
  cluster's choices filled in where the study is silent;
- values.schema.json embeds ray_jobs/study/study.schema.json, so `helm install` rejects a bad study with
  the key's path;
- every `ctssl` command in NOTES.txt and docs/operations.md parses.
"""

from __future__ import annotations

import copy
import json
import re
import shlex

import pytest

from ray_jobs.cli import build_parser
from ray_jobs.study import spec
from tests.charts.chart_support import (
    CHART,
    CI_VALUES,
    REPO,
    VALUES_SCHEMA,
    ci_values,
    notes,
    render_ci,
    render_objects,
    study_objects,
    values_study_schema,
)

IDS = [p.stem for p in CI_VALUES]


@pytest.mark.parametrize("stem", IDS)
def test_the_entrypoint_runs_the_mounted_study_file_with_the_real_cli(stem: str) -> None:
    rj, _ = study_objects(render_ci(stem))
    argv = shlex.split(rj["spec"]["entrypoint"])
    ns = build_parser().parse_args(argv[1:])
    assert (argv[0], ns.command, ns.study_command, ns.file) == ("ctssl", "study", "run", "/etc/ctssl/study.yaml")
    assert ns.address is None  # the driver runs under `ray job submit`: RAY_ADDRESS names its cluster
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == ns.file)
    vol = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == f"{rj['metadata']['name']}-spec" and mount["subPath"] == "study.yaml"
    assert mount["readOnly"] is True


@pytest.mark.parametrize("stem", IDS)
def test_the_rendered_study_is_the_values_study_with_the_clusters_defaults(stem: str) -> None:
    values = ci_values(CHART / "ci" / f"{stem}.yaml")
    _, study = study_objects(render_ci(stem))
    checked = spec.from_dict(study, source=f"{stem}: study.yaml")  # what `ctssl study run` will accept
    written = values["study"]
    name = written["metadata"]["name"]
    assert checked.name == name
    filled = copy.deepcopy(study)
    s = filled["spec"]
    prefix = values["storage"].get("prefix") or "study"
    assert s.pop("storage") == f"s3://{values['storage']['bucket']}/{prefix}/studies/{name}"
    assert s.pop("workdir") == f"/tmp/ctssl/{name}"  # an emptyDir: the root filesystem is read-only
    assert s.pop("tracking") == {"uri": "http://study-mlflow:5000"}
    assert s["resources"].pop("maxConcurrentTrials") >= 1
    if values.get("deid", {}).get("existingSecret"):
        assert s.pop("deid") == {"keyFile": "/etc/ctssl/deid/deid-key"}
    want = copy.deepcopy(written)
    want["spec"].setdefault("resources", {})
    assert filled == want  # nothing else added, nothing dropped, every value as written


def test_what_the_study_says_itself_wins_over_the_charts_defaults() -> None:
    values = ci_values(CHART / "ci" / "cpu-small-values.yaml")
    own = {"storage": "s3://elsewhere/run7", "workdir": "/tmp/mine", "tracking": {"uri": "http://mlflow.site:5000"}}
    values["study"]["spec"].update(copy.deepcopy(own))
    values["study"]["spec"]["resources"]["maxConcurrentTrials"] = 3
    rj, study = study_objects(render_objects(values))
    assert {k: study["spec"][k] for k in own} == own
    assert study["spec"]["resources"]["maxConcurrentTrials"] == 3
    assert rj["metadata"]["annotations"]["ctssl.io/storage"] == "s3://elsewhere/run7"


def test_values_schema_embeds_the_study_schema() -> None:
    """Run `make schema` after changing ray_jobs/study/study.schema.json or adding a method module."""
    schema = json.loads(VALUES_SCHEMA.read_text())
    study, defs = values_study_schema()
    assert schema["properties"]["study"] == study, "values.schema.json's study is stale"
    assert schema["$defs"] == defs, "values.schema.json's $defs are stale"


def _schema_error(values: dict) -> str:
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError) as err:
        chart.render(values, name="study", namespace="ml")
    return str(err.value)


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec.pretrain.methods", {"simclr": {}}, "invalid propertyName 'simclr'"),
    ("spec.resources.gpusPerWorker", "all", "at '/study/spec/resources/gpusPerWorker'"),
    ("spec.finetune.folds", 1, "at '/study/spec/finetune/folds': minimum: got 1, want 2"),
    ("spec.data.pretrain.type", "png", "at '/study/spec/data/pretrain/type'"),
    ("spec.pretrain.epoch", 3, "at '/study/spec/pretrain': additional properties 'epoch' not allowed"),
    ("metadata.name", "Brain_CT", "at '/study/metadata/name'"),
    ("kind", "Experiment", "at '/study/kind'"),
])
def test_helm_rejects_a_bad_study_naming_its_key(path: str, value, expected: str) -> None:
    values = ci_values(CHART / "ci" / "cpu-small-values.yaml")
    node = values["study"]
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    assert expected in _schema_error(values)


def test_a_study_without_data_is_rejected_but_one_without_storage_is_completed() -> None:
    values = ci_values(CHART / "ci" / "cpu-small-values.yaml")
    del values["study"]["spec"]["data"]
    assert "at '/study/spec': missing property 'data'" in _schema_error(values)


def test_ctssl_k8s_values_turns_a_study_file_into_the_charts_values(tmp_path, capsys) -> None:
    import yaml

    from ray_jobs.cli import main

    src = REPO / "examples" / "phantom.yaml"
    assert main(["k8s", "values", "-f", str(src)]) == 0
    values = yaml.safe_load(capsys.readouterr().out)
    assert values == {"study": yaml.safe_load(src.read_text())}
    objs = render_objects({"storage": {"bucket": "ctssl"}, **values, "ray": {"gpuWorkers": {"maxReplicas": 0}}})
    _, study = study_objects(objs)
    assert study["spec"]["storage"] == "ctssl-demo/store"  # as the file says
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.read_text().replace("folds: 3", "folds: 1"))
    assert main(["k8s", "values", "-f", str(bad)]) == 2
    assert "spec.finetune.folds" in capsys.readouterr().err


def _ctssl_lines(text: str) -> list[list[str]]:
    """Every `ctssl ...` command in a text (after `ray job submit ... --` or `<(` too), continuations joined."""
    joined = re.sub(r"\\\n\s*", "", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        for m in re.finditer(r"(?:^|\s--\s|<\()(ctssl [^)#\n]*)", line):
            command = re.split(r"\s(?:>|\||&&|;)\s", m.group(1).split("  #")[0])[0]  # up to a redirect or pipe
            out.append(shlex.split(command.replace("<release>", "study")))
    return out


def test_commands_in_notes_and_operations_guide_parse_with_the_real_cli() -> None:
    parser = build_parser()
    notes_text = notes(ci_values(CHART / "ci" / "cpu-small-values.yaml"))
    platform_notes = notes({"storage": {"bucket": "ctssl"}})
    guide = (REPO / "docs" / "operations.md").read_text()
    texts = {"NOTES.txt": "\n".join(line for line in (notes_text + "\n" + platform_notes).splitlines()
                                    if line.startswith("  ")),
             "docs/operations.md": "\n".join(re.findall(r"```(?:sh)?\n(.*?)```", guide, re.S))}
    for where, text in texts.items():
        commands = _ctssl_lines(text)
        assert len(commands) >= 3, where
        for argv in commands:
            try:
                parser.parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with the ctssl CLI")

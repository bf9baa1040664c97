"""The study file: every example validates, every mistake is one line naming file:line:col and the key,
defaults come from the schema, and the docs' key reference is the schema's."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ray_jobs.study import spec
from tests.conftest import REPO

GOOD = textwrap.dedent("""\
    apiVersion: ctssl/v1
    kind: Study
    metadata:
      name: tiny
    spec:
      storage: /tmp/tiny
      data:
        pretrain: {type: phantom, patients: 4, slices: 4}
        labelled: {type: phantom, patients: 4, slices: 4, task: lesion}
    """)


def _problems(text: str) -> list[str]:
    with pytest.raises(spec.SpecError) as e:
        spec.loads(text, "s.yaml")
    return e.value.problems


def test_every_example_validates_and_plans_its_stages():
    from ray_jobs.study.stages import plan

    files = sorted((REPO / "examples").glob("*.yaml"))
    assert len(files) >= 4, files
    for f in files:
        study = spec.load(f)
        names = [s.name for s in plan(study)]
        ev = study.spec["finetune"]["evaluation"]
        budget = ["budget"] if study.spec["pretrain"].get("budgetCurve") else []
        tail = {"both": ["finetune", *budget, "linear"], "finetune": ["finetune", *budget],
                "linear": ["linear", *budget]}[ev] + ["report"]
        assert names[-len(tail):] == tail, (f, names)
        assert sum(n.startswith("pretrain-") for n in names) == len(study.methods()) * len(study.levels())


def test_defaults_are_the_schemas():
    s = spec.loads(GOOD)
    assert s.name == "tiny" and s.methods() == ["byol", "mocov2", "spark", "swav"]  # the registry, sorted
    assert s.spec["finetune"]["folds"] == 5 and s.spec["finetune"]["samplesPerClass"] == [5, 10, 20, 40, "all"]
    assert s.spec["resources"]["gpusPerWorker"] == "auto" and s.levels() == [None]
    assert s.spec["data"]["pretrain"]["size"] == 256
    assert s.workdir == Path("ctssl-tiny")
    # one level: encoders are named by method; two levels: method-level
    assert s.encoder_name("byol", None) == "byol"
    two = spec.loads(GOOD + "  reduction: {levels: [null, 6]}\n")
    assert [two.encoder_name("byol", lv) for lv in two.levels()] == ["byol-all", "byol-hash6"]


def test_a_method_override_wins_over_the_shared_setting():
    s = spec.loads(GOOD + textwrap.indent(textwrap.dedent("""\
        pretrain:
          epochs: 3
          timeBudget: 5m
          methods:
            byol: {epochs: 7, options: {tau_base: 0.99}}
            swav:
        """), "  "))
    assert s.method_settings("byol") == {"backbone": "resnet50", "epochs": 7, "timeBudget": "5m", "maxSteps": None,
                                         "batch": None, "options": {"tau_base": 0.99}}
    assert s.method_settings("swav")["epochs"] == 3


@pytest.mark.parametrize("edit, expected", [
    (("  storage: /tmp/tiny\n", "  storage: /tmp/tiny\n  storge: x\n"),
     r"^s\.yaml:7:3: spec\.storge: unknown key 'storge' \(allowed: .*storage"),
    (("    labelled:", "    labelled: {type: dicom, path: /x, patients: 3}\n    old:"), None),
    (("name: tiny", "name: Tiny_Study"), r"^s\.yaml:4:3: metadata\.name: 'Tiny_Study' does not match"),
    (("patients: 4, slices: 4}\n    labelled", "patients: four, slices: 4}\n    labelled"),
     r"^s\.yaml:8:\d+: spec\.data\.pretrain\.patients: 'four' is not of type integer"),
    (("kind: Study", "kind: Experiment"), r"^s\.yaml:2:1: kind: 'Experiment' is not one of 'Study'"),
])
def test_schema_errors_name_the_line_and_the_key(edit, expected):
    text = GOOD.replace(*edit)
    if expected is None:  # the "old" key is unknown under data
        expected = r"spec\.data\.old: unknown key 'old'"
    problems = _problems(text)
    assert any(re.search(expected, p) for p in problems), problems


def test_rules_beyond_the_schema_name_their_key():
    text = GOOD.replace("labelled: {type: phantom, patients: 4, slices: 4, task: lesion}",
                        "labelled: {type: dicom, path: /data, patients: 3}") + textwrap.indent(textwrap.dedent("""\
        pretrain:
          timeBudget: 12 minutes
          methods:
            byol: {backbone: resnet18}
            spark: {}
        finetune:
          epochs: 5
          recipes: ["1e-3:0", "1e-4:9"]
        """), "  ")
    problems = _problems(text)
    joined = "\n".join(problems)
    assert re.search(r"s\.yaml:\d+:\d+: spec\.data\.labelled: a labelled dicom source needs 'labels'", joined)
    assert re.search(r"s\.yaml:9:\d+: spec\.data\.labelled\.patients: applies to phantom sources only", joined)
    assert re.search(r"spec\.pretrain\.timeBudget: .*12 minutes", joined)
    assert re.search(r"spec\.finetune\.recipes\[1\]: 0\.0001:9 freezes more epochs than finetune\.epochs \(5\)",
                     joined)
    assert re.search(r"spec\.finetune\.backbone: the methods use different backbones \(resnet18, resnet50\)", joined)
    # one line per problem, in the order of the file
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == sorted(lines) and len(problems) == 5, problems


def test_unknown_method_and_gpus_and_sizes_are_refused_with_the_choices():
    text = GOOD + textwrap.indent(textwrap.dedent("""\
        pretrain:
          methods: {simclr: {}}
        resources: {gpusPerWorker: many}
        finetune: {samplesPerClass: [0, all]}
        """), "  ")
    joined = "\n".join(_problems(text))
    assert "spec.pretrain.methods.simclr: unknown name 'simclr' (choose from byol, mocov2, spark, swav)" in joined
    assert "spec.resources.gpusPerWorker: 'many' must be one of: 'auto', number >= 0" in joined
    assert "spec.finetune.samplesPerClass[0]: 0 must be one of: integer >= 1, 'all'" in joined


def test_broken_yaml_and_a_missing_file_are_one_line(tmp_path):
    assert re.match(r"s\.yaml:3:\d+: not valid YAML", _problems("a: 1\nb: [1, 2\nc: 3\n")[0])
    with pytest.raises(spec.SpecError, match=r"nope\.yaml: study file not found"):
        spec.load(tmp_path / "nope.yaml")


def test_the_schemas_method_list_is_the_methods_registry():
    from ssl_core import methods

    assert sorted(spec.method_names()) == sorted(methods.method_names())


def test_cli_validate_prints_the_stages_or_exits_2_with_one_line_per_problem(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "study", "validate", "-f", str(good)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "valid study 'tiny': 11 stages (phantom-pretrain, prep-pretrain" in r.stdout
    assert r.stdout.rstrip().endswith("finetune, linear, report)")
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("slices: 4}\n    labelled", "slices: 4, colour: red}\n    labelled"))
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "study", "validate", "-f", str(bad)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"ctssl study: error: {bad}:8:55: spec.data.pretrain.colour: unknown key 'colour' (allowed: "
        "dataset, labels, path, patients, renderSize, size, slices, task, type)"]


def test_the_docs_key_reference_is_the_schemas():
    page = (REPO / "docs" / "study-spec.md").read_text()
    m = re.search(r"<!-- keys:begin -->\n(.*?)\n<!-- keys:end -->", page, re.S)
    assert m, "docs/study-spec.md lacks the generated key table"
    assert m.group(1).strip() == spec.reference_markdown().strip(), (
        "docs/study-spec.md's key table differs from the schema: regenerate it with "
        "`ctssl study schema --reference`")


def test_gpus_auto_asks_for_gpus_an_autoscaler_may_add_and_an_explicit_number_wins(monkeypatch):
    from ray_jobs.study.runner import resolve_gpus

    monkeypatch.setenv("CTSSL_AUTOSCALER_MAX_GPUS", "8")  # a GPU group at zero replicas, up to 8 GPUs
    assert resolve_gpus(spec.loads(GOOD)) == 1.0
    assert resolve_gpus(spec.loads(GOOD + "  resources: {gpusPerWorker: 0}\n")) == 0.0
    assert resolve_gpus(spec.loads(GOOD + "  resources: {gpusPerWorker: 0.5}\n")) == 0.5

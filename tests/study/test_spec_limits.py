"""A study file cannot ask for unbounded work: every count has a maximum, YAML aliases are refused as the
file is read (an alias bomb never expands), and an experiment name cannot point a run's folder (which
pre-training prunes) at the storage root or above it. Each refusal is one line naming the file/key or flag."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from ctssl_base.errors import UserError
from ray_jobs.names import MAX_NAME_LENGTH, check_experiment_name
from ray_jobs.study import spec
from tests.study.test_spec import GOOD  # the smallest valid study


def _with(extra: str) -> str:
    """GOOD with ``extra`` (YAML at the level of spec's keys) appended under spec."""
    return GOOD + textwrap.indent(textwrap.dedent(extra), "  ")


def _problems(text: str, source: str = "s.yaml") -> list[str]:
    with pytest.raises(spec.SpecError) as e:
        spec.loads(text, source)
    return e.value.problems


# ------------------------------------------------------------------------------ maxima
@pytest.mark.parametrize("text, key, limit", [
    (GOOD.replace("patients: 4, slices: 4}\n    labelled", "patients: 1000000000, slices: 4}\n    labelled"),
     "spec.data.pretrain.patients", 100000),
    (GOOD.replace("slices: 4, task", "slices: 20000, task"), "spec.data.labelled.slices", 10000),
    (GOOD.replace("slices: 4, task", "slices: 4, renderSize: 8192, task"), "spec.data.labelled.renderSize", 4096),
    (GOOD.replace("slices: 4, task", "slices: 4, size: 2048, task"), "spec.data.labelled.size", 1024),
    (_with("seed: 4294967296\n"), "spec.seed", 2**31 - 1),
    (_with("resources: {workers: 100000}\n"), "spec.resources.workers", 1024),
    (_with("resources: {cpusPerWorker: 5000.5}\n"), "spec.resources.cpusPerWorker", 1024),
    (_with("resources: {gpusPerWorker: 128}\n"), "spec.resources.gpusPerWorker", 64),
    (_with("resources: {prepWorkers: 5000}\n"), "spec.resources.prepWorkers", 1024),
    (_with("resources: {maxConcurrentTrials: 1000000}\n"), "spec.resources.maxConcurrentTrials", 10000),
    (_with("pretrain: {epochs: 1000000}\n"), "spec.pretrain.epochs", 100000),
    (_with("pretrain: {maxSteps: 1000000000}\n"), "spec.pretrain.maxSteps", 100000000),
    (_with("pretrain: {batch: 100000}\n"), "spec.pretrain.batch", 65536),
    (_with("pretrain: {methods: {byol: {epochs: 1000000}}}\n"), "spec.pretrain.methods.byol.epochs", 100000),
    (_with("finetune: {folds: 1000}\n"), "spec.finetune.folds", 100),
    (_with("finetune: {epochs: 100000}\n"), "spec.finetune.epochs", 10000),
    (_with("finetune: {samplesPerClass: [5, 5000000]}\n"), "spec.finetune.samplesPerClass[1]", 1000000),
    (_with("finetune: {seeds: [0, 4294967296]}\n"), "spec.finetune.seeds[1]", 2**31 - 1),
])
def test_a_value_above_its_maximum_is_one_line_naming_the_key(text: str, key: str, limit: int) -> None:
    problems = _problems(text)
    assert len(problems) == 1, problems
    assert f": {key}: " in problems[0] and problems[0].endswith(f"is above the maximum of {limit}"), problems
    assert problems[0].startswith("s.yaml:")


def test_the_maximum_itself_is_accepted() -> None:
    study = spec.loads(GOOD.replace("patients: 4, slices: 4}\n    labelled",
                                    "patients: 100000, slices: 10000}\n    labelled")
                       + "  resources: {workers: 1024, gpusPerWorker: 64}\n  finetune: {folds: 100}\n")
    assert study.spec["data"]["pretrain"]["patients"] == 100000 and study.spec["resources"]["workers"] == 1024


def test_too_many_seeds_or_sizes_names_the_count_not_the_list() -> None:
    seeds = ", ".join(str(i) for i in range(101))
    problems = _problems(_with(f"finetune: {{seeds: [{seeds}]}}\n"))
    assert len(problems) == 1 and problems[0].endswith("spec.finetune.seeds: 101 items, at most 100 allowed")
    options = ", ".join(f"k{i}: {i}" for i in range(101))
    problems = _problems(_with(f"pretrain: {{methods: {{byol: {{options: {{{options}}}}}}}}}\n"))
    assert problems[0].endswith("spec.pretrain.methods.byol.options: 101 keys, at most 100 allowed"), problems


def test_a_time_budget_above_720h_is_refused_naming_the_key() -> None:
    problems = _problems(_with("pretrain: {timeBudget: 1000h}\n"))
    assert len(problems) == 1 and problems[0].endswith("spec.pretrain.timeBudget: '1000h' is above the maximum "
                                                       "of 720h"), problems
    assert spec.loads(_with("pretrain: {timeBudget: 720h}\n")).spec["pretrain"]["timeBudget"] == "720h"


def _numbers_and_lists(sch: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(path, schema) of every number and array schema of the study schema (``$defs`` included)."""
    found = []
    if isinstance(sch, dict):
        types = sch.get("type", [])  # under "properties", "type" may be a key's name holding a schema
        types = types if isinstance(types, list) else [types] if isinstance(types, str) else []
        if {"integer", "number", "array"} & set(types):
            found.append((path, sch))
        for key, sub in sch.items():
            found += _numbers_and_lists(sub, f"{path}/{key}")
    elif isinstance(sch, list):
        for i, sub in enumerate(sch):
            found += _numbers_and_lists(sub, f"{path}/{i}")
    return found


def test_every_number_and_list_of_the_schema_is_bounded() -> None:
    """A new count without a maximum would let a typo start unbounded work; this fails until it has one."""
    found = _numbers_and_lists(spec.schema())
    assert len(found) > 20, found
    for path, sch in found:
        types = sch["type"] if isinstance(sch["type"], list) else [sch["type"]]
        if "array" in types:  # a unique list of bounded integers is bounded too (reduction.levels)
            assert "maxItems" in sch or (sch.get("uniqueItems") and "maximum" in sch["items"]), path
        else:
            assert "maximum" in sch or "exclusiveMaximum" in sch, path


def test_the_key_table_shows_the_limits() -> None:
    rows = {key: typ for key, typ, _, _ in spec.reference_rows()}
    assert rows["spec.data.pretrain.patients"] == "integer (2 to 100000)"
    assert rows["spec.finetune.valFraction"] == "number (> 0, < 0.5)"
    assert rows["spec.finetune.seeds"] == "list (at most 100) of integer (0 to 2147483647)"


# ------------------------------------------------------------------------------ YAML aliases
def _alias_bomb() -> str:
    """Nine levels of nine references inside a method's options: 9**9 strings once expanded."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return _with("pretrain:\n  methods:\n    byol:\n      options:\n"
                 + "".join(f"        {line}\n" for line in lines))


@pytest.mark.timeout(60)
def test_an_alias_bomb_is_refused_at_parse_time_in_one_line(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    start = time.perf_counter()
    with pytest.raises(spec.SpecError) as e:
        spec.load(bomb)
    elapsed = time.perf_counter() - start
    assert e.value.problems == [f"{bomb}:14:15: YAML anchors and aliases are not allowed in a study file "
                                "(found anchor &a0); write the value out"]
    assert elapsed < 5, elapsed


@pytest.mark.timeout(60)
def test_the_cli_refuses_an_alias_bomb_with_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ray_jobs.cli import main

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert main(["study", "validate", "-f", str(bomb), "--print"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ctssl study: error: {bomb}:14:15: YAML anchors and aliases"), err


@pytest.mark.parametrize("extra, found", [
    ("finetune: {seeds: &s [0, 1]}\n", "anchor &s"),  # an anchor alone is refused: it exists to be referenced
    ("finetune: {seeds: *s}\n", "alias *s"),  # an alias of an anchor that does not exist
    ("pretrain:\n  methods:\n    byol: {}\n    swav: {<<: *s}\n", "alias *s"),  # a merge key needs an alias
])
def test_any_anchor_or_alias_is_refused_naming_the_line(extra: str, found: str) -> None:
    problems = _problems(_with(extra))
    assert len(problems) == 1 and problems[0].startswith("s.yaml:1"), problems
    assert f"not allowed in a study file (found {found})" in problems[0]


def test_a_plain_study_still_loads_and_keeps_its_positions() -> None:
    assert spec.loads(GOOD).name == "tiny"
    problems = _problems(GOOD.replace("  storage: /tmp/tiny\n", "  storage: /tmp/tiny\n  storge: x\n"))
    assert problems[0].startswith("s.yaml:7:3: spec.storge: unknown key")


# ------------------------------------------------------------------------------ experiment names
BAD_NAMES = ["..", ".", "/", "", "   ", "a/b", "../runs", "a\\b", "a\x00b", "a\nb", "a\tb", "\x1b[2J", " x",
             "x" * (MAX_NAME_LENGTH + 1)]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_no_single_folder_is_refused_naming_the_flag(name: str) -> None:
    with pytest.raises(UserError) as e:
        check_experiment_name(name, "--experiment")
    line = str(e.value)
    assert line.startswith("--experiment ") and "\n" not in line, line


@pytest.mark.parametrize("name", ["covid-study", "byol-r50", "Study_1.v2", "a.b", "...x", "x" * MAX_NAME_LENGTH])
def test_ordinary_names_pass(name: str) -> None:
    assert check_experiment_name(name) == name


@pytest.mark.parametrize("command", [
    ["pretrain", "--method", "byol", "--data", "unlabelled", "--storage", "runs", "--experiment"],
    ["finetune", "--data", "unlabelled", "--storage", "ft", "--experiment"],
    ["report", "--tracking-uri", "sqlite:///mlflow.db", "--out", "report", "--experiment"],
    ["reduce", "--strategy", "hash", "src", "dst", "--experiment"],
])
@pytest.mark.parametrize("name", ["..", "a/b", ""])
def test_each_experiment_flag_refuses_before_any_work(command: list[str], name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    from ray_jobs.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*command, name]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(err) == 1 and f": error: --experiment {name!r}: " in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written: no runs/, no mlflow.db


@pytest.mark.parametrize("name", ["..", ".", "/", "", "a/b", "a\x01b", "A..B"])
def test_the_studys_name_cannot_be_a_path(name: str) -> None:
    problems = _problems(GOOD.replace("name: tiny", f"name: {json.dumps(name)}"))  # JSON strings are YAML
    assert len(problems) == 1 and problems[0].startswith("s.yaml:4:3: metadata.name: "), problems

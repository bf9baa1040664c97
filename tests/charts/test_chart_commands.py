"""No drift between the chart, `ctssl k8s submit` and the CLI.

Every command the chart renders (Job commands, init containers, RayJob entrypoints) parses with the
real `ctssl` parser; the Python builder makes the same objects from the rendered experiment config;
and the stages chain through the commit markers the next stage waits for.
"""

from __future__ import annotations

import re
import shlex

import pytest

from ray_jobs import experiment_config
from ray_jobs.cli import build_parser
from ray_jobs.k8s.objects import build_objects
from tests.charts.chart_support import CI_VALUES, containers, experiment_from_render, pod_specs, render_ci

IDS = [p.stem for p in CI_VALUES]
STUDY_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                "app.kubernetes.io/part-of", "ctssl.io/method")


def rendered_commands(objs: list[dict]) -> list[tuple[str, list[str]]]:
    """(where, argv) of every ctssl command: entrypoints split at `&&`, container commands as lists."""
    out = []
    for o in objs:
        if o["kind"] == "RayJob":
            for step in o["spec"]["entrypoint"].split(" && "):
                out.append((f"{o['metadata']['name']} entrypoint", shlex.split(step)))
        for where, pod in pod_specs(o):
            for c in containers(pod):
                if c.get("command") and c["command"][0] == "ctssl":
                    out.append((f"{where}/{c['name']}", c["command"]))
    return out


@pytest.mark.parametrize("stem", IDS)
def test_every_rendered_ctssl_command_parses_with_the_real_cli(stem: str) -> None:
    parser = build_parser()
    commands = rendered_commands(render_ci(stem))
    seen = set()
    for where, argv in commands:
        assert argv[0] == "ctssl", where
        # Kubernetes substitutes $(JOB_COMPLETION_INDEX) from the pod's env before the process starts
        args = [a.replace("$(JOB_COMPLETION_INDEX)", "3") for a in argv[1:]]
        try:
            ns = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with the ctssl CLI")
        seen.add(ns.command)
        if ns.command == "prep":
            assert ns.shard_index == 3 and ns.num_shards >= 1
    assert {"prep", "wait-for", "pretrain", "finetune", "report"} <= seen


def test_reduction_commands_parse_when_reduction_is_on() -> None:
    parser = build_parser()
    reduce_cmds = [argv for _, argv in rendered_commands(render_ci("gpu-multinode-values"))
                   if argv[1] == "reduce"]
    assert len(reduce_cmds) == 1
    ns = parser.parse_args(reduce_cmds[0][1:])
    assert ns.command == "reduce"


def test_chart_method_list_matches_the_cli_and_the_method_registry() -> None:
    import json

    from tests.charts.chart_support import CHART

    schema = json.loads((CHART / "values.schema.json").read_text())
    enum = schema["properties"]["pretrain"]["properties"]["methods"]["items"]["enum"]
    from ssl_core.methods import _METHOD_MODULES

    assert sorted(enum) == sorted(experiment_config.METHODS) == sorted(_METHOD_MODULES)


@pytest.mark.parametrize("stem", IDS)
def test_python_builder_makes_the_objects_the_chart_renders(stem: str) -> None:
    objs = render_ci(stem)
    cfg = experiment_from_render(objs)
    assert experiment_config.resolve(cfg) == cfg  # the chart's config is complete and valid
    built = {(o["kind"], o["metadata"]["name"]): o for o in build_objects(cfg)}
    chart = {(o["kind"], o["metadata"]["name"]): o for o in objs
             if o["kind"] == "RayJob" or (o["kind"] == "Job" and o["metadata"]["name"].endswith("-prep"))}
    assert sorted(built) == sorted(chart)
    for key, obj in built.items():
        assert obj["spec"] == chart[key]["spec"], key
        assert obj["metadata"].get("annotations") == chart[key]["metadata"].get("annotations"), key
        chart_labels = {k: v for k, v in chart[key]["metadata"]["labels"].items() if k in STUDY_LABELS}
        assert obj["metadata"]["labels"] == chart_labels, key


def _waits(rayjob: dict) -> dict[str, list[str]]:
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    return {c["name"]: c["command"] for c in head.get("initContainers", [])}


def _flag(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.mark.parametrize("stem", IDS)
def test_stages_chain_through_the_commit_markers_of_their_inputs(stem: str) -> None:
    objs = render_ci(stem)
    cfg = experiment_from_render(objs)
    rayjobs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "RayJob"}
    prep = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "study-prep")
    prep_argv = prep["spec"]["template"]["spec"]["containers"][0]["command"]
    shards = prep_argv[3]
    prep_waits = {c["name"]: c["command"] for c in prep["spec"]["template"]["spec"]["initContainers"]}
    assert prep_waits["wait-for-source"][:3] == ["ctssl", "wait-for", prep_argv[2]]
    selection = None
    if "study-reduce" in rayjobs:
        r = rayjobs["study-reduce"]
        assert _waits(r)["wait-for-shards"][2:5] == [shards, "--what", "manifest"]
        selection = shlex.split(r["spec"]["entrypoint"])[3]
    for method in cfg["pretrain"]["methods"]:
        rj = rayjobs[f"study-pretrain-{method}"]
        argv = shlex.split(rj["spec"]["entrypoint"])
        wait = _waits(rj)["wait-for-data"]
        # pre-training waits for exactly the data it then reads: the selection, or the prep shards
        assert wait[2:5] == [selection or shards, "--what", "manifest"]
        assert _flag(argv, "--data") == [shards]
        assert _flag(argv, "--selection") == ([selection] if selection else [])
        assert int(wait[wait.index("--timeout") + 1]) == cfg["waitFor"]["timeoutSeconds"]
    ft = rayjobs["study-finetune"]
    finetune_argv = shlex.split(ft["spec"]["entrypoint"].split(" && ")[0])
    encoders = dict(e.split("=", 1) for e in _flag(finetune_argv, "--encoder") if "=" in e)
    waits = _waits(ft)
    checkpoints = waits["wait-for-checkpoints"]
    # fine-tuning waits for every method's final checkpoint, and uses exactly those as encoders
    assert checkpoints[checkpoints.index("--what") + 1] == "checkpoint"
    assert sorted(checkpoints[2:checkpoints.index("--what")]) == sorted(encoders.values())
    assert sorted(encoders) == sorted(cfg["pretrain"]["methods"])
    assert "random" in _flag(finetune_argv, "--encoder")
    for method, url in encoders.items():
        pre = shlex.split(rayjobs[f"study-pretrain-{method}"]["spec"]["entrypoint"])
        assert url == f"{_flag(pre, '--storage')[0]}/{_flag(pre, '--experiment')[0]}"
    assert waits["wait-for-data"][2] == _flag(finetune_argv, "--data")[0]
    # the report reads the study's MLflow experiment
    report_argv = shlex.split(ft["spec"]["entrypoint"].split(" && ")[1])
    assert _flag(report_argv, "--experiment") == _flag(finetune_argv, "--experiment")


def _ctssl_lines(text: str) -> list[list[str]]:
    """Every `ctssl ...` command in a text (after `ray job submit ... --` too), continuations joined."""
    joined = re.sub(r"\\\n\s*", "", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if " -- ctssl " in line:
            line = line.split(" -- ", 1)[1]
        if line.startswith("ctssl "):
            out.append(shlex.split(line.split("  #")[0].replace("<release>", "study")))
    return out


def test_commands_in_notes_and_operations_guide_parse_with_the_real_cli() -> None:
    from tests.charts.chart_support import CHART, REPO, ci_values, notes

    parser = build_parser()
    notes_text = notes(ci_values(CHART / "ci" / "cpu-small-values.yaml"))
    guide = (REPO / "docs" / "operations.md").read_text()
    texts = {"NOTES.txt": "\n".join(line for line in notes_text.splitlines() if line.startswith("  ")),
             "docs/operations.md": "\n".join(re.findall(r"```(?:sh)?\n(.*?)```", guide, re.S))}
    for where, text in texts.items():
        commands = _ctssl_lines(text)
        assert len(commands) >= 3, where
        for argv in commands:
            try:
                parser.parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with the ctssl CLI")

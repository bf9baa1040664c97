"""``ctssl study plan``: a plan for every example study, numbers that scale with the study, measured
shards and finished stages used where they exist, and the demo's plan checked against the demo's
measured wall time in docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ray_jobs.study import plan, spec
from ray_jobs.study.stages import plan as stage_plan
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)

#: how far the demo's plan may be from its measured wall time, either way
DEMO_FACTOR = 3.0
BENCHMARKS = REPO / "docs" / "benchmarks.md"


def study_text(storage: Path, *, patients: int = 8, folds: int = 3, seeds: str = "[0]", pool: str | None = None,
               levels: str = "[null, 6]") -> str:
    source = pool or f"{{type: phantom, patients: {patients}, slices: 10, renderSize: 64, size: 32}}"
    return textwrap.dedent(f"""\
        apiVersion: ctssl/v1
        kind: Study
        metadata: {{name: planned}}
        spec:
          storage: {storage}
          workdir: {storage.parent / 'work'}
          data:
            pretrain: {source}
            labelled: {{type: phantom, patients: 6, slices: 8, renderSize: 64, size: 32, task: region}}
          reduction: {{levels: {levels}}}
          pretrain: {{backbone: resnet18, epochs: 4, batch: 8, methods: {{byol: {{}}, spark: {{}}}}}}
          finetune: {{samplesPerClass: [2, all], folds: {folds}, seeds: {seeds}, epochs: 3, batch: 8}}
        """)


def make(text: str, **opts: Any) -> plan.Plan:
    return plan.make_plan(spec.loads(text, "s.yaml"), plan.Options(**opts))


def row(p: plan.Plan, stage: str) -> plan.Row:
    return next(r for r in p.rows if r.stage == stage)


# ------------------------------------------------------------------------------ every example
@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_prints_its_plan(path: Path, capsys: pytest.CaptureFixture) -> None:
    from ray_jobs.cli import main

    names = [s.name for s in stage_plan(spec.load(path))]
    assert main(["study", "plan", "-f", str(path), "--no-storage", "--slices", "pretrain=5000,labelled=2000"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[1].splitlines()
    assert [line.split()[0] for line in table[2:-2]] == names, out  # one row per stage, in the runner's order
    total = table[-1].split()
    assert total[0] == "total" and total[1] != "?", out  # every stage has a time
    assert "peak GPUs the autoscaler may bring up:" in out and "measured " in out
    assert main(["study", "plan", "-f", str(path), "--no-storage", "--slices", "pretrain=5000,labelled=2000",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in doc["stages"]] == names
    assert doc["totals"]["wall_s"] > 0 and doc["totals"]["storage_bytes"] > 0


def test_a_source_the_plan_cannot_count_is_named_not_guessed(capsys: pytest.CaptureFixture) -> None:
    from ray_jobs.cli import main

    assert main(["study", "plan", "-f", str(REPO / "examples" / "dicom-s3.yaml"), "--no-storage"]) == 0
    out = capsys.readouterr().out
    assert "give --slices pretrain=N" in out and re.search(r"^total\s+\?", out, re.M), out
    assert main(["study", "plan", "-f", str(REPO / "examples" / "dicom-s3.yaml"), "--slices", "pool=9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--slices 'pool=9': expected pretrain=N or labelled=N" in err[0], err


# ------------------------------------------------------------------------------ scaling
def test_twice_the_patients_is_twice_the_prep_work(tmp_path: Path) -> None:
    one, two = (make(study_text(tmp_path / "s", patients=n), look=False) for n in (8, 16))
    start = plan.figure("prep.start_s")
    a, b = row(one, "prep-pretrain"), row(two, "prep-pretrain")
    assert (a.details["slices"], b.details["slices"]) == (80, 160)
    assert (b.wall_s - start) == pytest.approx(2 * (a.wall_s - start))
    assert b.storage_bytes == pytest.approx(2 * a.storage_bytes, rel=0.01)
    assert row(two, "reduce-hash6").details["kept"] == pytest.approx(2 * row(one, "reduce-hash6").details["kept"],
                                                                    abs=1)
    assert row(two, "pretrain-byol-all").details["steps"] == 2 * row(one, "pretrain-byol-all").details["steps"]


def test_more_folds_and_seeds_are_more_trials(tmp_path: Path) -> None:
    base = make(study_text(tmp_path / "s"), look=False)
    folds = make(study_text(tmp_path / "s", folds=6), look=False)
    seeds = make(study_text(tmp_path / "s", seeds="[0, 1, 2]"), look=False)
    n = row(base, "finetune").details["trials"]
    assert n == (2 * 2 + 1) * 2 * 3  # (2 methods x 2 levels + random) x 2 sizes x 3 folds
    assert row(folds, "finetune").details["trials"] == 2 * n
    assert row(seeds, "finetune").details["trials"] == 3 * n
    assert row(seeds, "finetune").wall_s > 2.5 * row(base, "finetune").wall_s
    assert row(seeds, "report").wall_s == pytest.approx(3 * row(base, "report").wall_s)


def test_gpus_peak_and_gpu_hours_follow_the_resources(tmp_path: Path) -> None:
    lidc = spec.load(REPO / "examples" / "lidc-paper.yaml")
    sizes = plan.Options(slices={"pretrain": 244_000, "labelled": 25_000}, look=False)
    p = plan.make_plan(lidc, sizes)
    assert p.device == "gpu" and p.gpu_type == "h200" and p.peak_gpus == 8
    pre = row(p, "pretrain-byol")
    assert pre.gpus == 8 and pre.gpu_hours == pytest.approx(pre.wall_s * 8 / 3600)
    assert any("extrapolated" in n for n in p.notes)  # no GPU figure at 256 px: the rule is named
    capped = plan.make_plan(lidc, plan.Options(slices=sizes.slices, look=False, max_gpus=2))
    assert capped.peak_gpus == 2 and "capped" in capped.peak_note
    cpu = plan.make_plan(lidc, plan.Options(slices=sizes.slices, look=False, device="cpu"))
    assert cpu.peak_gpus == 0 and cpu.gpu_hours == 0 and cpu.wall_s > 20 * p.wall_s
    # a CPU study planned for GPUs: one per worker; tiny inputs are not extrapolated past the launch-bound floor
    small = make(study_text(tmp_path / "s"), look=False, device="gpu")
    assert row(small, "pretrain-byol-all").gpus == 1 and small.wall_s > 0
    assert plan.gpu_img_s("byol", "resnet18", 32, "h200") == plan.gpu_img_s("byol", "resnet18", plan.GPU_MIN_PX, "h200")
    assert plan.gpu_img_s("byol", "resnet50", 448, "h200") == pytest.approx(
        plan.figure("pretrain.gpu.h200.resnet50_224px")["byol"] / 4)  # twice the side: a quarter of the rate


# ------------------------------------------------------------------------------ what already exists
def _shards(url: Path, rows: list[int]) -> int:
    from data_prep import shards

    entries = [{"path": f"part-{i}.parquet", "rows": n, "sha256": f"{i:064x}", "bytes": 1000 * n}
               for i, n in enumerate(rows)]
    url.mkdir(parents=True)
    shards.write_manifest(str(url), {"kind": "prep", "shards": entries, "config": {"size": 32}})
    return sum(e["bytes"] for e in entries)


def test_committed_shards_replace_the_specs_estimate(tmp_path: Path) -> None:
    store = tmp_path / "store"
    stored = _shards(store / "shards" / "pretrain", [50, 23])
    p = make(study_text(store, patients=8))
    prep = row(p, "prep-pretrain")
    assert prep.details == {"slices": 73, "measured": True} and prep.storage_bytes == stored
    assert row(p, "pretrain-byol-all").details["slices"] == 73
    assert any("measured: 73 slices" in n for n in p.notes)
    assert row(make(study_text(store, patients=8), look=False), "prep-pretrain").details["slices"] == 80


def test_a_finished_stage_is_reused_by_the_runners_rule_and_the_store_is_left_alone(tmp_path: Path) -> None:
    from data_prep import shards
    from ray_jobs.study.runner import Markers, check_stage
    from ray_jobs.study.stages import Context

    pool = tmp_path / "pool"
    _shards(pool, [600, 400])
    store = tmp_path / "store"
    text = study_text(store, pool=f"{{type: shards, path: {pool}}}", levels="[6]")
    fresh = make(text)
    assert not store.exists()  # planning writes nothing
    assert row(fresh, "reduce-hash6").status == "runs (not run yet)"

    sel = store / "shards" / "pretrain-hash6"
    shards.write_selection(str(sel), str(pool), [f"s{i}" for i in range(250)], {"strategy": "hash"})
    study = spec.loads(text, "s.yaml")
    st = next(s for s in stage_plan(study) if s.name == "reduce-hash6")
    settings, inputs, fingerprint, _, _ = check_stage(st, Context(study, None, ""), Markers(str(store)), {})
    Markers(str(store)).write(st.name, {"settings": settings, "inputs": inputs, "fingerprint": fingerprint,
                                        "token": "t1", "result": {"url": str(sel), "kept": 250, "total": 1000},
                                        "seconds": 2.0, "finished": "2026-12-03 06:00:00"})
    p = make(text)
    red = row(p, "reduce-hash6")
    assert red.status == "reused" and red.details["kept"] == 250 and red.details["measured"]
    assert row(p, "pretrain-byol").details["slices"] == 250  # the measured selection, not the assumed share
    assert row(p, "pretrain-byol").status == "runs (not run yet)"
    assert p.wall_s == pytest.approx(sum(r.wall_s for r in p.rows if r.stage != "reduce-hash6"))  # no cost left
    changed = make(text.replace("levels: [6]", "levels: [4]"))
    assert row(changed, "reduce-hash4").status == "runs (not run yet)"


# ------------------------------------------------------------------------------ against the measured demo
def _demo_minutes() -> dict[str, float]:
    """The measured demo of docs/benchmarks.md: whole study, pre-training, fine-tuning (minutes)."""
    text = BENCHMARKS.read_text()
    section = text.split("## The demo end to end", 1)[1].split("\n## ", 1)[0]
    found = {"total": r"\*\*([\d.]+) min\*\* from the driver's start",
             "pretrain": r"pre-training the four\s+methods ([\d.]+) min",
             "finetune": r"the fine-tuning study\s+([\d.]+) min"}
    out = {}
    for key, pattern in found.items():
        m = re.search(pattern, section)
        assert m, f"docs/benchmarks.md, The demo end to end: no measured {key} time ({pattern})"
        out[key] = float(m.group(1))
    return out


def test_the_demo_plan_is_within_a_stated_factor_of_the_measured_demo(tmp_path: Path) -> None:
    from ray_jobs.commands import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    study = spec.from_dict(demo.demo_study(parser.parse_args(["--out", str(tmp_path / "demo")])), "ctssl demo")
    p = plan.make_plan(study, plan.Options(look=False))
    measured = _demo_minutes()
    planned = {"total": p.wall_s / 60,
               "pretrain": sum(r.wall_s for r in p.rows if r.stage.startswith("pretrain-")) / 60,
               "finetune": row(p, "finetune").wall_s / 60}
    for key, minutes in measured.items():
        ratio = planned[key] / minutes
        assert 1 / DEMO_FACTOR <= ratio <= DEMO_FACTOR, (key, planned[key], minutes)


# ------------------------------------------------------------------------------ the calibration table
def test_every_measured_figure_is_dated_and_found_in_its_doc() -> None:
    cal = plan.calibration()
    for key, f in cal["figures"].items():
        assert f["kind"] in ("measured", "derived", "assumed"), key
        assert f.get("source") or f.get("note"), key
        if f["kind"] != "measured":
            continue
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", f["date"]) and f["machine"] in cal["machines"], key
        doc = REPO / f["source"].split(",", 1)[0]
        text = doc.read_text()
        section = f["source"].split(", ", 1)[1].split(" (", 1)[0]
        assert section in text, (key, section)
        values = f["value"].values() if isinstance(f["value"], dict) else [f["value"]]
        for v in values:
            shown = {f"{v:g}", f"{v:,g}", f"{v:.1f}", f"{v:.2f}", f"{v:,.0f}", f"{v:,}"}
            assert any(s in text for s in shown), (key, v)


def test_the_papers_plan_in_the_docs_is_what_the_plan_prints(capsys: pytest.CaptureFixture) -> None:
    from ray_jobs.cli import main

    text = BENCHMARKS.read_text().split("## What a study costs before it runs", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"^    ctssl (study plan -f examples/lidc-paper\.yaml .*)$", text, re.M)
    assert command, "docs/benchmarks.md: the plan section has no lidc-paper command"
    shown = text.split("```\n", 1)[1].split("```", 1)[0]
    assert main(command.group(1).split()) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith(("stage", "prep-", "reduce-", "pretrain-",
                                                                        "finetune", "report", "total", "peak"))]
    assert len(table) == 12 and all(line in shown.splitlines() for line in table), printed
    counts = {k: len(v) for k, v in plan.make_plan(
        spec.load(REPO / "examples" / "lidc-paper.yaml"),
        plan.Options(slices={"pretrain": 244527, "labelled": 25221}, classes=11, look=False)).figures().items()}
    assert f"{counts['measured']} measured, {counts['derived']} derived and {counts['assumed']} assumed" in text

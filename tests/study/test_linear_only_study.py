"""A study evaluated by the linear probe alone (``finetune.evaluation: linear``): no fine-tuning trials,
one parent MLflow run opened by the linear stage (a rerun reuses every stage and opens no second
one), and a report whose verdict is a paired comparison over the probe's cells."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

from ray_jobs.report.linear_report import linear_summary, linear_trials, paired_vs_baseline, verdict
from tests.conftest import REPO
from tests.study.test_study_run import _env, _run, stage_lines, tiny_study

pytestmark = pytest.mark.timeout(900)


def _cells(gain: float, noise: list[float]) -> pd.DataFrame:
    """random and byol on 2 sizes x 3 folds x 2 seeds; byol = random + gain + noise[cell]."""
    rows, i = [], 0
    for size, base in (("5", 0.60), ("all", 0.80)):
        for fold in range(3):
            for seed in (0, 1):
                r = base + 0.01 * fold - 0.02 * seed
                rows.append({"encoder": "random", "size": size, "fold": fold, "seed": seed, "auc": r,
                             "train_per_class_min": 5 if size == "5" else 40})
                rows.append({"encoder": "byol", "size": size, "fold": fold, "seed": seed,
                             "auc": r + gain + noise[i % len(noise)], "train_per_class_min": 5 if size == "5" else 40})
                i += 1
    return pd.DataFrame(rows)


def test_the_verdict_pairs_cells_and_says_gain_loss_or_no_difference():
    trials = linear_trials(_cells(0.05, [0.0, 0.01, -0.01]))
    summary = linear_summary(trials)
    assert list(summary["encoder"]) == ["byol", "byol", "random", "random"]
    assert list(summary["size"]) == ["5", "all", "5", "all"]  # smallest size first within an encoder
    paired = paired_vs_baseline(trials)
    at5 = paired[paired["size"] == "5"].iloc[0]
    assert at5["n"] == 6 and at5["wins"] == 6 and math.isclose(at5["diff_mean"], 0.05, abs_tol=1e-9)
    assert at5["ci_low"] > 0
    text = verdict(summary, paired)
    assert "(5)" in text and "`byol`" in text and "a gain" in text and "+0.050" in text
    # a difference that changes sign from cell to cell: the interval straddles zero
    mixed = linear_trials(_cells(0.0, [0.05, -0.05]))
    text = verdict(linear_summary(mixed), paired_vs_baseline(mixed))
    assert "no difference shown" in text
    worse = linear_trials(_cells(-0.08, [0.0, 0.01]))
    assert "a loss" in verdict(linear_summary(worse), paired_vs_baseline(worse))


def test_a_missing_baseline_cell_is_left_out_of_the_pairs():
    cells = _cells(0.05, [0.0])
    cells = cells[~((cells["encoder"] == "random") & (cells["size"] == "5") & (cells["fold"] == 0))]
    paired = paired_vs_baseline(linear_trials(cells))
    assert paired[paired["size"] == "5"].iloc[0]["n"] == 4  # 6 cells less the two of fold 0


def _study(tmp_path) -> str:
    text = tiny_study(tmp_path, name="linonly")
    text = text.replace("levels: [null, 6]", "levels: [null]")
    text = text.replace("    checkpointEvery: 4\n", "    checkpointEvery: 4\n    budgetCurve: [0.5, 1]\n"
                                                    "    budgetFinetune: true\n")
    return text.replace("    recipes: [\"1e-3:0\"]\n", "    recipes: [\"1e-3:0\"]\n    evaluation: linear\n")


def test_a_linear_only_study_runs_reports_and_reuses_without_fine_tuning(tmp_path):
    from ray_jobs import tracking

    spec = tmp_path / "study.yaml"
    spec.write_text(_study(tmp_path))
    first = _run(spec)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ran = stage_lines(first.stdout)
    assert "finetune" not in ran
    assert {ran[s] for s in ("linear", "budget", "budget-finetune", "report", "pretrain-byol")} == {"ran"}

    cl = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = cl.get_experiment_by_name("linonly")
    studies = cl.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'study'")
    assert len(studies) == 1 and studies[0].data.tags[tracking.TAG_STAGE] == "linear"
    assert studies[0].info.status == "FINISHED"
    assert not cl.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'trial'")
    parent = studies[0].info.run_id
    arts = {a.path for a in cl.list_artifacts(parent)}
    assert {"linear_probe.csv", "linear_probe_cells.csv", "budget_curve.csv", "budget_finetune.csv", "report"} <= arts
    # the budget curve fine-tuned: random init and both milestones at the smallest size, 2 folds, in an
    # experiment of its own (the study's own experiment keeps one study run)
    budget_exp = cl.get_experiment_by_name("linonly-budget")
    tuned = cl.search_runs([budget_exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'trial'")
    assert sorted({r.data.tags["method"] for r in tuned}) == ["byol@0.5", "byol@1", "random"] and len(tuned) == 6
    assert {"report/report.md", "report/summary.csv"} <= {a.path for a in cl.list_artifacts(parent, "report")}

    report = tmp_path / "work" / "report"
    md = (report / "report.md").read_text()
    for heading in ("Linear-probe study `linonly`", "Verdict at the smallest training-set size",
                    "Paired difference to `random`", "Gain versus pre-training budget", "Pre-training"):
        assert f"## {heading}" in md, heading
    assert "the best linear probe is `byol`" in md  # the one encoder besides the baseline
    table = pd.read_csv(report / "budget_finetune.csv")
    assert list(zip(table["method"], table["fraction"], strict=True)) == [("random", 0.0), ("byol", 0.5), ("byol", 1.0)]
    assert table["n"].eq(2).all() and table["auc_mean"].notna().all()
    assert "![AUC versus pre-training time, fine-tuned](budget_finetune.png)" in md and "- fine-tuned: byol" in md
    page = (report / "report.html").read_text()
    assert page.count("<table") >= 2 and "data:image/png;base64," in page  # both tables, the plots inlined
    cells = pd.read_csv(report / "linear_probe_cells.csv")
    # 2 encoders x 2 sizes x 2 folds x 1 seed, every cell scored
    assert len(cells) == 8 and cells["auc"].notna().all()
    assert set(cells["encoder"]) == {"random", "byol"} and set(cells["size"].astype(str)) == {"n2", "all"}
    summary = pd.read_csv(report / "summary.csv")
    assert len(summary) == 4 and summary["n_trials"].eq(2).all()

    # ctssl report reads the same study from MLflow alone
    out = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "ray_jobs.cli", "report", "--experiment", "linonly", "--tracking-uri",
                        f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", str(out)], cwd=REPO, capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    again = (out / "report.md").read_text()
    assert "## Paired difference to `random`" in again
    assert pd.read_csv(out / "summary.csv").equals(summary)

    second = _run(spec)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert set(stage_lines(second.stdout).values()) == {"reused"}
    assert len(cl.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_KIND}` = 'study'")) == 1

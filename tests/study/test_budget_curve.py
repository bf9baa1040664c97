"""The budget curve's report text and plot on synthetic tables: a method that crosses the random-init
baseline, one that does not, and the gain per doubling of pre-training time."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from ray_jobs.report.budget_plot import (
    COLUMNS,
    RANDOM,
    bootstrap_band,
    budget_section,
    gain_per_doubling,
    plot_budget_curve,
    summary_lines,
)


def _table() -> pd.DataFrame:
    rows = [[RANDOM, 0.0, 0, 0.0, 5, 0.70, 0.66, 0.74, 10]]
    for f, t, auc in [(0.25, 25.0, 0.69), (0.5, 50.0, 0.73), (1.0, 100.0, 0.79)]:  # +0.05 per doubling
        rows.append(["byol", f, int(f * 400), t, 5, auc, auc - 0.02, auc + 0.02, 10])
    for f, t in [(0.25, 30.0), (0.5, 60.0), (1.0, 120.0)]:  # flat inside the band
        rows.append(["swav", f, int(f * 400), t, 5, 0.70, 0.65, 0.75, 10])
    return pd.DataFrame(rows, columns=COLUMNS)


def test_crossing_and_gain_per_doubling_lines():
    lines = summary_lines(_table())
    byol = next(s for s in lines if s.startswith("byol"))
    swav = next(s for s in lines if s.startswith("swav"))
    # 0.5: interval 0.71-0.75 lies above the baseline mean 0.70 (0.25's 0.67 does not)
    assert "crosses at 0.5 of its budget (step 200, 50 s" in byol
    assert "+0.050 AUC" in byol
    assert "does not cross within the measured budget" in swav
    assert "+0.000 AUC" in swav


def test_gain_per_doubling_needs_two_times():
    one = _table().iloc[[1]]
    assert gain_per_doubling(one) is None


def test_bootstrap_band_brackets_the_mean():
    m, lo, hi = bootstrap_band(np.array([0.6, 0.7, 0.8, 0.75, 0.65]))
    assert lo < m < hi and abs(m - 0.7) < 1e-9


def test_plot_and_section_written(tmp_path):
    path = plot_budget_curve(_table(), str(tmp_path / "budget_curve.png"))
    assert os.path.getsize(path) > 5000
    md = budget_section(_table(), "budget_curve.png")
    assert "![AUC versus pre-training time](budget_curve.png)" in md and md.count("\n- ") == 2


def test_budget_table_rows_per_method_and_fraction():
    """A stand-in probe whose AUC is the encoder's step: one row per method x fraction, random first."""
    from ray_jobs.study.budget_curve import budget_table

    steps = {"a/0.5": 2, "a/1": 4, "b/0.5": 3, "b/1": 6}

    def load(spec, folder):  # noqa: ANN001, ANN202
        return folder, steps[folder], 10.0 * steps[folder]

    def embed(spec, data):  # noqa: ANN001, ANN202
        return np.full((4, 2), 0.0 if spec == "rand" else steps[spec] / 10)

    def probe(emb, data, folds, sizes, seeds):  # noqa: ANN001, ANN202
        return [{"size": s, "fold": f, "seed": sd, "auc": 0.5 + float(emb[0, 0]) + 0.01 * f}
                for s in sizes for f in folds for sd in seeds]

    ms = {"b": {0.5: "b/0.5", 1.0: "b/1"}, "a": {0.5: "a/0.5", 1.0: "a/1"}}
    t = budget_table(ms, "rand", None, [0, 1, 2], [5], [0, 1], embed=embed, probe=probe, load=load)
    assert list(zip(t["method"], t["fraction"], strict=True)) == [
        (RANDOM, 0.0), ("a", 0.5), ("a", 1.0), ("b", 0.5), ("b", 1.0)]
    assert list(t["n"]) == [6] * 5 and list(t["step"]) == [0, 2, 4, 3, 6]
    assert np.allclose(t["auc_mean"], [0.51, 0.71, 0.91, 0.81, 1.11])
    assert (t["ci_low"] <= t["auc_mean"]).all() and (t["auc_mean"] <= t["ci_high"]).all()


def test_report_section_from_the_csv(tmp_path):
    from ray_jobs.report.budget_plot import PLOT, SECTION, report_section

    csv = tmp_path / "budget_curve.csv"
    _table().to_csv(csv, index=False)
    head, body = report_section(str(csv), str(tmp_path))
    assert head == SECTION and (tmp_path / PLOT).stat().st_size > 5000
    assert "crosses at 0.5" in body and "does not cross" in body


def test_budget_curve_key_adds_the_stage_before_the_report(tmp_path):
    from ray_jobs.study import plan, spec
    from ray_jobs.study.stages import plan as stage_plan
    from tests.study.test_study_plan import study_text

    text = study_text(tmp_path / "s").replace("epochs: 4, batch: 8,", "epochs: 4, batch: 8, budgetCurve: [0.5, 1],")
    study = spec.loads(text, "s.yaml")
    stages = {s.name: s for s in stage_plan(study)}
    assert "budget" in stages and "budget" in stages["report"].needs
    assert all(s.settings.get("budgetCurve") == [0.5, 1] for n, s in stages.items() if n.startswith("pretrain-"))
    plan.make_plan(study, plan.Options())  # the plan prints with the stage in it
    off = {s.name for s in stage_plan(spec.loads(study_text(tmp_path / "s"), "s.yaml"))}
    assert "budget" not in off


def test_an_unsorted_budget_curve_is_refused_naming_the_key(tmp_path):
    import pytest

    from ctssl_base.errors import UserError
    from ray_jobs.study import spec
    from ray_jobs.study.stages import plan as stage_plan
    from tests.study.test_study_plan import study_text

    text = study_text(tmp_path / "s").replace("epochs: 4, batch: 8,", "epochs: 4, batch: 8, budgetCurve: [1, 0.5],")
    with pytest.raises(UserError, match="s.yaml: pretrain.budgetCurve must be sorted"):
        stage_plan(spec.loads(text, "s.yaml"))


def test_linear_probe_sits_beside_fine_tuning_at_the_full_budget(tmp_path):
    from ray_jobs.report.budget_plot import PROTOCOLS_SECTION, protocols_section, protocols_table

    summary = pd.DataFrame({"encoder": ["random", "byol"], "size": ["5", "5"], "auc_mean": [0.75, 0.81],
                            "auc_std": [0.02, 0.01]})
    both = protocols_table(_table(), summary)
    assert both["encoder"].tolist() == ["random", "byol", "swav"]  # one row each: the full budget only
    byol = both[both["encoder"] == "byol"].iloc[0]
    assert byol["linear"] == 0.79 and byol["linear_low"] == 0.77 and byol["finetune"] == 0.81
    assert np.isnan(both[both["encoder"] == "swav"].iloc[0]["finetune"])  # no fine-tuning cell: n/a
    csv = tmp_path / "budget_curve.csv"
    _table().to_csv(csv, index=False)
    head, body = protocols_section(str(csv), summary)
    assert head == PROTOCOLS_SECTION
    assert "| byol | 5 | 0.790 [0.770, 0.810] | 0.810 ± 0.010 | +0.020 | 10 |" in body
    assert "| swav | 5 | 0.700 [0.650, 0.750] | n/a | n/a | 10 |" in body


def test_fine_tuned_random_init_is_the_second_reference(tmp_path):
    from ray_jobs.report.budget_plot import PLOT, report_section

    csv = tmp_path / "budget_curve.csv"
    _table().to_csv(csv, index=False)
    summary = pd.DataFrame({"encoder": ["random", "byol"], "size": ["5", "5"], "auc_mean": [0.75, 0.81],
                            "auc_std": [0.02, 0.01]})
    _, body = report_section(str(csv), str(tmp_path), summary)
    # byol's full-budget probe (0.79) clears random's fine-tuned 0.75, swav's (0.70) does not
    assert "- random init fine-tuned at 5 per class: 0.750 (dotted line); reached at the full budget by byol" in body
    assert "the dotted line is random init fine-tuned" in body and (tmp_path / PLOT).stat().st_size > 5000
    summary.loc[0, "auc_mean"] = 0.95
    _, body = report_section(str(csv), str(tmp_path), summary)
    assert "0.950 (dotted line); no method's linear probe reaches it within the measured budget" in body
    _, body = report_section(str(csv), str(tmp_path))  # no fine-tuning summary: no second reference
    assert "dotted" not in body

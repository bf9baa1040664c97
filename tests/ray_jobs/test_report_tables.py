"""The report's statistics on a hand-made trial table whose answers can be worked out by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy.stats import wilcoxon

from ray_jobs.report.tables import (
    minimal_samples,
    recipe_markdown,
    recipe_table,
    smallest_size_verdict,
    summarise,
    undertrained_cells,
    undertrained_note,
    wilcoxon_vs_baseline,
)


def _trials() -> pd.DataFrame:
    rows = []
    # random: AUC 0.60..0.64 at n5, 0.70..0.74 at all; byol is +0.05 (n5) and +0.01..+0.05 (all) better
    for fold in range(5):
        for enc, size, spc, auc in [("random", "n5", 5, 0.60 + 0.01 * fold), ("random", "all", 50, 0.70 + 0.01 * fold),
                                    ("byol", "n5", 5, 0.65 + 0.01 * fold), ("byol", "all", 50, 0.71 + 0.02 * fold)]:
            rows.append({"encoder": enc, "size": size, "fold": fold, "seed": 0, "test_auc": auc,
                         "test_f1_macro": auc - 0.1, "test_accuracy": auc - 0.05, "train_per_class_min": spc})
    return pd.DataFrame(rows)


def test_summary_is_mean_and_sample_std_over_folds_smallest_size_first():
    s = summarise(_trials())
    assert list(zip(s["encoder"], s["size"], strict=True)) == [("byol", "n5"), ("byol", "all"),
                                                               ("random", "n5"), ("random", "all")]
    r = s[(s.encoder == "random") & (s["size"] == "n5")].iloc[0]
    assert r.n_trials == 5
    assert r.auc_mean == pytest.approx(0.62)
    assert r.auc_std == pytest.approx(pd.Series([0.60, 0.61, 0.62, 0.63, 0.64]).std())  # ddof=1: 0.0158
    assert r.f1_mean == pytest.approx(0.52) and r.acc_mean == pytest.approx(0.57)


def test_verdict_says_beats_only_where_a_test_supports_it_and_names_the_p_value_floor():
    t = _trials()
    five = smallest_size_verdict(summarise(t), wilcoxon_vs_baseline(t), "random")
    assert "Smallest training-set size: **n5**" in five
    # 5 folds all +0.05: exact two-sided p = 0.0625, the floor for 5 pairs, which cannot reach 0.05:
    # a higher mean without a supporting test is not a win
    assert "`byol` is ahead of `random` but not shown to beat it (no test supports it): mean AUC 0.670 (+0.050)" in five
    assert "smallest attainable p = 0.0625" in five
    assert "**0 of 1 pre-trained encoders beat `random` at n5.**" in five
    assert "Ahead in mean AUC without a test that supports it: byol" in five
    # the patient-level bootstrap has no floor: when it finds byol better, the verdict says so
    boot = pd.DataFrame([{"encoder": "byol", "size": "n5", "patients": 40, "diff": 0.05, "ci_low": 0.01,
                          "ci_high": 0.09, "p_value": 0.004}])
    v = smallest_size_verdict(summarise(t), wilcoxon_vs_baseline(t), "random", boot=boot)
    assert "`byol` beats `random`: mean AUC 0.670 (+0.050)" in v
    assert "**1 of 1 pre-trained encoders beat `random` at n5 (supported by a test at 0.05): byol.**" in v
    # a bootstrap that finds byol *worse* with p < 0.05 is no support for a win
    v = smallest_size_verdict(summarise(t), wilcoxon_vs_baseline(t), "random", boot=boot.assign(diff=-0.05))
    assert "**0 of 1" in v
    three = t[t["fold"] < 3].copy()
    three.loc[(three.encoder == "byol") & (three["size"] == "n5"), "test_auc"] -= 0.2
    v = smallest_size_verdict(summarise(three), wilcoxon_vs_baseline(three), "random")
    assert "`byol` does not beat `random`" in v and "smallest attainable p = 0.25" in v
    assert "**0 of 1 pre-trained encoders beat `random` at n5.**" in v


def test_a_higher_mean_with_a_negative_median_difference_is_not_a_win():
    rows = []
    # one fold far ahead lifts the mean, the other five folds are slightly behind
    for fold, d in enumerate([0.30, -0.01, -0.01, -0.01, -0.01, -0.01]):
        for enc, auc in (("random", 0.6), ("swav", 0.6 + d)):
            rows.append({"encoder": enc, "size": "n5", "fold": fold, "seed": 0, "test_auc": auc,
                         "test_f1_macro": auc, "test_accuracy": auc, "train_per_class_min": 5})
    t = pd.DataFrame(rows)
    boot = pd.DataFrame([{"encoder": "swav", "size": "n5", "patients": 60, "diff": 0.04, "ci_low": 0.01,
                          "ci_high": 0.07, "p_value": 0.01}])
    v = smallest_size_verdict(summarise(t), wilcoxon_vs_baseline(t), "random", boot=boot)
    assert "`swav` is ahead of `random` but not shown to beat it (the median paired difference is negative)" in v
    assert "**0 of 1" in v


def test_verdict_states_the_protocol_and_flags_under_trained_cells():
    t = _trials()
    t["late_best"] = ((t.encoder == "random") & (t["size"] == "n5")).astype(float)
    t.loc[(t.encoder == "byol") & (t["size"] == "n5") & (t.fold < 2), "late_best"] = 1.0  # 2 of 5: not flagged
    late = undertrained_cells(t)
    assert list(zip(late.encoder, late["size"], late.n_late, strict=True)) == [("random", "n5", 5)]
    v = smallest_size_verdict(summarise(t), wilcoxon_vs_baseline(t), "random", protocol="tuned: grid",
                              undertrained=late)
    assert v.startswith("Fine-tuning recipe: tuned: grid.")
    assert "(under-trained cell: see below)" in v
    assert "`random` at n5 (5/5 trials)" in undertrained_note(late)
    assert "every curve had levelled off" in undertrained_note(undertrained_cells(t.assign(late_best=0.0)))


def test_recipe_table_counts_the_recipe_each_trial_chose():
    t = _trials()
    t["recipe"] = ["lr 0.001, 0 frozen" if f < 3 else "lr 0.0001, 1 frozen" for f in t.fold]
    r = recipe_table(t)
    row = r[(r.encoder == "byol") & (r["size"] == "n5")].iloc[0]
    assert row.chosen == "lr 0.001, 0 frozen: 3/5; lr 0.0001, 1 frozen: 2/5"
    assert "| byol | n5 | lr 0.001, 0 frozen: 3/5; lr 0.0001, 1 frozen: 2/5 |" in recipe_markdown(r)


def test_wilcoxon_pairs_folds_and_matches_scipy():
    t = wilcoxon_vs_baseline(_trials(), "random")
    assert list(t["encoder"]) == ["byol", "byol"]
    row = t[t["size"] == "all"].iloc[0]
    diffs = [0.01, 0.02, 0.03, 0.04, 0.05]
    assert row.n_pairs == 5
    assert row.median_diff == pytest.approx(0.03)
    assert row.p_value == pytest.approx(wilcoxon(diffs).pvalue)
    assert row.p_value == pytest.approx(0.0625)  # 5 positive pairs: the smallest two-sided p


def test_identical_results_give_p_of_one_not_an_error():
    t = _trials()
    t.loc[t.encoder == "byol", "test_auc"] = t.loc[t.encoder == "random", "test_auc"].to_numpy()
    res = wilcoxon_vs_baseline(t, "random")
    assert list(res["p_value"]) == [1.0, 1.0]


def test_minimal_samples_per_class_by_target_and_by_margin():
    s = summarise(_trials())
    by_target = minimal_samples(s, target_auc=0.65).set_index("encoder")
    assert by_target.loc["byol", "min_samples_per_class"] == 5  # byol n5 mean 0.67 >= 0.65
    assert by_target.loc["random", "min_samples_per_class"] == 50  # random n5 0.62 fails, all 0.72 passes
    by_margin = minimal_samples(s, margin=0.1).set_index("encoder")
    assert by_margin.loc["byol", "threshold"] == pytest.approx(0.75 - 0.1)
    assert by_margin.loc["byol", "min_size"] == "n5"
    never = minimal_samples(s, target_auc=0.99).set_index("encoder")
    assert math.isnan(never.loc["byol", "min_samples_per_class"]) and never.loc["byol", "min_size"] is None


def test_report_of_an_unknown_study_is_a_clear_error(tmp_path, capsys):
    from ray_jobs.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["report", "--experiment", "no-such-study", "--tracking-uri", uri, "--out", str(tmp_path / "r")])
    assert rc == 2
    assert f"--experiment 'no-such-study': no such MLflow experiment at {uri}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()

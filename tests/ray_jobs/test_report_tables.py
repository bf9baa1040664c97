"""The report's statistics on a hand-made trial table whose answers can be worked out by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy.stats import wilcoxon

from ray_jobs.report.tables import minimal_samples, smallest_size_verdict, summarise, wilcoxon_vs_baseline


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


def test_verdict_names_the_encoders_that_beat_random_at_the_smallest_size_and_the_p_value_floor():
    t = _trials()
    five = smallest_size_verdict(summarise(t), wilcoxon_vs_baseline(t), "random")
    assert "Smallest training-set size: **n5**" in five
    assert "`byol` beats `random`: mean AUC 0.670 (+0.050)" in five
    # 5 folds all +0.05: exact two-sided p = 0.0625, the floor for 5 pairs, which cannot reach 0.05
    assert "smallest attainable p = 0.0625" in five and "**1 of 1 pre-trained encoders beat `random` at n5: byol.**" in five
    three = t[t["fold"] < 3].copy()
    three.loc[(three.encoder == "byol") & (three["size"] == "n5"), "test_auc"] -= 0.2
    v = smallest_size_verdict(summarise(three), wilcoxon_vs_baseline(three), "random")
    assert "`byol` does not beat `random`" in v and "smallest attainable p = 0.25" in v
    assert "**0 of 1 pre-trained encoders beat `random` at n5.**" in v


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

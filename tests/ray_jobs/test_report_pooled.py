"""The patient-level bootstrap of pooled out-of-fold AUC: the AUC itself, pooling, and the test's verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ray_jobs.report.pooled import bootstrap_vs_baseline, macro_auc
from ray_jobs.report.tables import smallest_size_verdict, summarise


@pytest.mark.parametrize("k", [2, 3, 6])
def test_macro_auc_matches_scikit_learn_with_ties(k):
    rng = np.random.default_rng(k)
    y = np.arange(120) % k
    p = rng.random((120, k)).round(1)  # rounding makes many ties
    p /= p.sum(1, keepdims=True)
    ref = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert macro_auc(y, p) == pytest.approx(ref, abs=1e-12)
    assert np.isnan(macro_auc(np.zeros(10, int), p[:10]))  # one class only: undefined


def _study(rng, n_patients=24, per_patient=8, k=3, folds=3, signal=2.0, sizes=("n5", "all"), seeds=(0,)):
    """Trials and predictions of 'good' (informative scores) and 'random' (noise) on disjoint fold test sets."""
    rows = np.arange(n_patients * per_patient)
    patients = np.repeat([f"P{i:02d}" for i in range(n_patients)], per_patient)
    y = rng.integers(0, k, len(rows))
    fold_of_patient = np.arange(n_patients) % folds
    trials, preds = [], {}
    for enc, strength in (("good", signal), ("random", 0.0)):
        for size in sizes:
            for seed in seeds:
                for f in range(folds):
                    test = rows[fold_of_patient[np.arange(len(rows)) // per_patient] == f]
                    logits = rng.normal(size=(len(test), k)) + strength * np.eye(k)[y[test]]
                    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
                    rid = f"{enc}-{size}-{seed}-{f}"
                    preds[rid] = {"y": y[test], "p": p.astype(np.float32), "rows": test, "patients": patients[test]}
                    trials.append({"run_id": rid, "encoder": enc, "size": size, "fold": f, "seed": seed,
                                   "size_kind": "per_class", "size_value": 5 if size == "n5" else -1,
                                   "test_auc": macro_auc(y[test], p), "test_f1_macro": 0.5, "test_accuracy": 0.5,
                                   "train_per_class_min": 5 if size == "n5" else 50})
    return pd.DataFrame(trials), preds


def test_a_real_effect_is_significant_and_noise_is_not():
    trials, preds = _study(np.random.default_rng(0))
    boot = bootstrap_vs_baseline(trials, preds, "random", n_boot=400, seed=1)
    assert set(boot["size"]) == {"n5", "all"} and (boot["patients"] == 24).all() and (boot["slices"] == 192).all()
    row = boot[boot["size"] == "n5"].iloc[0]
    assert row["diff"] > 0.2 and row["ci_low"] > 0 and row["p_value"] < 0.01

    same, preds2 = _study(np.random.default_rng(0), signal=0.0)
    boot0 = bootstrap_vs_baseline(same, preds2, "random", n_boot=400, seed=1)
    assert (boot0["p_value"] > 0.05).all() and (boot0["ci_low"] < 0).all() and (boot0["ci_high"] > 0).all()


def test_pairs_need_every_fold_on_both_sides():
    trials, preds = _study(np.random.default_rng(0))
    missing = trials[~((trials["encoder"] == "random") & (trials["size"] == "all") & (trials["fold"] == 2))]
    boot = bootstrap_vs_baseline(missing, preds, "random", n_boot=50)
    assert list(boot["size"]) == ["n5"]  # "all" lost a baseline fold: no pooled comparison there
    del preds["good-n5-0-1"]  # a run without its predictions artifact (an older study)
    assert bootstrap_vs_baseline(missing, preds, "random", n_boot=50).empty


def test_verdict_states_the_bootstrap_result_when_the_fold_test_cannot_be_significant():
    trials, preds = _study(np.random.default_rng(0))
    boot = bootstrap_vs_baseline(trials, preds, "random", n_boot=400, seed=1)
    from ray_jobs.report.tables import wilcoxon_vs_baseline

    text = smallest_size_verdict(summarise(trials), wilcoxon_vs_baseline(trials), "random", boot=boot)
    assert "smallest attainable p = 0.25" in text  # the 3-fold Wilcoxon floor is still stated
    assert "patient-level bootstrap of the pooled out-of-fold AUC (24 patients)" in text
    assert "**significant** at 0.05" in text

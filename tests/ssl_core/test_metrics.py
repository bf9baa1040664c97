"""Metrics equal scikit-learn's; bootstrap intervals are seeded and survive missing classes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from ssl_core.metrics import bootstrap_metrics, classification_metrics


def _predictions(k: int, n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.2
    logits = np.round(logits, 1)  # ties in the scores, which AUC must count as 1/2
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _sklearn(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    pred = p.argmax(axis=1)
    auc = roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    return {"auc": auc, "f1_macro": f1_score(y, pred, average="macro", zero_division=0),
            "f1_micro": f1_score(y, pred, average="micro"), "accuracy": accuracy_score(y, pred),
            "balanced_accuracy": balanced_accuracy_score(y, pred)}


@pytest.mark.parametrize("k", [2, 3, 6])
def test_metrics_equal_scikit_learn_on_fixed_predictions(k):
    y, p = _predictions(k)
    ours, ref = classification_metrics(y, p), _sklearn(y, p)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name


def test_binary_scores_may_be_given_as_one_column():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.5, 0.6])
    m = classification_metrics(y, s)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, (s > 0.5).astype(int)))  # 0.5 itself -> class 0


def test_f1_macro_counts_a_never_predicted_class_as_zero_like_scikit_learn():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[[0, 0, 1, 1, 1, 1]]  # class 2 never predicted
    assert classification_metrics(y, p)["f1_macro"] == pytest.approx(
        f1_score(y, p.argmax(1), average="macro", zero_division=0))


def test_bootstrap_interval_contains_the_estimate_and_is_deterministic_per_seed():
    y, p = _predictions(3, n=120, seed=4)
    a = bootstrap_metrics(y, p, n_boot=400, seed=7)
    b = bootstrap_metrics(y, p, n_boot=400, seed=7)
    c = bootstrap_metrics(y, p, n_boot=400, seed=8)
    assert a.flat() == b.flat()
    assert a.flat() != c.flat()
    point = classification_metrics(y, p)
    for name, ci in a.metrics.items():
        assert ci.value == point[name]
        assert ci.low <= ci.value <= ci.high, name
        assert ci.high - ci.low > 0.01, name  # a real interval at n=120
    assert a.n_boot == 400


def test_bootstrap_percentiles_match_a_plain_resampling_loop_with_scikit_learn():
    y, p = _predictions(2, n=60, seed=5)
    res = bootstrap_metrics(y, p, metrics=["auc", "accuracy"], n_boot=300, seed=3)
    # the same draws, replayed with index resampling and scikit-learn
    rng = np.random.default_rng(3)
    aucs, accs = [], []
    while len(aucs) < 300:
        idx = rng.integers(0, len(y), size=(min(256, 2 * (300 - len(aucs))), len(y)))
        for row in idx:
            if len(np.unique(y[row])) < 2:
                continue
            if len(aucs) < 300:
                aucs.append(roc_auc_score(y[row], p[row, 1]))
                accs.append(accuracy_score(y[row], p[row].argmax(1)))
    assert res.metrics["auc"].low == pytest.approx(np.quantile(aucs, 0.025), abs=1e-12)
    assert res.metrics["auc"].high == pytest.approx(np.quantile(aucs, 0.975), abs=1e-12)
    assert res.metrics["accuracy"].high == pytest.approx(np.quantile(accs, 0.975), abs=1e-12)


def test_bootstrap_redraws_replicates_that_miss_a_class():
    # class 2 has a single sample: about 1 in e^1 replicates of n=30 miss it
    y = np.array([0] * 15 + [1] * 14 + [2])
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=30)
    p[np.arange(30), y] += 0.5
    p /= p.sum(1, keepdims=True)
    res = bootstrap_metrics(y, p, n_boot=200, seed=1)
    assert res.n_boot == 200
    assert 30 < res.n_rejected < 300  # ~ 200 * e^-1 / (1 - e^-1) ~ 116 expected
    for ci in res.metrics.values():
        assert np.isfinite(ci.low) and np.isfinite(ci.high)


def test_bad_inputs_are_reported_clearly():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        classification_metrics([0, 2], [[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="matching scores"):
        classification_metrics([0, 1, 1], [[0.5, 0.5], [0.2, 0.8]])
    with pytest.raises(ValueError, match="unknown metric"):
        classification_metrics([0, 1], [0.2, 0.8], metrics=["precision"])

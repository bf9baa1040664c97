"""The study's design without Ray: patient-level folds, nested size subsets, sizes, sample-count search."""

from __future__ import annotations

import numpy as np
import pytest

from ctssl_base.errors import UserError
from ray_jobs.finetune.config import parse_sizes
from ray_jobs.finetune.folds import make_folds, nested_subset
from ray_jobs.finetune.search import SearchState, bisect_sizes, ladder, threshold_for
from ray_jobs.trial_record import SizeSpec


def _cohort(n_patients: int = 20, slices: int = 7, seed: int = 0):
    """Patients with 7 slices each; labels per patient, 60 % class a, 40 % class b."""
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i:02d}" for i in range(n_patients)], slices)
    plabel = {f"p{i:02d}": ("a" if i % 5 < 3 else "b") for i in range(n_patients)}
    labels = np.array([plabel[p] for p in patients])
    order = rng.permutation(len(patients))  # rows of a patient are not contiguous in a real table
    return patients[order], labels[order]


def test_no_patient_is_in_two_parts_of_a_fold_and_each_patient_is_tested_once():
    patients, labels = _cohort(20)
    folds = make_folds(patients, labels, k=5, val_fraction=0.2, seed=3)
    assert len(folds) == 5
    tested = []
    for f in folds:
        tr, va, te = (set(patients[ix]) for ix in (f.train, f.val, f.test))
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert len(f.train) + len(f.val) + len(f.test) == len(patients)  # every row used once per fold
        tested += sorted(te)
    assert sorted(tested) == sorted(set(patients))  # 20 patients, each in exactly one test fold


def test_folds_are_stratified_by_patient_label():
    patients, labels = _cohort(20)
    for f in make_folds(patients, labels, k=5, seed=1):
        test_patients = set(patients[f.test])
        # 12 "a" and 8 "b" patients dealt over 5 folds: 2-3 of a and 1-2 of b per test fold
        n_a = len({p for p in test_patients if labels[patients == p][0] == "a"})
        n_b = len(test_patients) - n_a
        assert 2 <= n_a <= 3 and 1 <= n_b <= 2
        assert set(labels[f.val]) == {"a", "b"}  # validation AUC is defined


def test_slice_level_labels_with_every_class_in_every_patient_give_balanced_patient_folds():
    # CT volumes labelled per slice by anatomical region: every patient has every class, and the
    # majority class of every patient is the same, so per-patient stratification is impossible.
    rng = np.random.default_rng(0)
    patients, labels = [], []
    for i in range(24):
        regions = ["lung"] * int(rng.integers(4, 8)) + ["liver"] * int(rng.integers(3, 6)) + ["pelvis"] * 9
        patients += [f"p{i:02d}"] * len(regions)
        labels += regions
    patients, labels = np.array(patients), np.array(labels)
    folds = make_folds(patients, labels, k=3, val_fraction=0.25, seed=0)
    tested = []
    for f in folds:
        tr, va, te = (set(patients[ix]) for ix in (f.train, f.val, f.test))
        assert not (tr & va) and not (tr & te) and not (va & te)
        tested += sorted(te)
        assert len(te) == 8 and 3 <= len(va) <= 5  # a third of 24 patients; a quarter of the other 16
        for cls in ("lung", "liver", "pelvis"):  # each test fold holds about a third of each class
            share = np.sum(labels[f.test] == cls) / np.sum(labels == cls)
            assert 0.28 <= share <= 0.39, (cls, share)
        assert set(labels[f.val]) == {"lung", "liver", "pelvis"}
    assert sorted(tested) == sorted(set(patients))


def test_folds_depend_only_on_the_seed():
    patients, labels = _cohort(20)
    a = make_folds(patients, labels, k=5, seed=7)
    b = make_folds(patients, labels, k=5, seed=7)
    c = make_folds(patients, labels, k=5, seed=8)
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x.test, y.test) for x, y in zip(a, c, strict=True))


def test_size_subsets_are_nested_seeded_and_stratified():
    patients, labels = _cohort(20)
    fold = make_folds(patients, labels, k=5, seed=0)[0]
    sizes = [SizeSpec("per_class", n) for n in (5, 10, 20)] + [SizeSpec("per_class", -1)]
    subsets = [set(nested_subset(fold.train, labels, s, seed=11).tolist()) for s in sizes]
    for small, big in zip(subsets, subsets[1:], strict=False):
        assert small < big  # strictly nested
    counts = {c: int((labels[list(subsets[0])] == c).sum()) for c in ("a", "b")}
    assert counts == {"a": 5, "b": 5}
    assert subsets[-1] == set(fold.train.tolist())  # "all" is the whole training part
    other_seed = set(nested_subset(fold.train, labels, sizes[0], seed=12).tolist())
    assert other_seed != subsets[0]


def test_reduction_levels_keep_the_rounded_share_of_each_class():
    labels = np.array(["a"] * 40 + ["b"] * 20)
    train = np.arange(60)
    kept = nested_subset(train, labels, SizeSpec("reduction", 75), seed=0)
    assert (labels[kept] == "a").sum() == 10 and (labels[kept] == "b").sum() == 5
    bigger = nested_subset(train, labels, SizeSpec("reduction", 50), seed=0)
    assert set(kept) < set(bigger)


def test_sizes_parse_from_either_flag_and_bad_values_are_named():
    assert [s.label for s in parse_sizes()] == ["n5", "n10", "n20", "n40", "all"]  # the study file's default
    assert [s.label for s in parse_sizes(reductions="0,25,90")] == ["r90", "r25", "r0"]
    assert [s.label for s in parse_sizes(samples_per_class="all,5,60,10")] == ["n5", "n10", "n60", "all"]
    with pytest.raises(UserError, match="'abc' is not a whole number"):
        parse_sizes(samples_per_class="5,abc")
    with pytest.raises(UserError, match="100 must be in 0..99"):
        parse_sizes(reductions="0,100")


def test_too_few_patients_for_the_folds_is_a_clear_error():
    patients, labels = _cohort(4)
    with pytest.raises(UserError, match="4 patients cannot make 5 patient-level folds"):
        make_folds(patients, labels, k=5)


def test_bisection_finds_the_smallest_passing_size_with_few_evaluations():
    # a learning curve AUC(n) = 0.95 - 0.3 / sqrt(n): reaches 0.9 at n >= 36
    def auc(n: int) -> float:
        return 0.95 - 0.3 / np.sqrt(n)

    cands = ladder(None, max_per_class=500)
    assert cands == [5, 8, 12, 18, 27, 40, 60, 90, 135, 200]
    calls: list[dict[str, int]] = []

    def evaluate(todo):
        calls.append(dict(todo))
        return {k: auc(v) for k, v in todo.items()}

    st = SearchState("byol", cands, threshold_for(None, 0.9, None))
    bisect_sizes([st], evaluate)
    assert st.result(full_passes=True) == 40
    assert len(calls) <= 4  # log2(10) rounds instead of 10 grid points


def test_search_reuses_grid_results_and_handles_never_passing_encoders():
    cands = [5, 10, 20, 40]
    good = SearchState("spark", cands, threshold_for(0.90, None, 0.02))  # threshold 0.88
    good.evaluated = {5: 0.70, 40: 0.89}  # from the grid
    bad = SearchState("random", cands, 0.99)
    seen = []

    def evaluate(todo):
        seen.append(todo)
        return {k: {10: 0.85, 20: 0.885}.get(v, 0.6) if k == "spark" else 0.6 for k, v in todo.items()}

    bisect_sizes([good, bad], evaluate)
    assert good.result(full_passes=True) == 20
    assert bad.result(full_passes=False) is None
    assert bad.result(full_passes=True) == "all"
    assert all(5 not in t.values() or "spark" not in t for t in seen)  # grid point 5 not re-run for spark

"""Patient-level stratified folds and nested, seeded, class-stratified training-set subsets.

Slices of one patient are strongly correlated, so a patient in both training and test data would
inflate every metric: folds (and the validation split inside a fold's training part) are drawn over
*patients*, stratified by the patients' label. When the label is per slice and one patient has
slices of several classes (anatomical regions of a CT volume), patients are instead assigned
greedily so that every fold gets about its share of each class's slices. Size subsets are then drawn from
the fold's training images per class from one seeded permutation, so a smaller subset is always a prefix — hence a
subset — of every larger one, and a learning curve compares nested sets rather than unrelated draws.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ctssl_base.errors import UserError
from ray_jobs.trial_record import SizeSpec


@dataclass(frozen=True)
class FoldSplit:
    fold: int
    train: np.ndarray  # row indices into the labelled table (sorted)
    val: np.ndarray
    test: np.ndarray


def patient_labels(patients: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """One label per patient (the majority of the patient's slices), for stratifying over patients."""
    out: dict[str, str] = {}
    for p in np.unique(patients):
        out[str(p)] = Counter(labels[patients == p].tolist()).most_common(1)[0][0]
    return out


def _stratified_patient_groups(plabels: dict[str, str], k: int, rng: np.random.Generator) -> list[list[str]]:
    """Deal the patients of each class round-robin over ``k`` groups after a seeded shuffle."""
    groups: list[list[str]] = [[] for _ in range(k)]
    offset = 0
    for cls in sorted(set(plabels.values())):
        members = sorted(p for p, c in plabels.items() if c == cls)
        rng.shuffle(members)
        for i, p in enumerate(members):
            groups[(i + offset) % k].append(p)
        offset += len(members)  # continue where the previous class stopped, so group sizes stay even
    return groups


def _balanced_patient_groups(counts: dict[str, Counter], k: int, rng: np.random.Generator) -> list[list[str]]:
    """Patients with several classes each: place the largest patients first, each into the group whose
    per-class slice counts stay closest to an even 1/k share (a greedy multi-label stratification)."""
    classes = sorted({c for cnt in counts.values() for c in cnt})
    target = np.array([sum(cnt[c] for cnt in counts.values()) for c in classes], float) / k
    order = sorted(counts, key=lambda p: (-sum(counts[p].values()), rng.random()))
    load = np.zeros((k, len(classes)))
    sizes = np.zeros(k)
    groups: list[list[str]] = [[] for _ in range(k)]
    for p in order:
        vec = np.array([counts[p][c] for c in classes], float)
        scale = np.maximum(target, 1)
        # the change in squared distance to the even share, so a group nearly full is not preferred
        cost = (((load + vec - target) / scale) ** 2 - ((load - target) / scale) ** 2).sum(1) + 1e-3 * sizes
        g = int(np.argmin(cost))
        groups[g].append(p)
        load[g] += vec
        sizes[g] += 1
    return groups


def _validation_patients(plabels: dict[str, str], fraction: float, rng: np.random.Generator) -> set[str]:
    """A share of each class's patients (at least one per class that has two or more), so validation AUC
    is defined for every class and the training part keeps every class too."""
    val: set[str] = set()
    for cls in sorted(set(plabels.values())):
        members = sorted(p for p, c in plabels.items() if c == cls)
        if len(members) < 2:
            continue
        rng.shuffle(members)
        val.update(members[: max(1, min(len(members) - 1, int(round(fraction * len(members)))))])
    return val


def make_folds(patients: np.ndarray, labels: np.ndarray, k: int, val_fraction: float = 0.2,
               seed: int = 0) -> list[FoldSplit]:
    """``k`` folds; in fold i, group i is the test set and a stratified share of the remaining patients
    is the validation set. Every patient is in exactly one test set."""
    patients = np.asarray(patients).astype(str)
    labels = np.asarray(labels).astype(str)
    n_classes = len(set(labels.tolist()))
    if n_classes < 2:
        raise UserError(f"the labelled data has {n_classes} class(es); fine-tuning needs at least 2")
    plabels = patient_labels(patients, labels)
    if len(plabels) < k + 1:
        raise UserError(f"{len(plabels)} patients cannot make {k} patient-level folds plus validation")
    counts = {p: Counter(labels[patients == p].tolist()) for p in plabels}
    per_slice = any(len(c) > 1 for c in counts.values())  # a patient holds several classes
    rng = np.random.default_rng(seed)
    groups = _balanced_patient_groups(counts, k, rng) if per_slice else _stratified_patient_groups(plabels, k, rng)
    out = []
    for i in range(k):
        test_p = set(groups[i])
        rest = {p: c for p, c in plabels.items() if p not in test_p}
        if per_slice:
            val_groups = _balanced_patient_groups({p: counts[p] for p in rest},
                                                  max(2, round(1 / val_fraction)), np.random.default_rng([seed, i]))
            val_p = set(val_groups[0])
        else:
            val_p = _validation_patients(rest, val_fraction, np.random.default_rng([seed, i]))
        train_p = set(rest) - val_p
        if not train_p or not val_p:
            raise UserError(f"fold {i}: too few patients for training and validation ({len(rest)} left)")
        idx = np.arange(len(patients))
        out.append(FoldSplit(
            fold=i,
            train=idx[np.isin(patients, list(train_p))],
            val=idx[np.isin(patients, list(val_p))],
            test=idx[np.isin(patients, list(test_p))],
        ))
    return out


def nested_subset(train_idx: np.ndarray, labels: np.ndarray, size: SizeSpec, seed: int) -> np.ndarray:
    """Rows of the fold's training part kept at ``size``; prefixes of one seeded per-class permutation.

    The permutation depends only on (training rows, class, seed) — not on the size — which is what
    makes the subsets nested.
    """
    labels = np.asarray(labels).astype(str)
    keep = []
    for ci, cls in enumerate(sorted(set(labels[train_idx].tolist()))):
        rows = np.sort(train_idx[labels[train_idx] == cls])
        perm = np.random.default_rng([seed, ci, len(rows)]).permutation(rows)
        keep.append(perm[: size.per_class_count(len(rows))])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)

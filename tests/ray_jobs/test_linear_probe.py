"""Linear probe: same training rows as fine-tuning, C chosen without test rows, sane AUCs."""
from __future__ import annotations

import numpy as np

from ray_jobs.finetune.data import LabelledData
from ray_jobs.finetune.folds import make_folds, nested_subset
from ray_jobs.finetune.linear_probe import fit_probe, probe_cells
from ray_jobs.trial_record import SizeSpec


def _data(n_pat: int = 24, per: int = 6) -> LabelledData:
    patients = np.repeat([f"p{i}" for i in range(n_pat)], per)
    labels = np.repeat(np.arange(n_pat) % 2, per).astype(np.int64)
    return LabelledData(images=np.zeros((len(labels), 4, 4), np.int16), labels=labels, classes=["a", "b"],
                        patients=patients, intensity="hu", dataset="toy",
                        intensity_stats=None)


def _emb(data: LabelledData, separable: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(data.labels), 8))
    if separable:
        x[:, 0] += 6.0 * (data.labels * 2 - 1)
    return x


SIZES = [SizeSpec("per_class", 5), SizeSpec("per_class", -1)]


def test_cells_use_finetuning_training_rows(monkeypatch) -> None:
    import ray_jobs.finetune.linear_probe as lp

    data = _data()
    folds = make_folds(data.patients, data.label_names, 3, seed=0)
    seen = []
    real = lp.fit_probe

    def spy(emb, labels, train, val, test, n_classes, grid=lp.C_GRID):
        seen.append(train.copy())
        return real(emb, labels, train, val, test, n_classes, grid)

    monkeypatch.setattr(lp, "fit_probe", spy)
    rows = probe_cells(_emb(data, True), data, folds, SIZES, [0, 1])
    assert len(rows) == len(SIZES) * len(folds) * 2
    i = 0
    for size in SIZES:
        for fold in folds:
            for seed in (0, 1):
                np.testing.assert_array_equal(seen[i], nested_subset(fold.train, data.labels, size, seed))
                assert rows[i]["n_train"] == len(seen[i])
                assert (rows[i]["size"], rows[i]["fold"], rows[i]["seed"]) == (size.label, fold.fold, seed)
                i += 1
    assert {r["n_train"] for r in rows if r["size"] == "n5"} == {10}


def test_c_chosen_without_test_rows() -> None:
    data = _data()
    fold = make_folds(data.patients, data.label_names, 3, seed=0)[0]
    emb = _emb(data, False, seed=3)
    emb[:, 0] += 0.8 * (data.labels * 2 - 1)  # a weak signal, so C matters
    a = fit_probe(emb, data.labels, fold.train, fold.val, fold.test, 2)
    bad_emb, bad_lab = emb.copy(), data.labels.copy()
    bad_emb[fold.test] = np.random.default_rng(9).normal(size=(len(fold.test), emb.shape[1])) * 100
    bad_lab[fold.test] = 1 - bad_lab[fold.test]
    b = fit_probe(bad_emb, bad_lab, fold.train, fold.val, fold.test, 2)
    assert a["C"] == b["C"] and a["val_auc"] == b["val_auc"]
    assert a["auc"] != b["auc"]


def test_separable_gives_one_random_gives_half() -> None:
    data = _data(n_pat=40)
    folds = make_folds(data.patients, data.label_names, 3, seed=0)
    sep = probe_cells(_emb(data, True), data, folds, [SizeSpec("per_class", -1)], [0])
    assert all(r["auc"] > 0.99 for r in sep)
    rnd = probe_cells(_emb(data, False, seed=5), data, folds, [SizeSpec("per_class", -1)], [0, 1, 2])
    assert abs(np.mean([r["auc"] for r in rnd]) - 0.5) < 0.15


def test_embed_labelled_random_encoder_is_reproducible() -> None:
    from ray_jobs.finetune.encoders import EncoderSpec
    from ray_jobs.finetune.linear_probe import embed_labelled

    data = _data(n_pat=2, per=3)
    data.images[:] = np.random.default_rng(0).integers(-1000, 1000, data.images.shape)
    spec = EncoderSpec(name="random", source="random", backbone="resnet18", in_chans=1, method="random",
                       state=None, config={})
    a = embed_labelled(spec, data, batch=4, device="cpu")
    b = embed_labelled(spec, data, batch=2, device="cpu")
    assert a.shape == (6, 512)
    np.testing.assert_allclose(a, b, atol=1e-5)

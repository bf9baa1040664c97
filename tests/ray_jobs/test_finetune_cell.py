"""One study cell: the computation a Tune trial and the fine-tuning benchmark share, and a trial whose
validation split holds one class (no AUC there) still finishes and reports its test metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ray_jobs import tracking
from ray_jobs.finetune.cell import SELECT_METRIC, choose_recipe, fit_cell
from ray_jobs.finetune.config import FinetuneConfig, Recipe
from ray_jobs.finetune.folds import FoldSplit
from ray_jobs.finetune.trial import StudyContext, run_trial
from ssl_core.finetune import create_classifier


def _data(n: int = 48, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes a small CNN can tell apart: bright disk vs dark background."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    yy, xx = np.mgrid[:size, :size]
    disk = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(np.float32)
    x = rng.normal(0, 50, (n, size, size)).astype(np.float32) + y[:, None, None] * disk * 400
    return torch.from_numpy(x), torch.from_numpy(y)


def _cell(images, labels, recipes):
    idx = np.arange(len(labels))
    return fit_cell(images, labels, idx[:24], idx[24:36], idx[36:], recipes=recipes,
                    make_model=lambda: create_classifier("test_resnet", 2, 1), epochs=2, seed=0, init_seed=7,
                    finetune_kwargs={"batch_size": 8, "bn_recalibrate": True})


def test_a_cell_trains_every_recipe_keeps_the_best_on_validation_and_is_deterministic():
    images, labels = _data()
    recipes = [Recipe(1e-3, 0), Recipe(1e-2, 1)]
    a, b = _cell(images, labels, recipes), _cell(images, labels, recipes)
    assert [r for r, _ in a.fits] == recipes and a.index == choose_recipe(a.fits)
    assert a.recipe == recipes[a.index] and a.best_val == pytest.approx(a.fits[a.index][1])
    assert len(a.fit.history) == 2 and a.p_test.shape == (12, 2)
    np.testing.assert_allclose(a.p_test.sum(axis=1), 1.0, rtol=1e-5)
    assert list(a.y_test) == list(labels[36:].numpy())
    np.testing.assert_array_equal(a.p_test, b.p_test)  # same seeds, same answer


def test_a_trial_whose_validation_split_holds_one_class_still_reports_and_finishes(tmp_path, monkeypatch):
    import ray.tune

    reports: list[dict] = []
    monkeypatch.setattr(ray.tune, "report", lambda m: reports.append(dict(m)))
    images, labels = _data()
    y = labels.numpy()
    idx = np.arange(len(y))
    val = idx[24:36][y[24:36] == 1]  # one class only: no validation AUC
    split = FoldSplit(fold=0, train=idx[:24], val=val, test=idx[36:])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cl = tracking.client(uri)
    exp = tracking.get_or_create_experiment(cl, "one-class-val", None)
    parent = cl.create_run(exp).info.run_id
    cfg = FinetuneConfig(data="unused", storage=str(tmp_path), experiment="one-class-val", encoders=["random"],
                         epochs=2, batch_size=8, recipes=["1e-3:0", "1e-3:1"])
    settings = {**cfg.to_dict(), "img_size": 16}
    ctx = StudyContext(images=images.numpy(), labels=y, classes=["a", "b"], folds=[split],
                       encoders={"random": {"backbone": "test_resnet", "in_chans": 1, "method": "random",
                                            "state": None, "windows": None}},
                       settings=settings, tracking_uri=uri, experiment_id=exp, parent_run_id=parent, env={},
                       patients=np.array([f"p{i // 4}" for i in range(len(y))]))
    run_trial({"trial": {"encoder": "random", "size": "all", "fold": 0, "seed": 0}}, ctx)

    assert len(reports) == 2 * 2 + 1  # every epoch of both recipes, then the final result
    assert all(SELECT_METRIC in r for r in reports)  # Tune's metric check needs it in every result
    assert all(math.isnan(r[SELECT_METRIC]) for r in reports)
    assert 0.0 <= reports[-1]["test_auc"] <= 1.0
    run = cl.search_runs([exp], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent}'")[0]
    assert run.info.status == "FINISHED" and "test_auc" in run.data.metrics
    assert run.data.tags["recipe"] == "0.001:0"  # no validation AUC: the first recipe is kept

"""The online probe's parts: weighted k-NN AUC, embedding health and the collapse flag, and the
embedding pass (eval mode, fine-tuning's input preparation, training state restored)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from ssl_core.probe import ProbeSet, auc_ovr, embed, embedding_health, knn_auc, knn_scores, run_probe


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(rng: np.random.Generator, n: int, classes: int, d: int = 16, spread: float = 0.1):
    centres = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    return _unit(centres[y] + spread * rng.normal(size=(n, d))), y


@pytest.mark.parametrize("classes", [2, 4])
def test_knn_auc_is_one_on_separable_embeddings_and_chance_on_random_labels(classes):
    rng = np.random.default_rng(classes)
    centres = rng.normal(size=(classes, 16))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        return _unit(centres[y] + 0.1 * rng.normal(size=(n, 16))), y

    (bank, yb), (q, yq) = draw(400), draw(300)
    assert knn_auc(bank, yb, q, yq, classes) > 0.99
    # the same embeddings with labels unrelated to them: chance
    aucs = [knn_auc(bank, np.random.default_rng(s).integers(0, classes, 400), q,
                    np.random.default_rng(50 + s).integers(0, classes, 300), classes) for s in range(5)]
    assert abs(float(np.mean(aucs)) - 0.5) < 0.05, aucs


def test_votes_are_exp_sim_over_t_of_the_k_nearest():
    rng = np.random.default_rng(0)
    bank, q = _unit(rng.normal(size=(30, 8))), _unit(rng.normal(size=(5, 8)))
    yb = rng.integers(0, 3, 30)
    got = knn_scores(bank, yb, q, 3, k=7, temperature=0.2)
    for i in range(5):
        sim = bank @ q[i]
        top = np.argsort(-sim)[:7]
        votes = np.zeros(3)
        for j in top:
            votes[yb[j]] += math.exp(sim[j] / 0.2)
        np.testing.assert_allclose(got[i], votes / votes.sum(), rtol=1e-5)
    # k larger than the bank: every bank row votes
    assert knn_scores(bank[:4], yb[:4], q, 3, k=20).shape == (5, 3)
    with pytest.raises(ValueError, match="k >= 1 and temperature > 0"):
        knn_scores(bank, yb, q, 3, k=0)


def test_the_own_auc_equals_scikit_learns(monkeypatch):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    scores = np.round(rng.random((200, 3)), 1)  # many ties
    scores /= scores.sum(1, keepdims=True)
    want_multi = roc_auc_score(y, scores, multi_class="ovr", average="macro")
    yb = (y == 1).astype(int)
    sb = np.stack([1 - scores[:, 1], scores[:, 1]], 1)
    want_bin = roc_auc_score(yb, sb[:, 1])
    assert auc_ovr(y, scores) == pytest.approx(want_multi, abs=1e-12)
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)  # scikit-learn not installed
    assert auc_ovr(y, scores) == pytest.approx(want_multi, abs=1e-12)
    assert auc_ovr(yb, sb) == pytest.approx(want_bin, abs=1e-12)
    # a class the queries lack is left out of the macro mean; one class only: undefined
    assert auc_ovr(np.array([0, 0, 1, 1]), np.eye(3)[[0, 0, 1, 1]]) == 1.0
    assert math.isnan(auc_ovr(np.zeros(4, int), np.full((4, 2), 0.5)))


def test_health_of_spread_low_rank_and_constant_embeddings():
    rng = np.random.default_rng(0)
    d = 64
    spread = embedding_health(_unit(rng.normal(size=(2000, d))))
    assert spread.emb_std == pytest.approx(1 / math.sqrt(d), rel=0.05)
    assert spread.eff_rank > 0.9 * d and spread.collapse_reason() is None
    # all variation along one direction (a line through a point): rank ~1, flagged
    t = rng.normal(size=(500, 1))
    line = _unit(np.ones((500, d)) + t * np.eye(d)[0])
    low = embedding_health(line)
    assert low.eff_rank < 1.5 and "eff_rank" in low.collapse_reason()
    const = embedding_health(_unit(np.ones((100, d))))
    assert const.emb_std == 0.0 and const.eff_rank == 0.0
    reason = const.collapse_reason()
    assert "emb_std 0 < 0.001/sqrt(64)" in reason and "eff_rank 0 < 2" in reason


class _Constant(nn.Module):
    """An encoder that maps every slice to the same vector (a collapsed one)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), 8)


def _probe_set(rng: np.random.Generator, n: int = 40) -> ProbeSet:
    imgs = rng.integers(-1000, 400, (n, 24, 24)).astype(np.int16)
    y = np.arange(n) % 2
    return ProbeSet(train_images=imgs[:30], train_labels=y[:30], val_images=imgs[30:], val_labels=y[30:],
                    classes=["a", "b"], train_rows=np.arange(30), val_rows=np.arange(30, n))


def test_a_constant_output_encoder_reads_as_collapsed():
    rng_state = torch.get_rng_state()
    res = run_probe(_Constant(), _probe_set(np.random.default_rng(0)))
    assert torch.equal(torch.get_rng_state(), rng_state)  # a training loop's random stream is untouched
    assert res.health.collapse_reason() is not None
    assert res.knn_auc == pytest.approx(0.5)  # every neighbour ties: no ranking at all
    assert set(res.metrics()) == {"probe.knn_auc", "probe.emb_std", "probe.eff_rank"}


def _encoder(in_chans: int) -> nn.Module:
    from ssl_core.backbones import create_backbone

    return create_backbone("test_resnet", in_chans=in_chans).train()


def test_embed_feeds_the_encoder_what_fine_tuning_evaluates_on():
    from ssl_core.finetune import FineTuner, FineTuneRecipe, create_classifier

    torch.manual_seed(0)
    hu = np.random.default_rng(1).integers(-1000, 1500, (10, 40, 40)).astype(np.int16)
    windows = ["lung", "soft_tissue", "bone"]
    enc = _encoder(3)
    seen: list[torch.Tensor] = []
    enc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    z = embed(enc, hu, img_size=32, windows=windows, batch_size=4)
    assert [len(x) for x in seen] == [4, 4, 2]  # batch-wise
    assert z.shape == (10, enc.num_features) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    tuner = FineTuner(create_classifier("test_resnet", num_classes=2, in_chans=3),
                      FineTuneRecipe(img_size=32, windows=windows), device="cpu")
    want = tuner._prepare(torch.from_numpy(hu).unsqueeze(1), train=False)
    torch.testing.assert_close(torch.cat(seen), want.contiguous())
    with pytest.raises(ValueError, match="HU slices"):
        embed(enc, hu[0])


def test_embed_runs_in_eval_mode_without_gradients_and_restores_every_modules_mode():
    torch.manual_seed(0)
    enc = _encoder(1)
    frozen = next(m for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
    frozen.eval()  # a module its owner keeps in eval mode stays so
    modes = {n: m.training for n, m in enc.named_modules()}
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [b.running_mean.clone() for b in bns]
    grads: list[bool] = []
    enc.register_forward_hook(lambda m, _a, out: grads.append(out.requires_grad or m.training))
    hu = np.random.default_rng(2).integers(-1000, 400, (6, 32, 32)).astype(np.int16)
    embed(enc, hu)
    assert grads == [False]  # eval mode, no autograd graph
    assert all(torch.equal(b.running_mean, s) for b, s in zip(bns, stats, strict=True))
    assert {n: m.training for n, m in enc.named_modules()} == modes

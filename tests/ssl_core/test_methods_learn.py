"""Every method trains: its loss falls on a tiny phantom pool, its encoder exports to plain timm, and
after a short pre-training a kNN probe on its encoder beats the same encoder at initialisation on a
phantom downstream task (which body region a slice shows)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from data_prep.phantom import REGION_CLASSES, render_slices
from ssl_core.backbones import export_encoder_state_dict
from ssl_core.ct_window import apply_window
from ssl_core.methods import StepContext, create_method, method_names

#: phantom slice size per method (views have the same size): SparK needs a multiple of the
#: encoder's 32 px downsampling with more than one patch, so 64 px (2 x 2 patches)
SIZE = {"byol": 48, "mocov2": 48, "swav": 48, "spark": 64}
BACKBONE = "test_resnet"
BATCH = 32

#: small-pool settings, as ``suggest_from_dataset_size`` would pick them, plus short-run momentum
METHOD_KWARGS = {
    "byol": {},
    "mocov2": {"queue_size": 128, "momentum": 0.99, "symmetric": True},
    "swav": {"n_prototypes": 30, "freeze_prototypes_iters": 5, "n_local": 2},
    "spark": {"decoder_width": 64},
}
PROBE_STEPS = 100
METHODS = method_names()


@functools.cache
def _pool(size: int) -> torch.Tensor:
    """256 unlabelled phantom slices from 16 patients, HU, (N, 1, size, size)."""
    return torch.from_numpy(render_slices(256, size=size, seed=1).hu.astype(np.float32)).unsqueeze(1)


@functools.cache
def _labelled(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """384 labelled slices from 24 other patients: HU, region label, patient."""
    s = render_slices(384, size=size, seed=2)
    hu = torch.from_numpy(s.hu.astype(np.float32)).unsqueeze(1)
    region = torch.tensor([REGION_CLASSES.index(r) for r in s.region])
    return hu, region, torch.from_numpy(s.patient)


def _make(method: str, view_size: int | None = None):
    torch.manual_seed(0)
    size = view_size or SIZE[method]
    return create_method(method, backbone=BACKBONE, img_size=size, **METHOD_KWARGS[method])


def _train(m, pool: torch.Tensor, steps: int, lr: float = 2e-3, seed: int = 0) -> list[float]:
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        ctx = StepContext(step=step, total_steps=steps)
        batch = pool[torch.randint(0, len(pool), (BATCH,), generator=g)]
        opt.zero_grad(set_to_none=True)
        loss = m.training_step(batch, ctx)["loss"]
        loss.backward()
        opt.step()
        m.after_optimizer_step(ctx)
        losses.append(loss.item())
    return losses


def _fixed_loss(m, batch: torch.Tensor) -> float:
    """Loss on a fixed batch with fixed augmentations (and, for MoCo, fixed negatives)."""
    saved = m.queue.queue.clone() if hasattr(m, "queue") else None
    if saved is not None:
        m.queue.queue.copy_(F.normalize(torch.randn(saved.shape, generator=torch.Generator().manual_seed(9)), dim=1))
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        with torch.no_grad():
            loss = m.training_step(batch, StepContext(step=10_000, total_steps=10_000))["loss"].item()
    if saved is not None:
        m.queue.queue.copy_(saved)
    return loss


def _probe_accuracy(encoder: torch.nn.Module, size: int, k: int = 5) -> tuple[float, float]:
    """Region accuracy of a linear probe (logistic regression on standardised features) and of a
    cosine kNN: slices of even patients train the probe, slices of odd patients test it."""
    hu, region, patient = _labelled(size)
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        f = encoder(apply_window(hu, "lung"))
    encoder.train(was_training)
    ref, test = patient % 2 == 0, patient % 2 == 1
    z = (f - f[ref].mean(0)) / (f[ref].std(0) + 1e-6)
    probe = LogisticRegression(C=0.1, max_iter=2000).fit(z[ref].numpy(), region[ref].numpy())
    linear = float(probe.score(z[test].numpy(), region[test].numpy()))
    fn = F.normalize(f, dim=1)
    nearest = (fn[test] @ fn[ref].t()).topk(k, dim=1).indices
    knn = (torch.mode(region[ref][nearest], dim=1).values == region[test]).float().mean().item()
    return linear, knn


@pytest.mark.parametrize("method", METHODS)
def test_forty_steps_lower_the_loss_on_a_fixed_batch(method):
    size = 64 if method == "spark" else 32
    m = _make(method, view_size=size)
    pool = _pool(size)
    batch = pool[:BATCH]
    before = _fixed_loss(m, batch)
    _train(m, pool, steps=40)
    after = _fixed_loss(m, batch)
    print(f"[learn] {method}: fixed-batch loss {before:.4f} -> {after:.4f} after 40 steps")
    assert after < before - 0.1


@pytest.mark.parametrize("method", METHODS)
def test_pretrained_encoder_exports_to_timm_with_only_the_classifier_missing(method):
    size = 64 if method == "spark" else 32
    m = _make(method, view_size=size)
    _train(m, _pool(size), steps=1)
    sd = export_encoder_state_dict(m.encoder())
    clf = timm.create_model(BACKBONE, in_chans=1, num_classes=len(REGION_CLASSES))
    result = clf.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    key = next(k for k in sd if k.endswith("conv1.weight"))
    torch.testing.assert_close(clf.state_dict()[key], m.encoder().state_dict()[key])
    assert clf(torch.rand(2, 1, size, size)).shape == (2, len(REGION_CLASSES))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_short_pretraining_beats_the_random_encoder_in_a_linear_probe_or_knn(method):
    size = SIZE[method]
    m = _make(method)
    random_linear, random_knn = _probe_accuracy(m.encoder(), size)
    _train(m, _pool(size), steps=PROBE_STEPS)
    linear, knn = _probe_accuracy(m.encoder(), size)
    print(f"[learn] {method}: region accuracy after {PROBE_STEPS} steps, random init -> pre-trained: "
          f"linear probe {random_linear:.3f} -> {linear:.3f}, 5-NN {random_knn:.3f} -> {knn:.3f}")
    # "a linear probe or kNN beats a random encoder" (issue 4): the better probe gains at least 0.04
    # and the other does not lose. SparK's masked-reconstruction features gain mostly in 5-NN after
    # 100 steps (seen: linear 0.630 -> 0.635 .. 0.693, 5-NN 0.385 -> 0.469 .. 0.562).
    gains = (linear - random_linear, knn - random_knn)
    assert max(gains) > 0.04 and min(gains) > -0.01, gains

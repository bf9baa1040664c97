"""Fine-tuning: frozen-then-unfrozen backbone, per-epoch validation, best-epoch selection."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from ssl_core.backbones import create_backbone, export_encoder_state_dict
from ssl_core.finetune import FineTuner, FineTuneRecipe, TensorBatches, create_classifier


def _blob_data(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """HU slices: class 1 has a bright disk (+400 HU) on water, class 0 does not."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    hu = 20.0 * torch.randn(n, 1, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.randint(8, size - 8, (n, 2), generator=g)
    disk = ((yy - c[:, :1, None]) ** 2 + (xx - c[:, 1:, None]) ** 2 < 36).float()
    hu += 400.0 * disk.unsqueeze(1) * y.view(-1, 1, 1, 1)
    return hu, y


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_backbone_is_frozen_for_the_first_epochs_then_trained():
    torch.manual_seed(0)
    model = create_classifier("test_resnet", num_classes=2, in_chans=1)
    cfg = FineTuneRecipe(epochs=3, frozen_epochs=2, lr=1e-3, batch_size=16, windows=["soft_tissue"])
    ft = FineTuner(model, cfg, device="cpu")
    hu, y = _blob_data(32, seed=0)
    train = ft.batches(hu, y, train=True)
    head = {"fc.weight", "fc.bias"}
    states = [_snapshot(model)]
    for epoch in range(3):
        rec = ft.train_one_epoch(train, epoch)
        assert rec["frozen"] == float(epoch < 2)
        states.append(_snapshot(model))

    for epoch in (0, 1):  # frozen: every backbone weight *and* BN statistic is untouched
        before, after = states[epoch], states[epoch + 1]
        for k in before:
            if k in head:
                assert not torch.equal(before[k], after[k]), f"classifier {k} must train in epoch {epoch}"
            else:
                assert torch.equal(before[k], after[k]), f"{k} changed in frozen epoch {epoch}"
    params = {n for n, _ in model.named_parameters()} - head
    unchanged = [k for k in params if torch.equal(states[2][k], states[3][k])]
    assert unchanged == []  # after unfreezing, Adam (with weight decay) moves every backbone weight
    assert not torch.equal(states[2]["bn1.running_mean"], states[3]["bn1.running_mean"])
    assert all(p.requires_grad for p in model.parameters())


def test_fit_reports_every_epoch_and_keeps_the_best_epochs_weights():
    torch.manual_seed(1)
    model = create_classifier("test_resnet", num_classes=2, in_chans=1)
    cfg = FineTuneRecipe(epochs=4, frozen_epochs=1, lr=1e-3, batch_size=16, windows=["soft_tissue"],
                         select_metric="auc")
    ft = FineTuner(model, cfg, device="cpu")
    hu, y = _blob_data(48, seed=1)
    vhu, vy = _blob_data(32, seed=2)
    seen = []
    res = ft.fit(ft.batches(hu, y, train=True), ft.batches(vhu, vy, train=False), on_epoch=seen.append)
    assert [r["epoch"] for r in res.history] == [0.0, 1.0, 2.0, 3.0] and seen == res.history
    for r in res.history:
        assert {"train_loss", "val_auc", "val_f1_macro", "val_f1_micro", "val_accuracy",
                "val_balanced_accuracy", "val_loss"} <= r.keys()
    aucs = [r["val_auc"] for r in res.history]
    assert res.best_epoch == int(np.argmax(aucs))  # first of any ties
    assert res.best_metrics == res.history[res.best_epoch]
    assert res.history[-1]["val_auc"] > 0.8, aucs  # the disk task is learnable in 4 short epochs

    model.load_state_dict(res.best_state)  # the kept weights reproduce the best epoch's numbers
    again = ft.evaluate(ft.batches(vhu, vy, train=False))
    assert again["val_auc"] == pytest.approx(res.best_metrics["val_auc"], abs=1e-9)


def test_classifier_starts_from_the_exported_encoder():
    torch.manual_seed(2)
    enc = create_backbone("resnet18", in_chans=1)
    sd = export_encoder_state_dict(enc)
    model = create_classifier("resnet18", num_classes=3, in_chans=1, encoder_state=sd)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v)
    assert model.fc.out_features == 3
    with pytest.raises(ValueError, match="missing"):
        create_classifier("resnet34", num_classes=3, in_chans=1, encoder_state=sd)


def test_predictions_are_the_same_from_tensors_or_any_iterable_of_batches():
    torch.manual_seed(3)
    ft = FineTuner(timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=2),
                   FineTuneRecipe(epochs=1, frozen_epochs=0, batch_size=8), device="cpu")
    hu, y = _blob_data(20, seed=3)
    a_y, a_p = ft.predict(TensorBatches(hu, y, batch_size=8))
    b_y, b_p = ft.predict([(hu[:5], y[:5]), (hu[5:], y[5:])])
    assert np.array_equal(a_y, b_y)
    np.testing.assert_allclose(a_p, b_p, rtol=1e-5, atol=1e-6)
    assert a_p.shape == (20, 2)


def test_training_batches_are_reshuffled_each_epoch_but_seeded():
    hu, y = torch.arange(10.0).view(10, 1, 1, 1), torch.zeros(10)
    a, b = TensorBatches(hu, y, 4, shuffle=True, seed=5), TensorBatches(hu, y, 4, shuffle=True, seed=5)
    e1 = [x.flatten().tolist() for x, _ in a]
    e2 = [x.flatten().tolist() for x, _ in a]
    assert e1 != e2 and e1 == [x.flatten().tolist() for x, _ in b]
    assert sorted(sum(e1, [])) == list(range(10)) and len(a) == 3


def test_bad_configuration_and_inputs_are_refused():
    with pytest.raises(ValueError, match="frozen_epochs"):
        FineTuneRecipe(epochs=5, frozen_epochs=6)
    ft = FineTuner(create_classifier("test_resnet", num_classes=2), FineTuneRecipe(epochs=1, frozen_epochs=0),
                   device="cpu")
    with pytest.raises(ValueError, match="re-iterable"):
        ft.fit(iter([(torch.zeros(2, 1, 32, 32), torch.zeros(2))]), [])
    with pytest.raises(ValueError, match=r"HU slices \(N, 1, H, W\)"):
        ft.predict([(torch.zeros(2, 3, 32, 32), torch.zeros(2))])
    with pytest.raises(ValueError, match="select_metric 'precision'"):
        FineTuner(create_classifier("test_resnet", num_classes=2),
                  FineTuneRecipe(epochs=1, frozen_epochs=0, select_metric="precision"), device="cpu").fit(
            TensorBatches(torch.zeros(4, 1, 32, 32), torch.tensor([0, 1, 0, 1]), 4),
            TensorBatches(torch.zeros(4, 1, 32, 32), torch.tensor([0, 1, 0, 1]), 4))


def test_bn_recalibration_sets_running_stats_to_the_exact_average_of_the_training_images():
    torch.manual_seed(3)
    model = create_classifier("test_resnet", num_classes=2, in_chans=1)
    ft = FineTuner(model, FineTuneRecipe(epochs=1, frozen_epochs=0, lr=1e-3, batch_size=8,
                                         windows=["soft_tissue"], bn_recalibrate=True), device="cpu")
    hu, y = _blob_data(24, seed=4)
    ft.train_one_epoch(ft.batches(hu, y, train=True), 0)
    conv, bn1 = model.conv1[0], model.conv1[1]  # test_resnet's deep stem: conv -> batch norm first
    momentum = bn1.momentum
    # what the first batch norm sees: the unaugmented, windowed images through the first conv
    with torch.no_grad():
        x = conv(ft._prepare(hu, train=False))
    used = ft.recalibrate_bn(ft.batches(hu, y, train=True))
    assert used == 24
    torch.testing.assert_close(bn1.running_mean, x.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn1.momentum == momentum  # restored
    # the order of the batches does not matter (cumulative average), the weights did not move
    before = _snapshot(model)
    ft.recalibrate_bn(ft.batches(hu.flip(0), y.flip(0), train=False))
    torch.testing.assert_close(bn1.running_mean, before["conv1.1.running_mean"], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k)


def test_fit_recalibrates_before_each_evaluation_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(FineTuner, "recalibrate_bn", lambda self, batches: calls.append(1) or 0)
    hu, y = _blob_data(16, seed=5)
    for flag, expected in ((True, 2), (False, 0)):
        calls.clear()
        torch.manual_seed(0)
        ft = FineTuner(create_classifier("test_resnet", num_classes=2, in_chans=1),
                       FineTuneRecipe(epochs=2, frozen_epochs=0, lr=1e-3, batch_size=8, windows=["soft_tissue"],
                                      bn_recalibrate=flag), device="cpu")
        ft.fit(ft.batches(hu, y, train=True), ft.batches(hu, y, train=False))
        assert len(calls) == expected

"""SparK: masked-patch loss, decoder shape, learning on phantom slices, timm-layout export."""

from __future__ import annotations

import pytest
import timm
import torch

from data_prep.phantom import render_slices
from ssl_core.backbones import export_encoder_state_dict
from ssl_core.methods import StepContext, create_method, method_names
from ssl_core.methods.spark import SparK, masked_patch_loss, patchify, unpatchify
from ssl_core.optim import build_schedule, create_optimizer
from ssl_core.spark.sparse import upsample_mask


def _spark(backbone: str = "resnet18", img_size: int = 64, **kw) -> SparK:
    torch.manual_seed(0)
    kw.setdefault("decoder_width", 64)
    return create_method("spark", backbone=backbone, in_chans=1, img_size=img_size, **kw)


def test_spark_is_registered_with_the_papers_defaults():
    assert "spark" in method_names()
    m = _spark()
    assert m.mask_ratio == 0.6 and m.patch == 32
    d = m.optimizer_defaults()
    assert (d.name, d.base_lr, d.base_batch_size, d.weight_decay, d.weight_decay_end) == \
        ("lamb", 2e-4, 256, 0.04, 0.2)
    assert d.extra["betas"] == (0.9, 0.95)  # ResNet; ConvNeXt uses 0.999


def test_loss_ignores_visible_patches_and_reacts_to_masked_ones():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 2, 96, 96, generator=g)
    recon = torch.randn(3, 2, 96, 96, generator=g)
    active = torch.zeros(3, 1, 3, 3, dtype=torch.bool)
    active[:, :, 0, :] = True  # first patch row visible
    active[1, 0, 2, 2] = True
    vis = upsample_mask(active, 32).expand_as(recon)
    base = masked_patch_loss(target, recon, active, 32)

    wild = torch.where(vis, recon + 1e4 * torch.randn(recon.shape, generator=g), recon)
    assert masked_patch_loss(target, wild, active, 32) == base  # bit-identical
    nan_visible = torch.where(vis, torch.full_like(recon, float("nan")), recon)
    assert masked_patch_loss(target, nan_visible, active, 32) == base

    nudged = recon.clone()
    nudged[0, :, 64:, 64:] += 1.0  # a masked patch of sample 0
    assert masked_patch_loss(target, nudged, active, 32) > base


def test_loss_is_mse_on_per_patch_normalised_target_averaged_over_masked_patches():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 1, 64, 64, generator=g)
    recon = torch.randn(2, 1, 64, 64, generator=g)
    active = torch.tensor([[[[True, False], [False, False]]], [[[False, True], [True, True]]]])
    per_patch = []
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if active[b, 0, i, j]:
                    continue
                t = target[b, :, 32 * i:32 * (i + 1), 32 * j:32 * (j + 1)].flatten()
                r = recon[b, :, 32 * i:32 * (i + 1), 32 * j:32 * (j + 1)].flatten()
                t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                per_patch.append(((r - t) ** 2).mean())
    assert len(per_patch) == 4  # 3 masked patches in sample 0, 1 in sample 1
    torch.testing.assert_close(masked_patch_loss(target, recon, active, 32), torch.stack(per_patch).mean())


def test_patchify_round_trips():
    x = torch.randn(2, 3, 64, 96)
    p = patchify(x, 32)
    assert p.shape == (2, 6, 3 * 32 * 32)
    assert torch.equal(unpatchify(p, 32, 3, (64, 96)), x)


@pytest.mark.parametrize("backbone,size", [("test_resnet", 64), ("test_resnet", 96), ("test_convnext", 64)])
def test_decoder_output_has_the_input_shape(backbone, size):
    m = _spark(backbone, size).train()
    x = torch.rand(2, 1, size, size)
    active = m.make_mask(2, (size, size), x.device, torch.Generator().manual_seed(0))
    out = m.reconstruct(x, active)
    assert out.shape == x.shape


def test_three_channel_input_is_reconstructed_in_three_channels():
    m = create_method("spark", backbone="test_resnet", in_chans=3, img_size=64, decoder_width=32)
    hu = torch.full((2, 1, 64, 64), -500.0)
    out = m.training_step(hu, StepContext(0, 1))
    assert out["loss"].ndim == 0
    x = torch.rand(2, 3, 64, 64)
    assert m.reconstruct(x, m.make_mask(2, (64, 64), x.device)).shape == (2, 3, 64, 64)


def test_encoder_stem_and_every_mask_token_receive_gradients():
    m = _spark("test_resnet").train()
    x = torch.rand(4, 1, 64, 64)
    out = m.masked_loss(x, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    conv1 = next(c for c in m.encoder().modules() if isinstance(c, torch.nn.Conv2d)).weight.grad
    assert conv1 is not None and conv1.abs().sum() > 0
    assert all(t.grad is not None for t in m.densify.mask_tokens)


def test_spark_lowers_its_loss_on_phantom_slices_within_40_steps():
    hu = torch.from_numpy(render_slices(16, size=64, seed=3).hu).float().unsqueeze(1)
    m = _spark("test_resnet", 64, decoder_width=64).train()
    # a 40-step run needs AdamW at 2e-3: LAMB's recipe lr (2e-4 x batch / 256) is tuned for 1600 epochs
    defaults = m.optimizer_defaults()
    defaults.name, defaults.base_lr, defaults.base_batch_size, defaults.warmup_epochs = "adamw", 2e-3, 8, 0.0
    opt = create_optimizer(m, defaults, batch_size=8)
    sched = build_schedule(opt, defaults, total_steps=40, steps_per_epoch=2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(40):
        sched.step(step)
        ctx = StepContext(step, 40)
        loss = m.training_step(hu[torch.randperm(16, generator=g)[:8]], ctx, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step(ctx)
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 0.95  # an untrained decoder predicts ~0 for unit-variance normalised patches
    assert last < 0.9 * first, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("backbone", ["resnet18", "test_convnext"])
def test_exported_encoder_loads_into_timm_with_only_the_classifier_missing(backbone):
    m = _spark(backbone)
    m.training_step(torch.full((2, 1, 64, 64), -300.0), StepContext(0, 1))  # BN stats move
    sd = export_encoder_state_dict(m.encoder())
    model = timm.create_model(backbone, pretrained=False, in_chans=1, num_classes=5)
    res = model.load_state_dict(sd, strict=False)
    head = {"resnet18": {"fc.weight", "fc.bias"}, "test_convnext": {"head.fc.weight", "head.fc.bias"}}[backbone]
    assert set(res.missing_keys) == head and res.unexpected_keys == []
    for k, v in model.state_dict().items():
        if k not in head:
            assert torch.equal(v, sd[k]), k
    assert all(not type(mod).__name__.startswith("Sparse") for mod in model.modules())
    model.eval()
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 5)


def test_input_size_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ValueError, match="img_size 80 must be a multiple of the patch size 32"):
        _spark("resnet18", 80)
    with pytest.raises(ValueError, match="single 32-px patch"):
        _spark("resnet18", 32)


def test_the_effective_mask_ratio_is_what_random_mask_masks():
    from ssl_core.methods.spark import effective_mask_ratio
    from ssl_core.spark.sparse import random_mask

    for grid in range(2, 9):
        for ratio in (0.25, 0.4, 0.5, 0.6, 0.75, 0.9):
            active = random_mask(3, (grid, grid), ratio)
            masked = (~active).flatten(1).float().mean(1)
            assert torch.all(masked == effective_mask_ratio(grid, ratio)), (grid, ratio)


def test_a_mask_ratio_the_patch_grid_cannot_hold_is_named_with_sizes_that_can():
    from ssl_core.methods.spark import mask_grid_problem

    problem = mask_grid_problem(64, 32, 0.6, "resnet18")
    assert problem == ("resnet18's 32-px patches make a 2x2 grid, so mask ratio 0.6 would mask 2 of 4 patches "
                       "(0.50); use --img-size 96 (3x3: 0.56) or 160 (5x5: 0.60), or --method-option mask_ratio=0.5")
    assert mask_grid_problem(64, 32, 0.5) is None  # asked for what the grid gives: fine
    assert all(mask_grid_problem(s, 32, 0.6) is None for s in (96, 128, 160, 192, 224))
    assert "use --img-size 64 (2x2: 0.50) or 128 (4x4: 0.50)," in mask_grid_problem(96, 32, 0.5)  # one each side
    m = create_method("spark", backbone="test_resnet", img_size=64, decoder_width=32)
    with pytest.raises(ValueError, match="2x2 grid"):
        m.check_setup()
    create_method("spark", backbone="test_resnet", img_size=64, decoder_width=32, mask_ratio=0.5).check_setup()

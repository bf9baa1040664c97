"""Sparse layers: masked content never reaches visible positions; statistics come from visible ones."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from ssl_core.spark.bn import _kernels_for, cpu_kernel
from ssl_core.spark.encoder import SparseEncoder
from ssl_core.spark.sparse import MaskContext, SparseBatchNorm2d, random_mask, sparsify_, upsample_mask

#: the sparse batch norm has two implementations (torch ops; compiled CPU kernels): both must be right
BN_PATHS = pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "torch-ops"])

# resnet18: Conv2d / BatchNorm2d / MaxPool2d. test_resnet: adds AvgPool2d shortcuts and bottlenecks.
# convnext_atto: Conv2d MLP + LayerNorm2d. test_convnext: channels-last LayerNorm + Linear MLP (as in
# convnext_tiny and larger).
BACKBONES = ["resnet18", "test_resnet", "convnext_atto", "test_convnext"]


def _encoder(key: str, in_chans: int = 1) -> SparseEncoder:
    torch.manual_seed(0)
    net = timm.create_model(key, pretrained=False, num_classes=0, in_chans=in_chans)
    return SparseEncoder(net)


@pytest.mark.parametrize("key", BACKBONES)
def test_perturbing_masked_pixels_leaves_every_visible_feature_of_every_stage_unchanged(key):
    enc = _encoder(key).train()  # train mode: batch norm uses batch statistics, the harder case
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 96, 96, generator=g)  # 3x3 patch grid of 32 px
    active = random_mask(4, (3, 3), 0.6, generator=g)
    pix = upsample_mask(active, 32)
    x2 = torch.where(pix, x, 100.0 * torch.randn(x.shape, generator=g))  # wild values, masked only
    x3 = torch.where(pix, x + 0.5, x)  # visible pixels changed: the features must notice

    f1, f2, f3 = (enc(v, active) for v in (x, x2, x3))
    assert len(f1) == 4
    for a, b, c in zip(f1, f2, f3, strict=True):
        vis = upsample_mask(active, a.shape[-1] // 3).expand_as(a)
        assert torch.equal(a[~vis], torch.zeros_like(a[~vis])), "masked positions must hold exactly 0"
        torch.testing.assert_close(a[vis], b[vis], rtol=1e-5, atol=1e-5)
        assert (a[vis] - c[vis]).abs().max() > 1e-3


@pytest.mark.parametrize("key", ["test_resnet", "test_convnext"])
def test_visible_features_do_not_depend_on_what_other_samples_hide(key):
    """Batch statistics over visible positions only: masked content of sample 1 cannot shift sample 0."""
    enc = _encoder(key).train()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 64, 64, generator=g)
    active = torch.tensor([[[[True, False], [False, True]]], [[[False, True], [True, True]]]])
    x2 = x.clone()
    x2[1, :, :32, :32] = 1e3  # masked patch of sample 1
    a, b = enc(x, active)[-1], enc(x2, active)[-1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@BN_PATHS
def test_sparse_batch_norm_statistics_equal_those_of_the_visible_positions_only(kernel):
    ctx = MaskContext()
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(5, momentum=0.3)
    nn.init.uniform_(bn.weight, 0.5, 2.0)
    nn.init.uniform_(bn.bias, -1.0, 1.0)
    ref = nn.BatchNorm1d(5, momentum=0.3)
    ref.load_state_dict(bn.state_dict())
    sparsify_(bn, ctx)
    assert isinstance(bn, SparseBatchNorm2d)

    x = torch.randn(3, 5, 8, 8) * 4 + 2
    active = random_mask(3, (4, 4), 0.6, generator=torch.Generator().manual_seed(0))
    vis = upsample_mask(active, 2)[:, 0]  # (3, 8, 8)
    x = x * vis[:, None]  # a sparse layer's input is 0 at masked positions
    with ctx.masked(active), cpu_kernel(kernel):
        assert (_kernels_for(x) is not None) == kernel
        y = bn(x)
    rows = x.permute(0, 2, 3, 1)[vis]  # (n_visible, 5)
    expected = ref(rows)

    torch.testing.assert_close(y.permute(0, 2, 3, 1)[vis], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y.permute(0, 2, 3, 1)[~vis], torch.zeros(int((~vis).sum()), 5))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)  # unbiased, over visible positions
    assert int(bn.num_batches_tracked) == 1
    dense_mean = x.mean(dim=(0, 2, 3))  # what a dense BN would have seen (zeros included)
    assert (rows.mean(0) - dense_mean).abs().max() > 0.1

    bn.eval()
    ref.eval()
    with ctx.masked(active):
        y_eval = bn(x)
    torch.testing.assert_close(y_eval.permute(0, 2, 3, 1)[vis], ref(rows), rtol=1e-5, atol=1e-5)


@BN_PATHS
@pytest.mark.parametrize("affine", [True, False])
def test_sparse_batch_norm_gradients_equal_those_of_batch_norm_over_visible_rows(kernel, affine):
    ctx = MaskContext()
    bn = sparsify_(nn.BatchNorm2d(4, affine=affine), ctx)
    ref = nn.BatchNorm1d(4, affine=affine)
    for p in (bn.weight, bn.bias) if affine else ():
        nn.init.uniform_(p, 0.5, 1.5)
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(2, 4, 4, 4) * 3 + 1
    active = torch.tensor([[[[True, False], [True, True]]], [[[False, False], [True, False]]]])
    vis = upsample_mask(active, 2)[:, 0]
    x = (x * vis[:, None]).requires_grad_(True)
    w = torch.randn(2, 4, 4, 4)
    with ctx.masked(active), cpu_kernel(kernel):
        (bn(x) * w).sum().backward()
    xr = x.detach().permute(0, 2, 3, 1)[vis].clone().requires_grad_(True)
    (ref(xr) * w.permute(0, 2, 3, 1)[vis]).sum().backward()
    torch.testing.assert_close(x.grad.permute(0, 2, 3, 1)[vis], xr.grad, rtol=1e-4, atol=1e-5)
    assert torch.equal(x.grad.permute(0, 2, 3, 1)[~vis], torch.zeros(int((~vis).sum()), 4))
    if affine:
        torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)


def test_cpu_kernel_and_torch_ops_agree_on_a_resnet_stage_sized_layer_with_a_frozen_input():
    """Larger maps than the exact tests (float64 vs float32 accumulation must not drift), and a layer
    whose input needs no gradient (only the parameter sums are computed)."""
    g = torch.Generator().manual_seed(4)
    active = random_mask(8, (5, 5), 0.6, generator=g)
    x = torch.randn(8, 32, 40, 40, generator=g) * 5 + 3
    x = x * upsample_mask(active, 8)
    w = torch.randn(8, 32, 40, 40, generator=g)
    out = {}
    for kernel in (True, False):
        ctx = MaskContext()
        bn = sparsify_(nn.BatchNorm2d(32), ctx)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        for needs_input_grad in (True, False):
            xi = x.clone().requires_grad_(needs_input_grad)
            bn.zero_grad()
            with ctx.masked(active), cpu_kernel(kernel):
                y = bn(xi)
                (y * w).sum().backward()
            out[kernel, needs_input_grad] = (y.detach(), xi.grad, bn.weight.grad.clone(), bn.bias.grad.clone())
        out[kernel, "running"] = (bn.running_mean.clone(), bn.running_var.clone())
    for key in ((True,), (False,), ("running",)):
        for a, b in zip(out[(True, *key)], out[(False, *key)], strict=True):
            if a is None:
                assert b is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert out[True, True][1] is not None and out[True, False][1] is None


@pytest.mark.parametrize("key", ["test_resnet", "test_convnext"])
def test_without_a_mask_the_sparsified_model_computes_exactly_the_dense_model(key):
    enc = _encoder(key)
    dense = copy.deepcopy(enc.backbone)
    from ssl_core.spark.sparse import densify_

    densify_(dense)
    assert not any(type(m).__name__.startswith("Sparse") for m in dense.modules())
    x = torch.randn(2, 1, 64, 64)
    enc.eval()
    dense.eval()
    torch.testing.assert_close(enc.backbone(x), dense(x))
    assert enc.backbone.state_dict().keys() == dense.state_dict().keys()


def test_sparsify_keeps_parameters_and_their_timm_names():
    net = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = {k: id(p) for k, p in net.named_parameters()}
    SparseEncoder(net)
    assert {k: id(p) for k, p in net.named_parameters()} == ids
    after = net.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_layer_without_a_sparse_rule_is_refused_by_name():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match=r"layer 1 .*GroupNorm.* has no sparse version"):
        sparsify_(net, MaskContext())


def test_random_mask_keeps_the_same_number_of_visible_patches_in_every_sample():
    m = random_mask(64, (5, 5), 0.6, generator=torch.Generator().manual_seed(0))
    assert m.shape == (64, 1, 5, 5) and m.dtype == torch.bool
    assert m.flatten(1).sum(1).tolist() == [10] * 64  # round(25 * 0.4)
    assert len({tuple(r.tolist()) for r in m.flatten(1)}) > 50  # different patches per sample
    small = random_mask(8, (2, 2), 0.6, generator=torch.Generator().manual_seed(0))
    assert small.flatten(1).sum(1).tolist() == [2] * 8  # round(4 * 0.4)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, (4, 4), 1.0)
    with pytest.raises(ValueError, match="1x1 patch grid"):
        random_mask(2, (1, 1), 0.5)


def test_feature_map_not_aligned_with_the_mask_grid_is_an_error():
    enc = _encoder("resnet18")
    with pytest.raises(ValueError, match="multiple of the encoder's downsample ratio 32"):
        enc(torch.randn(1, 1, 80, 80), torch.ones(1, 1, 2, 2, dtype=torch.bool))



def _sync_bn_rank(rank: int, world: int, port: int, x: torch.Tensor, w: torch.Tensor, active: torch.Tensor,
                  queue, kernel: bool) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ctx = MaskContext()
        bn = sparsify_(nn.BatchNorm2d(3), ctx, sync_bn=True)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        half = slice(rank * 2, rank * 2 + 2)
        xr = x[half].clone().requires_grad_(True)
        with ctx.masked(active[half]), cpu_kernel(kernel):
            y = bn(xr)
            (y * w[half]).sum().backward()
        queue.put((rank, y.detach().numpy(), xr.grad.numpy(), bn.weight.grad.numpy(), bn.running_var.numpy()))
    finally:
        dist.destroy_process_group()


@BN_PATHS
def test_synchronised_sparse_batch_norm_on_two_ranks_equals_one_process_on_the_whole_batch(kernel):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = torch.Generator().manual_seed(9)
    active = random_mask(4, (2, 2), 0.5, generator=g)
    x = torch.randn(4, 3, 4, 4, generator=g) * upsample_mask(active, 2)
    w = torch.randn(4, 3, 4, 4, generator=g)
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    procs = [spawn.Process(target=_sync_bn_rank, args=(r, 2, port, x, w, active, queue, kernel)) for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, *vals = queue.get(timeout=300)
        out[rank] = [torch.from_numpy(v) for v in vals]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    ctx = MaskContext()
    bn = sparsify_(nn.BatchNorm2d(3), ctx)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    xs = x.clone().requires_grad_(True)
    with ctx.masked(active), cpu_kernel(False):  # reference: one process, torch ops
        y = bn(xs)
        (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), xs.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0][2] + out[1][2], bn.weight.grad, rtol=1e-5, atol=1e-5)  # DDP sums these
    torch.testing.assert_close(out[0][3], bn.running_var)

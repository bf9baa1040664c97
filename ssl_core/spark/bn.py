"""SparK's batch norm over visible positions only, with a hand-written backward.

Two implementations of the same maths: torch ops (any device, any dtype) and, for float32 tensors on
a CPU, compiled kernels (:mod:`ssl_core.spark.bn_kernel`, numba) that are several times faster
there because they read each activation about once per pass instead of once per torch op. The
kernels are used automatically when numba is importable; :func:`cpu_kernel` switches them off (tests
compare the two, and a missing or broken numba only costs speed).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
import torch.distributed as dist
from torch import nn

_kernel_enabled = os.environ.get("CTSSL_SPARSE_BN_KERNEL", "1") != "0"


@contextmanager
def cpu_kernel(enabled: bool) -> Iterator[None]:
    """Use (or not) the compiled CPU kernels inside the ``with`` block."""
    global _kernel_enabled
    before, _kernel_enabled = _kernel_enabled, enabled
    try:
        yield
    finally:
        _kernel_enabled = before


@functools.cache
def _load_kernels() -> ModuleType | None:
    try:
        from ssl_core.spark import bn_kernel
    except ImportError:
        return None
    return bn_kernel


def _kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The kernel module when it applies to ``x`` (float32, contiguous, on the CPU), else None."""
    if not (_kernel_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()):
        return None
    kern = _load_kernels()
    if kern is not None:
        import numba

        # follow torch's thread budget (Ray Train sets it per worker) instead of using every core
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return kern


def sync_active(sync: bool) -> bool:
    return sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_parts(*parts: torch.Tensor) -> list[torch.Tensor]:
    """All-reduce several 1-D tensors in one collective."""
    packed = torch.cat(parts)
    dist.all_reduce(packed)
    return list(packed.split([p.numel() for p in parts]))


def _stats_from_sums(s1: torch.Tensor, s2: torch.Tensor, cnt: torch.Tensor, sync: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if sync_active(sync):  # SyncBN semantics: moments over every rank's visible positions
        s1, s2, cnt = _all_reduce_parts(s1, s2, cnt)
    n = cnt.clamp(min=1.0)
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp(min=0.0)
    return mean, var, cnt


def masked_batch_stats(x: torch.Tensor, m: torch.Tensor, sync: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, H, W) over positions where ``m`` is 1.

    Precondition: ``x`` is already 0 at masked positions (true for the output of every sparse layer
    and for SparK's masked input). Then the dense moments over all positions convert exactly into
    moments over the visible positions — no gather of the visible positions and no scatter back.
    Returns float32 ``(mean, var, count)``; with ``sync`` under an initialised process group the sums
    are all-reduced across ranks (SyncBN semantics).
    """
    cnt = m.sum(dtype=torch.float32).reshape(1)
    kern = _kernels_for(x)
    if kern is not None:
        s1, s2 = _np_moments(kern, x)
        mean, var, cnt64 = _stats_from_sums(s1, s2, cnt.double(), sync)
        return mean.float(), var.float(), cnt64.float()
    x = x.float()  # statistics in fp32 even under bf16 autocast (no copy for fp32)
    total = x.numel() // x.shape[1]
    var_all, mean_all = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    s1 = mean_all * total
    s2 = (var_all + mean_all * mean_all) * total
    return _stats_from_sums(s1, s2, cnt, sync)


def _flat(t: torch.Tensor):  # noqa: ANN202 - numpy (N, C, L) view sharing t's memory
    return t.detach().numpy().reshape(t.shape[0], t.shape[1], -1)


def _flat_mask(m: torch.Tensor):  # noqa: ANN202 - numpy (N, L) view
    return m.detach().contiguous().numpy().reshape(m.shape[0], -1)


def _np64(t: torch.Tensor):  # noqa: ANN202 - float64 numpy copy of a per-channel vector
    return t.detach().double().numpy()


def _np_moments(kern: ModuleType, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    s1, s2 = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    kern.moments(_flat(x), s1.numpy(), s2.numpy())
    return s1, s2


def _affine_params(weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                   invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = invstd * weight.to(invstd.dtype) if weight is not None else invstd
    shift = -mean * a
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return a, shift


def _masked_affine(x: torch.Tensor, m: torch.Tensor, a: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """y = x * a + m * shift per channel: x is 0 where masked, so only the shift needs the mask."""
    kern = _kernels_for(x)
    if kern is not None:
        y = torch.empty_like(x)
        kern.affine(_flat(x), _flat_mask(m), _np64(a), _np64(shift), _flat(y))
        return y
    c, dt = x.shape[1], x.dtype
    return torch.addcmul(m * shift.view(1, c, 1, 1).to(dt), x, a.view(1, c, 1, 1).to(dt))


class _SparseBatchNormFn(torch.autograd.Function):
    """Batch norm over visible positions with a hand-written backward.

    Autograd through the moment formulas costs a dozen full-size temporaries per layer; batch norm's
    own gradient needs only two per-channel reductions (sum g, sum g*x over visible positions) and
    one fused pass, like the native kernel: dx = m * w/sigma * (g - mean(g) - x_hat * mean(g*x_hat)).
    """

    @staticmethod
    def forward(ctx, x, m, weight, bias, eps: float, sync: bool):  # type: ignore[override]
        kern = _kernels_for(x)
        if kern is not None and not sync_active(sync):
            c = x.shape[1]
            w = _np64(weight) if weight is not None else torch.ones(c, dtype=torch.float64).numpy()
            b = _np64(bias) if bias is not None else torch.zeros(c, dtype=torch.float64).numpy()
            cnt = m.sum(dtype=torch.float32).reshape(1)
            y = torch.empty_like(x)
            mean64, var64 = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
            kern.forward(_flat(x), _flat_mask(m), w, b, eps, float(cnt), _flat(y), mean64.numpy(), var64.numpy())
            mean, var = mean64.float(), var64.float()
            invstd = torch.rsqrt(var + eps)
        else:
            mean, var, cnt = masked_batch_stats(x, m, sync)
            invstd = torch.rsqrt(var + eps)
            y = _masked_affine(x, m, *_affine_params(weight, bias, mean, invstd))
        ctx.save_for_backward(x, m, weight, mean, invstd, cnt)
        ctx.sync = sync
        ctx.mark_non_differentiable(mean, var, cnt)
        return y, mean, var, cnt

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar, _gcnt):  # type: ignore[override]
        x, m, weight, mean, invstd, cnt = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        sync = need_dx and sync_active(ctx.sync)  # the input gradient needs the global sums, as in SyncBN
        a = invstd * weight if weight is not None else invstd
        kern = _kernels_for(x)
        dx = None
        if kern is not None:
            gy = gy.contiguous()
            c = x.shape[1]
            sg64, sgx64 = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
            if need_dx and not sync:
                dx = torch.empty_like(x)
                kern.backward(_flat(gy), _flat(x), _flat_mask(m), _np64(a), _np64(invstd), _np64(mean),
                              float(cnt), _flat(dx), sg64.numpy(), sgx64.numpy())
                sg, sgxhat = sg64.float(), sgx64.float()  # the kernel returns sum(g * x_hat) directly
            else:
                kern.grad_moments(_flat(gy), _flat(x), _flat_mask(m), sg64.numpy(), sgx64.numpy())
                # sum(g * x_hat) = invstd * (sum(g x) - mean sum(g)): a difference of large sums, so in float64
                sg, sgxhat = sg64.float(), (invstd.double() * (sgx64 - mean.double() * sg64)).float()
        else:
            g = (gy * m).float()
            xf = x.float()
            sg = g.sum(dim=(0, 2, 3))
            sgxhat = invstd * ((g * xf).sum(dim=(0, 2, 3)) - mean * sg)  # sum over visible of g * x_hat
        dweight = sgxhat if weight is not None and ctx.needs_input_grad[2] else None
        dbias = sg if ctx.needs_input_grad[3] else None
        if need_dx and dx is None:
            if sync:
                sg, sgxhat = _all_reduce_parts(sg, sgxhat)
            n = cnt.clamp(min=1.0)
            k2 = -a * invstd * sgxhat / n  # coefficient of x
            k0 = -a * sg / n - k2 * mean  # constant, visible positions only
            if kern is not None:
                dx = torch.empty_like(x)
                kern.grad_input(_flat(gy), _flat(x), _flat_mask(m), _np64(a), _np64(k2), _np64(k0), _flat(dx))
            else:
                c = x.shape[1]
                dx = torch.addcmul(m * k0.view(1, c, 1, 1), g, a.view(1, c, 1, 1))
                dx = torch.addcmul(dx, xf, k2.view(1, c, 1, 1)).to(x.dtype)
        return dx, None, dweight, dbias, None, None


def sparse_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, m: torch.Tensor,
                      sync: bool) -> torch.Tensor:
    """Batch norm whose statistics come from visible positions only; masked outputs are 0."""
    if not (bn.training or bn.running_mean is None):  # eval: running statistics, a plain affine map
        return _masked_affine(x, m, *_affine_params(bn.weight, bn.bias, bn.running_mean,
                                                     torch.rsqrt(bn.running_var + bn.eps)))
    y, mean, var, cnt = _SparseBatchNormFn.apply(x, m, bn.weight, bn.bias, bn.eps, sync)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            unbiased = var * (cnt / (cnt - 1.0).clamp(min=1.0))
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    return y

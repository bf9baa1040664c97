"""Compiled CPU kernels (numba) for SparK's masked batch norm, imported only when first used.

Why: on a CPU the torch formulation of a masked batch norm is a chain of full-size passes (moments,
a broadcast mask product, two multiply-adds forward; five more backward) and dominates a SparK step
at realistic input sizes. These kernels walk one channel at a time (its slice of the batch fits in
cache), so the statistics pass and the output pass read the activations from memory about once,
and channels run in parallel.

Layout: ``x``, ``g``, ``y``, ``dx`` are float32 arrays (N, C, L) (NCHW with H*W flattened), ``m`` is
the float32 visibility mask (N, L) with 1 = visible. Per-channel sums accumulate in float64. Every
kernel assumes ``x`` is 0 at masked positions (the output of a sparse layer or a masked image).

Module-level functions so that numba's on-disk cache (``cache=True``) is reused across processes.
"""

from __future__ import annotations

import numba
import numpy as np

_FLAGS = dict(cache=True, nogil=True, fastmath=True)


@numba.njit(inline="always", **_FLAGS)
def _moments(x, c):  # pragma: no cover - compiled
    s1 = 0.0
    s2 = 0.0
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            v = np.float64(x[n, c, i])
            s1 += v
            s2 += v * v
    return s1, s2


@numba.njit(inline="always", **_FLAGS)
def _affine(x, m, c, a, b, y):  # pragma: no cover - compiled
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            y[n, c, i] = x[n, c, i] * a + m[n, i] * b  # x is 0 where masked, so y is too


@numba.njit(inline="always", **_FLAGS)
def _grad_moments(g, x, m, c):  # pragma: no cover - compiled
    sg = 0.0
    sgx = 0.0
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            gv = np.float64(g[n, c, i] * m[n, i])
            sg += gv
            sgx += gv * x[n, c, i]
    return sg, sgx


@numba.njit(inline="always", **_FLAGS)
def _grad_input(g, x, m, c, k1, k2, k0, dx):  # pragma: no cover - compiled
    for n in range(x.shape[0]):
        for i in range(x.shape[2]):
            dx[n, c, i] = m[n, i] * (k1 * g[n, c, i] + k2 * x[n, c, i] + k0)


@numba.njit(parallel=True, **_FLAGS)
def moments(x, s1, s2):  # pragma: no cover - compiled
    """Per-channel sum and sum of squares (the caller all-reduces them for synchronised BN)."""
    for c in numba.prange(x.shape[1]):
        s1[c], s2[c] = _moments(x, c)


@numba.njit(parallel=True, **_FLAGS)
def affine(x, m, a, b, y):  # pragma: no cover - compiled
    """y = x * a + m * b per channel."""
    for c in numba.prange(x.shape[1]):
        _affine(x, m, c, np.float32(a[c]), np.float32(b[c]), y)


@numba.njit(parallel=True, **_FLAGS)
def forward(x, m, weight, bias, eps, count, y, mean, var):  # pragma: no cover - compiled
    """Statistics over visible positions and the normalised output, one channel at a time."""
    n = max(count, 1.0)
    for c in numba.prange(x.shape[1]):
        s1, s2 = _moments(x, c)
        mu = s1 / n
        v = max(s2 / n - mu * mu, 0.0)
        a = weight[c] / np.sqrt(v + eps)
        _affine(x, m, c, np.float32(a), np.float32(bias[c] - mu * a), y)
        mean[c] = mu
        var[c] = v


@numba.njit(parallel=True, **_FLAGS)
def grad_moments(g, x, m, sg, sgx):  # pragma: no cover - compiled
    """Per-channel sums of g and g * x over visible positions."""
    for c in numba.prange(x.shape[1]):
        sg[c], sgx[c] = _grad_moments(g, x, m, c)


@numba.njit(parallel=True, **_FLAGS)
def grad_input(g, x, m, k1, k2, k0, dx):  # pragma: no cover - compiled
    """dx = m * (k1 * g + k2 * x + k0) per channel."""
    for c in numba.prange(x.shape[1]):
        _grad_input(g, x, m, c, np.float32(k1[c]), np.float32(k2[c]), np.float32(k0[c]), dx)


@numba.njit(parallel=True, **_FLAGS)
def backward(g, x, m, a, invstd, mean, count, dx, sg_out, sgxhat_out):  # pragma: no cover - compiled
    """Batch norm's input gradient over visible positions, and the sums the parameter gradients are."""
    n = max(count, 1.0)
    for c in numba.prange(x.shape[1]):
        sg, sgx = _grad_moments(g, x, m, c)
        sgxhat = invstd[c] * (sgx - mean[c] * sg)
        k2 = -a[c] * invstd[c] * sgxhat / n
        k0 = -a[c] * sg / n - k2 * mean[c]
        _grad_input(g, x, m, c, np.float32(a[c]), np.float32(k2), np.float32(k0), dx)
        sg_out[c] = sg
        sgxhat_out[c] = sgxhat


def warm_up() -> None:
    """Compile (or load from the cache) every kernel once, e.g. while building a container image."""
    x = np.zeros((1, 1, 4), np.float32)
    m = np.ones((1, 4), np.float32)
    v = np.ones(1, np.float64)
    forward(x, m, v, v, 1e-5, 4.0, x.copy(), v.copy(), v.copy())
    backward(x, x, m, v, v, v, 4.0, x.copy(), v.copy(), v.copy())
    moments(x, v.copy(), v.copy())
    affine(x, m, v, v, x.copy())
    grad_moments(x, x, m, v.copy(), v.copy())
    grad_input(x, x, m, v, v, v, x.copy())

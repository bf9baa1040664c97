"""Batched CT augmentations: whole batches on the batch's device, random parameters per sample.

Input is a batch of HU slices (N, 1, H, W); a view pipeline returns windowed views
(N, C, h, w) in [0, 1]. Everything is tensor ops (one ``F.grid_sample`` per view for all geometry,
grouped convolutions for blur), so the same code runs on the GPU when there is one and never loops
over samples in Python.

Public API (stable):

* Ops (callables ``op(x, generator=None) -> x``):
  :class:`RandomResizedCrop` (crop + optional flips + rotation fused into one affine resample),
  :class:`RandomFlip`, :class:`GaussianBlur`, :class:`GaussianNoise`, :class:`Window`
  (HU -> channels, with :class:`~ssl_core.ct_window.WindowJitter`), :class:`RandomSolarize`.
* :class:`Compose` — a view pipeline; :class:`MultiView` — several pipelines x counts
  (2 global + N local crops) returning a list of views.
* Functional forms: :func:`random_resized_crop`, :func:`gaussian_blur`.
* Per-method recipes: :func:`byol_views`, :func:`mocov2_views`, :func:`swav_views`,
  :func:`spark_views` (each method class names its own as ``VIEWS``;
  :func:`ssl_core.methods.create_views` looks one up by method name). Colour jitter and grayscale
  conversion from the papers do not apply to single-channel CT; they are replaced by HU-window
  jitter with the same probability. SparK: crop + flip only.

Order inside a view: geometry (on 1-channel HU, the cheapest place) -> blur -> noise (in HU, like
scanner noise) -> window (expands to C channels) -> solarize.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssl_core.ct_window import WindowJitter, WindowSpec, apply_window, default_windows, standardise_windowed

Op = Callable[..., torch.Tensor]

AIR_HU = -1024.0


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# ----------------------------------------------------------------------------- geometry
def crop_affine(
    n: int,
    in_hw: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip_p: float = 0.0,
    vflip_p: float = 0.0,
    max_rotation_deg: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-sample affine matrices (n, 2, 3) for ``F.affine_grid`` (normalised coords, align_corners=False).

    A crop covers an area fraction ``U(scale)`` with log-uniform aspect ratio from ``ratio``; sides are
    clipped to the image (instead of torchvision's rejection loop, which cannot be batched) and the
    crop center is uniform over positions that keep the crop inside the image. Flips and rotation act
    on output coordinates, so everything costs a single resample.
    """
    device = torch.device(device)
    u = _rand((6, n), generator, device)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    aspect = torch.exp(log_r)  # width / height of the crop, in pixels
    h_img, w_img = in_hw
    # fractions of the image's width / height; area fraction = fw * fh
    img_aspect = w_img / h_img
    fw = torch.sqrt(area * aspect / img_aspect).clamp(max=1.0)
    fh = torch.sqrt(area / (aspect / img_aspect)).clamp(max=1.0)
    cx = (2.0 * u[2] - 1.0) * (1.0 - fw)
    cy = (2.0 * u[3] - 1.0) * (1.0 - fh)
    sx = torch.where(u[4] < hflip_p, -fw, fw)
    sy = torch.where(u[5] < vflip_p, -fh, fh)
    theta = torch.zeros(n, 2, 3, device=device)
    if max_rotation_deg > 0:
        ang = (2.0 * _rand((n,), generator, device) - 1.0) * math.radians(max_rotation_deg)
        cos, sin = torch.cos(ang), torch.sin(ang)
        # theta = S^-1 R S diag(sx, sy) with S = diag(W, H): the rotation is true in pixel space,
        # also for non-square images
        k = h_img / w_img
        theta[:, 0, 0] = cos * sx
        theta[:, 0, 1] = -sin * k * sy
        theta[:, 1, 0] = sin * sx / k
        theta[:, 1, 1] = cos * sy
    else:
        theta[:, 0, 0] = sx
        theta[:, 1, 1] = sy
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def _resample(x: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int], fill: float | None) -> torch.Tensor:
    """Bilinear resample; border padding inside the slice, ``fill`` where the grid leaves the slice.

    Border padding keeps crops that touch the image edge free of padding artefacts; a rotated crop
    can see beyond the slice, and there the value is ``fill`` (air, not the water that zero HU is).
    """
    grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], x.shape[1], *out_hw], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if fill is not None:
        outside = (grid.abs() > 1.0).any(dim=-1).unsqueeze(1)
        out = out.masked_fill_(outside, fill)
    return out


def random_resized_crop(
    x: torch.Tensor,
    size: int | Sequence[int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.0,
    vflip_p: float = 0.0,
    max_rotation_deg: float = 0.0,
    fill: float = AIR_HU,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched random resized crop (+ flips + rotation) of ``x`` (N, C, H, W) to ``size``."""
    theta = crop_affine(x.shape[0], (x.shape[-2], x.shape[-1]), scale, ratio, hflip_p, vflip_p,
                        max_rotation_deg, generator, x.device)
    return _resample(x, theta, _pair(size), fill if max_rotation_deg > 0 else None)


@dataclass
class RandomResizedCrop:
    """Crop + resize, with optional flips and rotation fused into the same resample.

    ``fill`` is the value outside the slice after rotation: air (-1024 HU) for HU input, 0 for gray8.
    """

    size: int | tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    max_rotation_deg: float = 0.0
    fill: float = AIR_HU

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"crop ratio must satisfy 0 < low <= high, got {self.ratio}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_resized_crop(x, self.size, self.scale, self.ratio, self.hflip_p, self.vflip_p,
                                   self.max_rotation_deg, self.fill, generator)


@dataclass
class RandomFlip:
    """Per-sample horizontal / vertical flips without resampling (exact pixel copies)."""

    hflip_p: float = 0.5
    vflip_p: float = 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        u = _rand((2, x.shape[0]), generator, x.device).view(2, -1, 1, 1, 1)
        if self.hflip_p > 0:
            x = torch.where(u[0] < self.hflip_p, x.flip(-1), x)
        if self.vflip_p > 0:
            x = torch.where(u[1] < self.vflip_p, x.flip(-2), x)
        return x


# ----------------------------------------------------------------------------- intensity
def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each sample with its own ``sigma`` (N,) via two separable grouped convolutions.

    ``sigma <= 0`` leaves a sample unchanged (delta kernel). Borders are reflect-padded.
    """
    n, c, h, w = x.shape
    if kernel_size % 2 == 0:
        kernel_size += 1
    r = kernel_size // 2
    r = min(r, h - 1, w - 1)
    kernel_size = 2 * r + 1
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s.clamp(min=1e-6)) ** 2)
    delta = (t == 0).to(x.dtype).view(1, -1)
    k = torch.where(s > 0, k, delta)
    k = k / k.sum(dim=1, keepdim=True)
    k = k.repeat_interleave(c, dim=0)  # (n*c, K)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


@dataclass
class GaussianBlur:
    """Blur with probability ``p``, sigma ~ U(sigma) in pixels of the current (cropped) view.

    The papers' 0.1-2.0 px at 224 px should be scaled to the view size by the recipe.
    """

    sigma: tuple[float, float] = (0.1, 2.0)
    p: float = 0.5

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.p <= 0:
            return x
        u = _rand((2, x.shape[0]), generator, x.device)
        sig = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[0]
        kernel = 2 * math.ceil(3.0 * self.sigma[1]) + 1
        # under CUDA autocast the convolution returns bf16: keep the view in the input's dtype
        if self.p >= 1.0:
            return gaussian_blur(x, sig, kernel_size=kernel).to(x.dtype)
        # convolve only the samples drawn for blurring (half the work at p=0.5, a tenth at p=0.1)
        idx = torch.nonzero(u[1] < self.p).flatten()
        if idx.numel() == 0:
            return x
        blurred = gaussian_blur(x.index_select(0, idx), sig[idx], kernel_size=kernel).to(x.dtype)
        return x.index_copy(0, idx, blurred)


@dataclass
class GaussianNoise:
    """Additive noise with probability ``p``, std ~ U(std) in input units (HU before windowing)."""

    std: tuple[float, float] = (0.0, 20.0)
    p: float = 0.5

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.p <= 0:
            return x
        n = x.shape[0]
        u = _rand((2, n), generator, x.device)
        std = (self.std[0] + (self.std[1] - self.std[0]) * u[0]) * (u[1] < self.p).to(x.dtype)
        return x + std.view(n, 1, 1, 1) * _randn(tuple(x.shape), generator, x.device)


@dataclass
class Window:
    """HU (N, 1, H, W) -> (N, len(windows), H, W) in [0, 1], optionally with per-sample jitter."""

    windows: WindowSpec | Sequence[WindowSpec] = ("lung",)
    jitter: WindowJitter | None = None
    standardise: bool = True  # False when a later op needs [0, 1] values: put Standardise after it

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return apply_window(x, self.windows, self.jitter, generator, standardise=self.standardise)


@dataclass
class Standardise:
    """The per-dataset standardisation of windows written ``NAME@MEAN/STD`` (a no-op for others), for
    pipelines whose [0, 1]-based ops (solarize) run between windowing and standardising."""

    windows: WindowSpec | Sequence[WindowSpec] = ("lung",)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return standardise_windowed(x, self.windows)


@dataclass
class RandomSolarize:
    """Invert values above ``threshold`` (on [0, 1] input) with probability ``p`` (BYOL's view 2)."""

    p: float = 0.2
    threshold: float = 0.5

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.p <= 0:
            return x
        on = (_rand((x.shape[0],), generator, x.device) < self.p).view(-1, 1, 1, 1)
        return torch.where(on & (x >= self.threshold), 1.0 - x, x)


# ----------------------------------------------------------------------------- composition
class Compose:
    """One view pipeline: ops applied in order, all sharing the caller's generator."""

    def __init__(self, ops: Sequence[Op]):
        self.ops = list(ops)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for op in self.ops:
            x = op(x, generator=generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.ops!r})"


class MultiView:
    """Several view pipelines, each drawn ``count`` times: e.g. 2 global + 6 local crops (SwAV).

    Returns a flat list of views in order; views from the same pipeline share a shape, so a method
    can concatenate them into one forward pass.
    """

    def __init__(self, pipelines: Sequence[tuple[Compose, int]]):
        if not pipelines or any(c < 0 for _, c in pipelines):
            raise ValueError("MultiView needs (pipeline, count >= 0) pairs")
        self.pipelines = list(pipelines)

    @property
    def counts(self) -> list[int]:
        return [c for _, c in self.pipelines]

    def __len__(self) -> int:
        return sum(self.counts)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [p(x, generator=generator) for p, count in self.pipelines for _ in range(count)]

    def __repr__(self) -> str:
        return f"MultiView({self.pipelines!r})"


# ----------------------------------------------------------------------------- recipes
def _blur_sigma(size: int) -> tuple[float, float]:
    """The papers' 0.1-2.0 px blur at 224 px, scaled to ``size``."""
    f = size / 224.0
    return (0.1 * f, 2.0 * f)


def byol_views(img_size: int, windows: Sequence[WindowSpec] | None = None, in_chans: int = 1,
               fill: float = AIR_HU) -> MultiView:
    """BYOL (Grill et al. 2020, Table 6): two asymmetric views. Crop 0.08-1, flip, colour jitter
    p=0.8 -> window jitter, blur p=1.0 / 0.1, solarize p=0 / 0.2."""
    windows = list(windows or default_windows(in_chans))
    jit = WindowJitter(center_shift=0.2, width_scale=(0.6, 1.4), p=0.8)

    def view(blur_p: float, solar_p: float) -> Compose:
        return Compose([
            RandomResizedCrop(img_size, scale=(0.08, 1.0), hflip_p=0.5, fill=fill),
            GaussianBlur(_blur_sigma(img_size), p=blur_p),
            Window(windows, jit, standardise=False),
            RandomSolarize(p=solar_p),
            Standardise(windows),
        ])

    return MultiView([(view(1.0, 0.0), 1), (view(0.1, 0.2), 1)])


def mocov2_views(img_size: int, windows: Sequence[WindowSpec] | None = None, in_chans: int = 1,
                 fill: float = AIR_HU) -> MultiView:
    """MoCo v2 (Chen et al. 2020): crop 0.2-1, colour jitter p=0.8 -> window jitter, blur p=0.5,
    flip; both views from the same recipe."""
    windows = list(windows or default_windows(in_chans))
    view = Compose([
        RandomResizedCrop(img_size, scale=(0.2, 1.0), hflip_p=0.5, fill=fill),
        GaussianBlur(_blur_sigma(img_size), p=0.5),
        Window(windows, WindowJitter(center_shift=0.2, width_scale=(0.6, 1.4), p=0.8)),
    ])
    return MultiView([(view, 2)])


def swav_local_size(img_size: int) -> int:
    """SwAV's 96/224 local-to-global size ratio, rounded to a multiple of 8 (>= 16 px)."""
    return max(16, int(round(img_size * 96 / 224 / 8)) * 8)


def swav_views(img_size: int, windows: Sequence[WindowSpec] | None = None, in_chans: int = 1,
               n_local: int = 6, local_size: int | None = None, fill: float = AIR_HU) -> MultiView:
    """SwAV (Caron et al. 2020): 2 global crops (scale 0.14-1) + ``n_local`` local crops
    (0.05-0.14) at 96/224 of the size; flip, colour distortion p=0.8 -> window jitter, blur p=0.5."""
    windows = list(windows or default_windows(in_chans))
    local_size = local_size or swav_local_size(img_size)
    jit = WindowJitter(center_shift=0.3, width_scale=(0.5, 1.5), p=0.8)

    def view(size: int, scale: tuple[float, float]) -> Compose:
        return Compose([
            RandomResizedCrop(size, scale=scale, hflip_p=0.5, fill=fill),
            GaussianBlur(_blur_sigma(size), p=0.5),
            Window(windows, jit),
        ])

    pipes = [(view(img_size, (0.14, 1.0)), 2)]
    if n_local > 0:
        pipes.append((view(local_size, (0.05, 0.14)), n_local))
    return MultiView(pipes)


def spark_views(img_size: int, windows: Sequence[WindowSpec] | None = None, in_chans: int = 1,
                fill: float = AIR_HU) -> MultiView:
    """SparK (Tian et al. 2023): random resized crop (0.67-1) + horizontal flip only, fixed window."""
    windows = list(windows or default_windows(in_chans))
    return MultiView([(Compose([
        RandomResizedCrop(img_size, scale=(0.67, 1.0), hflip_p=0.5, fill=fill),
        Window(windows, None),
    ]), 1)])


__all__ = ["AIR_HU", "Compose", "GaussianBlur", "GaussianNoise", "MultiView", "RandomFlip",
           "RandomResizedCrop", "RandomSolarize", "Standardise", "Window", "byol_views", "crop_affine",
           "gaussian_blur", "mocov2_views", "random_resized_crop", "spark_views", "swav_local_size",
           "swav_views"]

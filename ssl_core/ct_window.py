"""CT intensity windows: Hounsfield units -> network input channels in [0, 1].

Public API (stable):

* :data:`WINDOW_PRESETS` — named ``(center, width)`` pairs in HU (``lung``, ``soft_tissue``, ``bone`` ...)
  plus ``gray8`` for data already stored as 8-bit grey values (0..255, center 127.5, width 255).
* :func:`resolve_windows` ``(windows) -> list[(center, width)]`` — names or pairs to pairs.
* :class:`WindowJitter` — per-sample random change of window center/width (CT's colour jitter).
* :func:`apply_window` ``(hu (N,1,H,W), windows, jitter=None, generator=None) -> (N, len(windows), H, W)``.
* :func:`default_windows` ``(in_chans) -> list[str]`` — 1 channel: lung; 3 channels: lung / soft
  tissue / bone.
* :func:`standardised` ``(window, mean, std) -> str`` — a window whose [0, 1] output is then
  standardised, ``(y - mean) / std``, written ``"NAME@MEAN/STD"`` (e.g. ``"gray8@0.42/0.27"``) so it
  stays a plain string in configs, MLflow params and encoder configs.

Windowing is done at training time, batched on the tensor's device, because slices are stored as
lossless HU: the same shards then serve 1- and 3-channel models, and a jittered window is a real CT
window rather than a brightness trick on already-clipped pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: name -> (center, width). HU values from common radiology practice.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (60.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "full": (0.0, 4096.0),  # -2048..2048 HU: everything, for models that should see the whole range
    "gray8": (127.5, 255.0),  # 8-bit grey images (MedMNIST, PNG folders): 0..255 -> 0..1
}

WindowSpec = str | tuple[float, float]


def standardised(window: str, mean: float, std: float) -> str:
    """The spec of ``window`` followed by ``(y - mean) / std`` on its [0, 1] output.

    Why: 8-bit sources (PNG folders, MedMNIST) carry no physical scale, so their grey / 255 inputs sit
    wherever the dataset's brightness puts them; with a handful of labelled images a network's
    batch-norm statistics never catch up. Standardising with the dataset's own mean / std (computed
    once by prep) gives every model zero-mean, unit-variance input."""
    if not std > 0:
        raise ValueError(f"standardising needs std > 0, got {std}")
    return f"{_split(window)[0]}@{mean:.6g}/{std:.6g}"


def dataset_windows(intensity: str, stats: dict[str, float] | None, in_chans: int) -> list[str] | None:
    """The windows a model reads a dataset with: for 8-bit data (``intensity`` "gray8") the gray8
    window standardised by the dataset's grey-value ``stats`` (``mean`` / ``std`` in 0..255 units, as
    prep stores them), plain gray8 without usable statistics; None for HU data, where the method's
    CT windows apply."""
    if intensity != "gray8":
        return None
    mean, std = (stats or {}).get("mean", math.nan), (stats or {}).get("std", 0.0)
    if math.isfinite(mean) and math.isfinite(std) and std > 0:
        return [standardised("gray8", mean / 255.0, std / 255.0)] * in_chans
    return ["gray8"] * in_chans


def _split(w: str) -> tuple[str, tuple[float, float] | None]:
    """``"gray8@0.4/0.2"`` -> ("gray8", (0.4, 0.2)); ``"lung"`` -> ("lung", None)."""
    name, sep, rest = w.partition("@")
    if not sep:
        return w, None
    mean, _, std = rest.partition("/")
    try:
        m, sd = float(mean), float(std)
    except ValueError:
        raise ValueError(f"CT window {w!r}: expected NAME@MEAN/STD") from None
    if not sd > 0:
        raise ValueError(f"CT window {w!r}: std must be > 0")
    return name, (m, sd)


def standardisation(windows: WindowSpec | Sequence[WindowSpec]) -> list[tuple[float, float]] | None:
    """Per-channel ``(mean, std)`` applied after windowing; None when no window asks for it."""
    if isinstance(windows, str) or (isinstance(windows, tuple) and len(windows) == 2
                                    and all(isinstance(v, int | float) for v in windows)):
        windows = [windows]  # type: ignore[list-item]
    out = [(_split(w)[1] if isinstance(w, str) else None) for w in windows]  # type: ignore[union-attr]
    if all(o is None for o in out):
        return None
    return [o if o is not None else (0.0, 1.0) for o in out]


def resolve_windows(windows: WindowSpec | Sequence[WindowSpec]) -> list[tuple[float, float]]:
    """Turn preset names and/or ``(center, width)`` pairs into a list of pairs, validating widths."""
    if isinstance(windows, str) or (
        isinstance(windows, tuple) and len(windows) == 2 and all(isinstance(v, int | float) for v in windows)
    ):
        windows = [windows]  # type: ignore[list-item]
    out: list[tuple[float, float]] = []
    for w in windows:  # type: ignore[union-attr]
        if isinstance(w, str):
            try:
                out.append(WINDOW_PRESETS[_split(w)[0]])
            except KeyError:
                raise ValueError(f"unknown CT window {w!r}; known: {', '.join(WINDOW_PRESETS)}") from None
        else:
            c, width = (float(v) for v in w)
            if not width > 0:
                raise ValueError(f"CT window width must be > 0, got {width} in {w!r}")
            out.append((c, width))
    if not out:
        raise ValueError("at least one CT window is needed")
    return out


def default_windows(in_chans: int) -> list[str]:
    """Windows that fill ``in_chans`` channels: 1 -> lung, 3 -> lung / soft tissue / bone."""
    if in_chans == 1:
        return ["lung"]
    if in_chans == 3:
        return ["lung", "soft_tissue", "bone"]
    raise ValueError(f"no default CT windows for in_chans={in_chans}; pass windows explicitly")


@dataclass(frozen=True)
class WindowJitter:
    """Per-sample random window change, drawn independently for each sample and window.

    The center moves by ``U(-center_shift, center_shift) * width`` and the width is multiplied by
    ``U(*width_scale)``; ``p`` is the probability that a sample is jittered at all. Relative units
    keep one setting meaningful for a 1500 HU lung window and an 80 HU brain window alike.
    """

    center_shift: float = 0.2
    width_scale: tuple[float, float] = (0.6, 1.4)
    p: float = 0.8

    def __post_init__(self) -> None:
        lo, hi = self.width_scale
        if not (0 < lo <= hi):
            raise ValueError(f"width_scale must satisfy 0 < low <= high, got {self.width_scale}")
        if self.center_shift < 0 or not 0.0 <= self.p <= 1.0:
            raise ValueError(f"invalid WindowJitter(center_shift={self.center_shift}, p={self.p})")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers; drawn where the generator lives, then moved (reproducible on any device)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def window_params(
    n: int,
    windows: WindowSpec | Sequence[WindowSpec],
    jitter: WindowJitter | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(center, width)`` tensors of shape (n, C, 1, 1), jittered if asked."""
    device = torch.device(device)
    pairs = resolve_windows(windows)
    c = torch.tensor([p[0] for p in pairs], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    w = torch.tensor([p[1] for p in pairs], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    c, w = c.expand(n, -1, -1, -1), w.expand(n, -1, -1, -1)
    if jitter is None or jitter.p == 0.0:
        return c, w
    k = len(pairs)
    u = _rand((3, n, k, 1, 1), generator, device)
    on = (u[2] < jitter.p).float()
    lo, hi = jitter.width_scale
    scale = 1.0 + on * (lo + (hi - lo) * u[1] - 1.0)
    shift = on * (2.0 * u[0] - 1.0) * jitter.center_shift * w
    return c + shift, w * scale


def apply_window(
    hu: torch.Tensor,
    windows: WindowSpec | Sequence[WindowSpec],
    jitter: WindowJitter | None = None,
    generator: torch.Generator | None = None,
    standardise: bool = True,
) -> torch.Tensor:
    """Window ``hu`` (N, 1, H, W) into (N, len(windows), H, W) float values clipped to [0, 1], then
    standardised per channel where a window says so (see :func:`standardised`) unless
    ``standardise`` is False (for ops that need [0, 1] first: :func:`standardise_windowed` after them).

    One fused multiply-add per output element: ``(hu - (c - w/2)) / w``.
    """
    if hu.ndim != 4 or hu.shape[1] != 1:
        raise ValueError(f"apply_window expects HU slices shaped (N, 1, H, W), got {tuple(hu.shape)}")
    hu = hu.float()
    c, w = window_params(hu.shape[0], windows, jitter, generator, hu.device)
    inv_w = 1.0 / w
    offset = 0.5 - c * inv_w  # (hu - c + w/2) / w
    y = torch.addcmul(offset, hu, inv_w).clamp_(0.0, 1.0)
    return standardise_windowed(y, windows) if standardise else y


def standardise_windowed(y: torch.Tensor, windows: WindowSpec | Sequence[WindowSpec]) -> torch.Tensor:
    """``(y - mean) / std`` per channel of windowed ``y`` for the windows that ask for it; else ``y``."""
    std = standardisation(windows)
    if std is not None:
        m = torch.tensor([s[0] for s in std], dtype=y.dtype, device=y.device).view(1, -1, 1, 1)
        inv = torch.tensor([1.0 / s[1] for s in std], dtype=y.dtype, device=y.device).view(1, -1, 1, 1)
        y = (y - m).mul_(inv)
    return y


__all__ = ["WINDOW_PRESETS", "WindowJitter", "WindowSpec", "apply_window", "dataset_windows", "default_windows",
           "resolve_windows", "standardisation", "standardise_windowed", "standardised", "window_params"]

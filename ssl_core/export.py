"""Pre-trained encoders in the formats other code loads without ctssl: timm and torchvision state dicts,
TorchScript, ``torch.export`` programs and ONNX, each with a description of the input it expects.

Public API (stable):

* :func:`encoder_module` ``(backbone, state, in_chans) -> nn.Module`` — the plain timm model (no
  classifier, pooled features) carrying an encoder's weights, in eval mode.
* :func:`rgb_state_dict` ``(backbone, state) -> dict`` — a 1-channel encoder's weights for the stock
  3-channel model: the first convolution's kernel repeated over three channels and divided by three,
  so a grey slice copied into the three channels gives exactly the 1-channel features.
* :data:`TORCHVISION_ARCHS` / :func:`torchvision_state_dict` ``(backbone, state) -> dict`` — the
  weights in the layout of ``torchvision.models.<backbone>()`` with ``fc`` dropped.
* :func:`input_description` ``(config) -> dict`` — what a caller must do to a slice before the encoder
  sees it (the CT windows and standardisation it was pre-trained with), from an ``encoder_config``.
* :func:`save_torchscript`, :func:`save_exported_program`, :func:`save_onnx` — the module as a
  traced TorchScript file, a ``torch.export`` archive or an ONNX graph, each checked against the
  module's own features before it is kept.

Why here: the weights are trained in timm's layout (:mod:`ssl_core.backbones`), which already is a
plain state dict; what users lack is which model to build, what the first convolution expects, and how
CT values become network input. Nothing here imports ctssl's distributed code or MLflow.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch
from torch import nn

from ssl_core.backbones import load_encoder_state_dict
from ssl_core.ct_window import WINDOW_PRESETS, default_windows, standardisation

#: timm backbones whose state dict (classifier excluded) has exactly the keys and shapes of the
#: torchvision model of the same name with ``fc`` dropped, and computes the same features: timm's
#: ResNets follow torchvision's naming and layout (v1.5: stride on the 3x3 convolution).
TORCHVISION_ARCHS = frozenset({"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                               "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"})
#: tolerance of the check that a saved TorchScript / exported / ONNX model computes the module's features
CHECK_ATOL = 1e-4


def encoder_module(backbone: str, state: dict[str, torch.Tensor], in_chans: int) -> nn.Module:
    """The timm ``backbone`` with ``state`` loaded (every key must fit; see
    :func:`ssl_core.backbones.load_encoder_state_dict`), without classifier, in eval mode: what
    ``timm.create_model(backbone, num_classes=0, in_chans=in_chans)`` gives with the weights loaded."""
    return load_encoder_state_dict(backbone, state, in_chans=in_chans, num_classes=0).eval()


def first_conv_key(backbone: str) -> str:
    """State-dict key of the first convolution's kernel (timm's ``pretrained_cfg['first_conv']``)."""
    import timm

    cfg = timm.create_model(backbone, pretrained=False, num_classes=0).pretrained_cfg or {}
    first = cfg.get("first_conv")
    if isinstance(first, list | tuple):
        first = first[0]
    if not first:
        raise ValueError(f"timm does not name the first convolution of {backbone!r}")
    return f"{first}.weight"


def rgb_state_dict(backbone: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` of a 1-channel encoder made to load into the 3-channel model: the first kernel is
    repeated over three input channels and divided by three. Because a convolution is linear in its
    input, a slice copied into all three channels then gives the 1-channel model's features (to float
    rounding), so the stock ``timm.create_model(name)`` / ``torchvision.models.<name>()`` can be used."""
    key = first_conv_key(backbone)
    if key not in state:
        raise ValueError(f"no first convolution {key!r} in the {backbone} state dict")
    w = state[key]
    if w.ndim != 4 or w.shape[1] != 1:
        raise ValueError(f"--rgb needs a 1-channel encoder; {key} has {w.shape[1] if w.ndim == 4 else '?'} "
                         "input channels")
    out = dict(state)
    out[key] = (w.repeat(1, 3, 1, 1) / 3.0).contiguous()
    return out


def torchvision_state_dict(backbone: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in the layout of ``torchvision.models.<backbone>()`` without ``fc``; checked by a strict
    load into that model (its first convolution widened to the state's channels), so a file written
    from the result loads. A backbone outside :data:`TORCHVISION_ARCHS` is a ValueError."""
    if backbone not in TORCHVISION_ARCHS:
        raise ValueError(f"backbone {backbone!r} has no torchvision model of the same layout (torchvision "
                         f"export covers {', '.join(sorted(TORCHVISION_ARCHS))}); export the timm state dict")
    import torchvision

    out = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model = torchvision.models.get_model(backbone, weights=None)
    model.fc = nn.Identity()
    chans = out["conv1.weight"].shape[1]
    if chans != model.conv1.in_channels:
        c = model.conv1
        model.conv1 = nn.Conv2d(chans, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
    model.load_state_dict(out, strict=True)  # raises naming the keys that do not fit
    return out


def _window_entry(spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        name = spec.partition("@")[0]
        if name not in WINDOW_PRESETS:
            raise ValueError(f"unknown CT window {spec!r}")
        center, width = WINDOW_PRESETS[name]
    else:
        name, (center, width) = "custom", (float(v) for v in spec)
    mean_std = (standardisation([spec]) or [None])[0]
    return {"name": name, "center": center, "width": width,
            "mean": None if mean_std is None else mean_std[0], "std": None if mean_std is None else mean_std[1]}


def input_description(config: dict[str, Any], in_chans: int | None = None) -> dict[str, Any]:
    """How a slice becomes the encoder's input, from its ``encoder_config``: one window per channel
    (the config's, else the pre-training default for its channel count), each mapping stored values to
    ``clip((v - center + width / 2) / width, 0, 1)``, then ``(y - mean) / std`` where the window was
    standardised (8-bit data). ``in_chans`` overrides the channel count of the file (3 for --rgb: the
    one window's output copied into each channel)."""
    trained = int(config.get("in_chans", 1))
    windows = config.get("windows") or default_windows(trained)
    entries = [_window_entry(w) for w in windows]
    gray = all(e["name"] == "gray8" for e in entries)
    chans = in_chans or trained
    if chans != len(entries):
        entries = entries * chans if len(entries) == 1 else entries
    return {
        "values": "8-bit grey values 0..255" if gray else "Hounsfield units (HU)",
        "channels": entries,
        "formula": "y = clip((v - center + width / 2) / width, 0, 1); then y = (y - mean) / std where mean is set",
        "layout": "float32 tensor (N, C, H, W)",
    }


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.allclose(a, b, atol=CHECK_ATOL, rtol=CHECK_ATOL):
        diff = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        raise RuntimeError(f"the {what} does not reproduce the encoder's features (max difference {diff})")


def example_input(in_chans: int, img_size: int, batch: int = 2) -> torch.Tensor:
    """A fixed input for tracing and checking (batch > 1, so exported programs keep the batch dynamic)."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, in_chans, img_size, img_size, generator=g)


def save_torchscript(module: nn.Module, path: str, example: torch.Tensor) -> None:
    """``module`` traced to TorchScript at ``path`` (``torch.jit.load`` reads it, no timm needed);
    checked on a batch of another size than the trace's. PyTorch has deprecated TorchScript in favour
    of ``torch.export`` (:func:`save_exported_program`); it is written for runtimes that still read it."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        traced = torch.jit.trace(module, example, check_trace=False)
        traced.save(path)
        loaded = torch.jit.load(path)
        other = torch.cat([example, example.flip(0)])
        _close(loaded(other), module(other), "TorchScript file")


def save_exported_program(module: nn.Module, path: str, example: torch.Tensor) -> None:
    """``module`` as a ``torch.export`` archive (``torch.export.load(path).module()``), batch dynamic."""
    from torch.export import Dim

    with torch.no_grad():
        prog = torch.export.export(module, (example,), dynamic_shapes=({0: Dim.AUTO},))
        torch.export.save(prog, path)
        other = torch.cat([example, example.flip(0)])
        _close(torch.export.load(path).module()(other), module(other), "exported program")


ONNX_PACKAGES = ("onnx", "onnxscript")


def onnx_missing() -> list[str]:
    """The packages ``torch.onnx.export`` needs that are not installed ([] when it can run)."""
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def save_onnx(module: nn.Module, path: str, example: torch.Tensor) -> bool:
    """``module`` as an ONNX graph with a dynamic batch (input ``input``, output ``features``); checked
    with onnxruntime when it is installed (True), else only written (False)."""
    missing = onnx_missing()
    if missing:
        raise RuntimeError(f"ONNX export needs {' and '.join(missing)} (pip install {' '.join(ONNX_PACKAGES)})")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), path, input_names=["input"], output_names=["features"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                          external_data=False, verbose=False)  # one file: an encoder is far below 2 GB
    if importlib.util.find_spec("onnxruntime") is not None and os.path.exists(path):
        import onnxruntime

        sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        other = torch.cat([example, example.flip(0)])
        got = torch.from_numpy(sess.run(None, {"input": other.numpy()})[0])
        with torch.no_grad():
            _close(got, module(other), "ONNX graph")
        return True
    return False


__all__ = ["CHECK_ATOL", "TORCHVISION_ARCHS", "encoder_module", "example_input", "first_conv_key",
           "input_description", "onnx_missing", "rgb_state_dict", "save_exported_program", "save_onnx",
           "save_torchscript", "torchvision_state_dict"]

"""Frozen encoders as fine-tuning sees them, for pictures of what they learned.

The report's embedding maps need the labelled slices and each encoder with the input windows
fine-tuning gives it. Both are fine-tuning knowledge, so they are read here and handed to the
report (``MapsInput.load``): the report package never imports the fine-tuning code, which in turn
calls the report at the end of a study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_jobs.finetune.data import LabelledData, load_labelled
from ray_jobs.finetune.encoders import resolve_encoders
from ray_jobs.finetune.study import _encoder_payload
from ssl_core.ct_window import default_windows


@dataclass
class EncoderView:
    """One frozen encoder ready to embed: the network and the input windows fine-tuning gives it."""

    name: str
    module: Any  # torch.nn.Module (torch is imported on use)
    windows: list | None
    in_chans: int

    def embed(self, hu: np.ndarray, img_size: int) -> np.ndarray:
        """Pooled features of HU slices ``hu`` (N, H, W) resized to ``img_size``, on the CPU."""
        from ssl_core.probe import embed

        return embed(self.module, hu, img_size=img_size, windows=self.windows, in_chans=self.in_chans,
                     device="cpu")

    def window(self):  # noqa: ANN201 - a ct_window.WindowSpec
        """The window the thumbnails are drawn through: the encoder's first input window."""

        return (self.windows or default_windows(self.in_chans))[0]


def load_views(encoders: list[str], *, backbone: str | None, tracking_uri: str, seed: int, intensity: str,
               stats: dict[str, float] | None) -> list[EncoderView]:
    """``encoders`` (NAME=SOURCE, "random" included) as fine-tuning resolves them, each a feature
    extractor (no classifier). Random initialisation is drawn from ``seed`` without touching the global
    random state, so the pictures are the same on every run."""
    import torch

    from ssl_core.backbones import create_backbone, load_encoder_state_dict

    specs = resolve_encoders(encoders, default_backbone=backbone, in_chans=None, tracking_uri=tracking_uri)
    payload = _encoder_payload(specs, intensity, stats)
    views = []
    for s in specs:
        if s.state is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = create_backbone(s.backbone, in_chans=s.in_chans)
        else:
            module = load_encoder_state_dict(s.backbone, s.state, in_chans=s.in_chans, num_classes=0)
        views.append(EncoderView(s.name, module, payload[s.name]["windows"], s.in_chans))
    return views


def load_maps_data(inp: Any) -> tuple[LabelledData, list[EncoderView]]:
    """``MapsInput.load``: the labelled set of ``inp.labelled`` and the frozen views of ``inp.encoders``."""
    data = load_labelled(inp.labelled)
    views = load_views(inp.encoders, backbone=inp.backbone, tracking_uri=inp.tracking_uri, seed=inp.seed,
                       intensity=data.intensity, stats=data.intensity_stats)
    return data, views


__all__ = ["EncoderView", "load_maps_data", "load_views"]

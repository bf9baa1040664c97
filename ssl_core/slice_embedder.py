"""An encoder that turns CT slices (HU arrays) into unit-length feature vectors.

The embedding reduction strategy (``data_prep.reduce.embedding``) measures how alike slices are
through such vectors. It is built here, in the model layer, and handed to the strategy by its caller
(``ctssl reduce``), so the data layer never imports torch or the model code itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctssl_base.errors import UserError
from ssl_core.backbones import create_backbone, load_encoder_state_dict
from ssl_core.ct_window import apply_window

log = logging.getLogger(__name__)


class SliceEmbedder:
    """Windowed, resized slices through a CNN encoder, features L2-normalised.

    ``in_chans`` is the number of CT windows the encoder takes; :meth:`__call__` is given the window
    names (the strategy picks them from the data's intensity) and checks they fit.
    """

    def __init__(self, model: nn.Module, in_chans: int, size: int, batch_size: int,
                 device: torch.device | None = None) -> None:
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.in_chans, self.size, self.batch_size = in_chans, size, batch_size

    @classmethod
    def load(cls, model: str = "resnet18", checkpoint: str | None = None, *, in_chans: int = 1,
             size: int = 128, batch_size: int = 64) -> SliceEmbedder:
        """timm ``model`` with the weights of a ctssl encoder state_dict file, or random weights."""
        try:
            if checkpoint:
                sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
                if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
                    sd = sd["state_dict"]
                net = load_encoder_state_dict(model, sd, in_chans=in_chans, num_classes=0)
            else:
                log.warning("embedding: no --checkpoint, so %s has random weights", model)
                net = create_backbone(model, in_chans=in_chans)
        except FileNotFoundError:
            raise UserError(f"--checkpoint {checkpoint}: no such file") from None
        except (ValueError, RuntimeError) as e:
            raise UserError(f"embedding encoder: {e}") from None
        return cls(net, in_chans, size, batch_size)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SliceEmbedder:
        """The encoder the embedding strategy's recorded options describe (model, checkpoint, size,
        batch_size, windows): what ``ctssl reduce`` hands to the strategy."""
        windows = options.get("windows")
        return cls.load(options.get("model", "resnet18"), options.get("checkpoint"),
                        in_chans=len(windows) if windows else 1, size=int(options.get("size", 128)),
                        batch_size=int(options.get("batch_size", 64)))

    @torch.no_grad()
    def __call__(self, hu: np.ndarray, windows: Sequence[str]) -> np.ndarray:
        """(N, H, W) HU slices -> (N, D) float32 unit vectors."""
        if len(windows) != self.in_chans:
            raise UserError(f"--windows {' '.join(windows)}: {len(windows)} window(s), but the encoder takes "
                            f"{self.in_chans} input channel(s)")
        outs = []
        for s in range(0, hu.shape[0], self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(hu[s:s + self.batch_size])).to(self.device).float()[:, None]
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="area")
            x = apply_window(x, list(windows))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                z = self.model(x).float()
            outs.append(F.normalize(z, dim=1).cpu().numpy())
        return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)

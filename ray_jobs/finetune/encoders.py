"""Resolving ``--encoder`` values to weights: random init, a checkpoint folder, or an MLflow run.

Pre-training writes ``encoder.pt`` (timm-layout state_dict) + ``encoder_config.json`` into its final
checkpoint and logs both to MLflow under ``encoder/``; any of those places can be named here. Errors
are raised in the driver, before any trial starts, naming the source that does not work.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from ctssl_base import storage
from ctssl_base.errors import UserError
from ray_jobs.pretrain.checkpoint import ENCODER_CONFIG_FILE, ENCODER_FILE

log = logging.getLogger(__name__)

RANDOM = "random"


@dataclass
class EncoderSpec:
    name: str  # label in the study (tag "method")
    source: str
    backbone: str
    in_chans: int
    method: str  # pre-training method, "random" for the baseline
    state: dict[str, torch.Tensor] | None  # None: random initialisation
    config: dict[str, Any]


def split_name(value: str) -> tuple[str | None, str]:
    """``NAME=SOURCE`` -> (NAME, SOURCE); a bare source -> (None, SOURCE). URLs keep their ``=``s."""
    if "=" in value:
        name, src = value.split("=", 1)
        if name and "/" not in name and ":" not in name:
            return name, src
    return None, value


def _load_from_folder(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A folder holding encoder.pt, or a pre-training run folder whose newest checkpoint holds it."""
    fs, root = storage.open_fs(url)
    if not fs.exists(root):
        raise UserError(f"--encoder {url}: not found")
    candidates = [root]
    if not fs.exists(storage.join(root, ENCODER_FILE)):
        subs = sorted(p for p in fs.ls(root, detail=False)
                      if posixpath.basename(p.rstrip("/")).startswith("checkpoint_"))
        candidates = [p for p in reversed(subs) if fs.exists(storage.join(p, ENCODER_FILE))]
        if not candidates:
            raise UserError(f"--encoder {url}: no {ENCODER_FILE} here nor in a checkpoint_* folder (is the "
                            "pre-training finished? only the final checkpoint holds the encoder)")
    folder = candidates[0]
    state = torch.load(io.BytesIO(fs.cat_file(storage.join(folder, ENCODER_FILE))), map_location="cpu",
                       weights_only=True)
    cfg_path = storage.join(folder, ENCODER_CONFIG_FILE)
    config = json.loads(fs.cat_file(cfg_path)) if fs.exists(cfg_path) else {}
    return state, config


def _load_from_mlflow(run_uri: str, tracking_uri: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import mlflow

    run_id = run_uri[len("runs:/"):].strip("/").split("/")[0]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="encoder", dst_path=tmp,
                                                        tracking_uri=tracking_uri)
        except Exception as e:  # noqa: BLE001 - unknown run, no artifacts, server down: say which
            raise UserError(f"--encoder {run_uri}: cannot download the encoder from MLflow ({e})") from None
        path = os.path.join(local, ENCODER_FILE)
        if not os.path.exists(path):
            raise UserError(f"--encoder {run_uri}: the run has no encoder/{ENCODER_FILE} artifact")
        state = torch.load(path, map_location="cpu", weights_only=True)
        cpath = os.path.join(local, ENCODER_CONFIG_FILE)
        config = {}
        if os.path.exists(cpath):
            with open(cpath) as f:
                config = json.load(f)
    return state, config


def resolve_encoder(value: str, *, default_backbone: str, in_chans: int | None, tracking_uri: str) -> EncoderSpec:
    name, src = split_name(value)
    if src == RANDOM:
        return EncoderSpec(name=name or RANDOM, source=RANDOM, backbone=default_backbone, in_chans=in_chans or 1,
                           method=RANDOM, state=None, config={"backbone": default_backbone})
    if src.startswith("runs:/"):
        state, config = _load_from_mlflow(src, tracking_uri)
    else:
        state, config = _load_from_folder(src)
    backbone = config.get("backbone", default_backbone)
    enc_chans = int(config.get("in_chans", in_chans or 1))
    if in_chans is not None and enc_chans != in_chans:
        raise UserError(f"--encoder {value}: pre-trained with in_chans={enc_chans}, but --in-chans {in_chans}")
    method = str(config.get("method", "pretrained"))
    # fail now, in the driver, if the weights do not fit the model they claim to be
    from ssl_core.backbones import load_encoder_state_dict

    try:
        load_encoder_state_dict(backbone, state, in_chans=enc_chans, num_classes=2)
    except ValueError as e:
        raise UserError(f"--encoder {value}: {e}") from None
    return EncoderSpec(name=name or method, source=src, backbone=backbone, in_chans=enc_chans, method=method,
                       state=state, config=config)


#: the random baseline's network when no pre-trained encoder names one (the papers' ResNet-50)
DEFAULT_BACKBONE = "resnet50"


def resolve_encoders(values: list[str], *, default_backbone: str | None, in_chans: int | None,
                     tracking_uri: str) -> list[EncoderSpec]:
    """Load every ``--encoder``. The random baseline takes the pre-trained encoders' backbone and
    channels unless ``default_backbone`` names one: a baseline on another network would compare
    networks, not initialisations. Encoders of different backbones need the baseline's named."""
    loaded = [resolve_encoder(v, default_backbone=default_backbone or DEFAULT_BACKBONE, in_chans=in_chans,
                              tracking_uri=tracking_uri) if split_name(v)[1] != RANDOM else None for v in values]
    pre = [s for s in loaded if s is not None]
    backbones = sorted({s.backbone for s in pre})
    chans = sorted({s.in_chans for s in pre})
    if default_backbone is None and len(backbones) > 1 and len(pre) < len(values):
        raise UserError(f"--encoder random: the pre-trained encoders use different backbones ({', '.join(backbones)}); "
                        "name the baseline's with --backbone")
    base_backbone = default_backbone or (backbones[0] if backbones else DEFAULT_BACKBONE)
    if default_backbone is not None and backbones and backbones != [default_backbone] and len(pre) < len(values):
        log.warning("the random baseline is a %s, the pre-trained encoders are %s: the comparison mixes networks",
                    default_backbone, ", ".join(backbones))
    base_chans = in_chans or (chans[0] if len(chans) == 1 else 1)
    specs = [s if s is not None else resolve_encoder(v, default_backbone=base_backbone, in_chans=base_chans,
                                                     tracking_uri=tracking_uri)
             for v, s in zip(values, loaded, strict=True)]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"two encoders are both named {dup}; give them names with NAME=SOURCE")
    return specs

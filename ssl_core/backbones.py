"""timm CNN backbones for pre-training, and export of their weights in timm layout.

Public API (stable, imported by other modules):

* :func:`create_backbone` ``(name, in_chans=1, **timm_kwargs) -> nn.Module`` — a timm model with its
  classifier removed (``num_classes=0``) and global pooling kept, so ``model(x)`` is an (N, D) feature.
  Pretrained weights are never requested: nothing may be downloaded at run time, and pre-training
  starts from random weights by design.
* :func:`feature_dim` ``(model) -> int`` — width D of the pooled feature.
* :func:`export_encoder_state_dict` ``(model) -> dict`` — plain CPU state_dict in timm layout with any
  wrapper prefixes (DDP ``module.``, ``torch.compile`` ``_orig_mod.``) removed, so
  ``timm.create_model(name, in_chans=..., num_classes=K).load_state_dict(sd, strict=False)`` reports
  only the classifier as missing.
* :func:`load_encoder_state_dict` ``(name, state_dict, in_chans=1, num_classes=0, **kw) -> nn.Module``
  — the inverse: a fresh timm model with the exported weights, checking that nothing but the
  classifier is missing and nothing is unexpected.

Exporting the *timm* layout (not our wrapper's) is what lets MLflow artifacts be used by anyone with
plain timm, without importing ctssl.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def create_backbone(name: str, in_chans: int = 1, **timm_kwargs: Any) -> nn.Module:
    """A timm CNN without classifier: ``forward(x) -> (N, feature_dim)`` pooled features."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if timm_kwargs.pop("pretrained", False):
        raise ValueError("pretrained weights cannot be used: nothing is downloaded at run time")
    timm_kwargs.setdefault("num_classes", 0)
    timm_kwargs.setdefault("global_pool", "avg")
    try:
        return timm.create_model(name, pretrained=False, in_chans=in_chans, **timm_kwargs)
    except RuntimeError as e:  # timm raises RuntimeError("Unknown model (...)")
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())") from None
        raise


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled feature; timm models expose it as ``num_features``."""
    inner = unwrap(model)
    dim = getattr(inner, "num_features", None)
    if dim is None:
        raise TypeError(f"{type(inner).__name__} has no num_features; is it a timm model?")
    return int(dim)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def export_encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of the backbone weights in timm layout (classifier excluded)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in unwrap(model).state_dict().items():
        k = _strip_prefixes(k)
        if k.startswith("fc.") or k.startswith("head.fc.") or k.startswith("classifier."):
            continue  # a classifier never belongs to a pre-trained encoder
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of a timm model's classifier (what may be missing after loading an encoder)."""
    cls = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(cls, nn.Module):
        return set()
    ids = {id(t) for t in cls.state_dict(keep_vars=True).values()}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def load_encoder_state_dict(
    name: str,
    state_dict: dict[str, torch.Tensor],
    in_chans: int = 1,
    num_classes: int = 0,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model carrying an exported encoder; errors name any key that does not fit.

    With ``num_classes > 0`` the new classifier stays randomly initialised (it is the one thing
    allowed to be missing).
    """
    if timm_kwargs.pop("pretrained", False):
        raise ValueError("pretrained weights cannot be used: nothing is downloaded at run time")
    model = timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=num_classes,
                              **timm_kwargs)
    sd = {_strip_prefixes(k): v for k, v in state_dict.items()}
    result = model.load_state_dict(sd, strict=False)
    allowed = classifier_keys(model)
    missing = [k for k in result.missing_keys if k not in allowed]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"encoder state_dict does not fit timm model {name!r} (in_chans={in_chans}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )
    return model


__all__ = ["classifier_keys", "create_backbone", "export_encoder_state_dict", "feature_dim",
           "load_encoder_state_dict", "unwrap"]

"""Backbones: any timm CNN by name, 1 or 3 input channels, export that plain timm loads."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from ssl_core.backbones import (
    create_backbone,
    export_encoder_state_dict,
    feature_dim,
    load_encoder_state_dict,
)


@pytest.mark.parametrize(("name", "width"), [("resnet18", 512), ("test_convnext", 64), ("test_resnet", 96)])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_backbone_maps_images_to_pooled_features_of_its_width(name, width, in_chans):
    model = create_backbone(name, in_chans=in_chans)
    assert feature_dim(model) == width
    out = model(torch.randn(2, in_chans, 32, 32))
    assert out.shape == (2, width)


@pytest.mark.parametrize("name", ["resnet18", "test_convnext"])
def test_exported_encoder_loads_into_timm_classifier_with_only_the_classifier_missing(name):
    model = create_backbone(name, in_chans=3)
    with torch.no_grad():  # make the weights distinguishable from a fresh init
        for p in model.parameters():
            p.add_(0.01)
    sd = export_encoder_state_dict(model)
    clf = timm.create_model(name, in_chans=3, num_classes=7)
    result = clf.load_state_dict(sd, strict=False)
    head = "fc" if name.startswith("resnet") else "head.fc"
    assert sorted(result.missing_keys) == [f"{head}.bias", f"{head}.weight"]
    assert result.unexpected_keys == []
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    clf.eval()
    torch.testing.assert_close(clf.forward_head(clf.forward_features(x), pre_logits=True), model(x))


def test_export_strips_ddp_and_compile_prefixes_and_copies_to_cpu():
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel: the model sits at .module
        def __init__(self, m: nn.Module):
            super().__init__()
            self.module = m

    model = create_backbone("test_resnet", in_chans=1)
    sd = export_encoder_state_dict(Wrapper(Wrapper(model)))
    assert set(sd) == set(model.state_dict())
    key = next(iter(sd))
    assert sd[key].data_ptr() != model.state_dict()[key].data_ptr()  # a copy, not a view
    prefixed = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    loaded = load_encoder_state_dict("test_resnet", prefixed, in_chans=1, num_classes=3)
    torch.testing.assert_close(loaded.state_dict()[key], sd[key])


def test_loading_an_encoder_into_a_different_architecture_names_the_mismatch():
    sd = export_encoder_state_dict(create_backbone("resnet18", in_chans=1))
    with pytest.raises(ValueError, match=r"does not fit timm model 'resnet34'.*missing \['layer1.2"):
        load_encoder_state_dict("resnet34", sd, in_chans=1)
    with pytest.raises(RuntimeError, match="size mismatch"):  # 1-channel stem into a 3-channel model
        load_encoder_state_dict("resnet18", sd, in_chans=3)


def test_pretrained_weights_and_unknown_names_are_refused_with_clear_errors():
    with pytest.raises(ValueError, match="nothing is downloaded"):
        create_backbone("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet_does_not_exist'"):
        create_backbone("resnet_does_not_exist")
    with pytest.raises(ValueError, match="in_chans must be >= 1"):
        create_backbone("resnet18", in_chans=0)

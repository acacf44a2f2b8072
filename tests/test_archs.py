"""CIFAR architectures registered into timm's own registry."""

from __future__ import annotations

import pytest
import timm
import torch

import transfer_analysis.models.archs  # noqa: F401


@pytest.mark.parametrize("name", ["resnet18_cifar", "preactresnet18_cifar", "mobilenetv2_cifar",
                                  "wideresnet34_10", "wideresnet70_16", "mixer_cifar", "resmlp_cifar"])
def test_registered(name):
    assert timm.is_model(name) and name in timm.list_models()


def test_reference_parameter_counts():
    # ResNet-18 (CIFAR) 11,173,962 and WRN-34-10 46,160,474 parameters, as in the literature.
    assert sum(p.numel() for p in timm.create_model("resnet18_cifar").parameters()) == 11_173_962
    assert sum(p.numel() for p in timm.create_model("wideresnet34_10").parameters()) == 46_160_474


@pytest.mark.parametrize("name,kw", [("resnet18_cifar", {"width": 8}), ("preactresnet18_cifar", {"width": 8}),
                                     ("mobilenetv2_cifar", {"width_mult": 0.25})])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_any_in_chans_and_pooled_features(name, kw, in_chans):
    model = timm.create_model(name, num_classes=10, in_chans=in_chans, **kw).eval()
    x = torch.rand(2, in_chans, 32, 32)
    assert model(x).shape == (2, 10)
    feats = timm.create_model(name, num_classes=0, in_chans=in_chans, **kw).eval()
    assert feats(x).shape == (2, feats.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_no_early_downsampling():
    model = timm.create_model("resnet18_cifar", width=8).eval()
    assert model.forward_features(torch.rand(1, 3, 32, 32)).shape[-1] == 4  # 32 / 8: three stride-2 stages


def test_pretrained_is_refused():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet18_cifar", pretrained=True)


@pytest.mark.parametrize("name", ["mixer_cifar", "resmlp_cifar"])
def test_mlp_families_take_size_kwargs_and_follow_the_pool_image_size(name, write_pool):
    from transfer_analysis import load_pool

    model = timm.create_model(name, num_classes=5, in_chans=1, img_size=28, embed_dim=32, num_blocks=2)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 5)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    # no img_size in the entry: the pool sets it to the dataset's size (fixed-input-size architectures)
    path = write_pool([{"name": "m", "arch": name, "kwargs": {"embed_dim": 32, "num_blocks": 2}}])
    assert load_pool(path, num_classes=5, in_chans=1, image_size=12)["m"](torch.rand(3, 1, 12, 12)).shape == (3, 5)

"""CIFAR-style architectures that timm lacks, registered into timm's own registry.

Importing this module (``transfer_analysis`` does it whenever a model is built) makes these names
available to :func:`timm.create_model` like any other timm model:

- ``resnet18_cifar``, ``preactresnet18_cifar``: 3x3 stride-1 stem, no max-pool (``width`` sets the
  base channel count, 64 by default, so a test or a CPU study can use a slim copy);
- ``mobilenetv2_cifar``: stride-1 stem and first stages, for 32x32 inputs (``width_mult``);
- ``wideresnet34_10``, ``wideresnet70_16``: WideResNets as used by robust-training papers;
- ``mixer_cifar``, ``resmlp_cifar``: timm's own MLP-Mixer / ResMLP classes with small-image
  defaults (patch 4, 32x32) whose size can be set by kwargs (timm's ``mixer_*_224`` entrypoints fix
  their widths and depths).

All of them take ``in_chans``, ``num_classes`` (0 gives pooled features, as in timm) and
``drop_rate``, and follow timm's interface (``num_features``, ``forward_features``,
``forward_head``, ``reset_classifier``).

Example:
    >>> import timm, torch, transfer_analysis.models.archs
    >>> m = timm.create_model("resnet18_cifar", num_classes=10, in_chans=1, width=8)
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

__all__ = [
    "CifarResNet",
    "CifarMobileNetV2",
    "WideResNet",
    "resnet18_cifar",
    "preactresnet18_cifar",
    "mobilenetv2_cifar",
    "wideresnet34_10",
    "wideresnet70_16",
    "mixer_cifar",
    "resmlp_cifar",
]


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 10, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2471, 0.2435, 0.2616),
        "first_conv": "stem.0", "classifier": "head", **kwargs,
    }


# Per-architecture config dicts, read by timm's register_model (no weights: url and hub id empty).
default_cfgs = {name: _cfg() for name in (
    "resnet18_cifar", "preactresnet18_cifar", "mobilenetv2_cifar", "wideresnet34_10", "wideresnet70_16")}
default_cfgs.update({name: _cfg(fixed_input_size=True, first_conv="stem.proj") for name in ("mixer_cifar", "resmlp_cifar")})


class _TimmLike(nn.Module):
    """timm's classifier interface on top of ``forward_features`` and ``self.head``."""

    num_features: int
    num_classes: int
    drop_rate: float

    def _init_head(self, num_classes: int, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._init_head(num_classes, self.drop_rate)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- ResNet-18 (CIFAR)
class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class CifarResNet(_TimmLike):
    """ResNet for small images: 3x3 stride-1 stem, no max-pool (He et al. 2016; Madry et al. setup)."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 in_chans: int = 3, width: int = 64, drop_rate: float = 0.0, preact: bool = False) -> None:
        super().__init__()
        self.preact = preact
        stem: list[nn.Module] = [nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)]
        if not preact:
            stem += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem)
        in_planes = width
        stages = []
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, (1 if i == 0 else 2) if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_norm = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.num_features = in_planes
        self._init_head(num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.stages(self.stem(x)))


# ---------------------------------------------------------------------------- MobileNetV2 (CIFAR)
class _InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = None
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 1:
            out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return out


class CifarMobileNetV2(_TimmLike):
    """MobileNetV2 for 32x32 inputs: stride-1 stem and first stages (Sandler et al. 2018, CIFAR variant)."""

    # (expansion, out_planes, num_blocks, stride)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
                 drop_rate: float = 0.0) -> None:
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(round(c * width_mult)))

        self.stem = nn.Sequential(nn.Conv2d(in_chans, ch(32), 3, 1, 1, bias=False), nn.BatchNorm2d(ch(32)),
                                  nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        in_planes = ch(32)
        for expansion, out_planes, num_blocks, stride in self.CFG:
            for j in range(num_blocks):
                layers.append(_InvertedResidual(in_planes, ch(out_planes), expansion, stride if j == 0 else 1))
                in_planes = ch(out_planes)
        self.blocks = nn.Sequential(*layers)
        last = ch(1280) if width_mult > 1.0 else 1280
        self.conv_head = nn.Sequential(nn.Conv2d(in_planes, last, 1, bias=False), nn.BatchNorm2d(last),
                                       nn.ReLU(inplace=True))
        self.num_features = last
        self._init_head(num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))


# ---------------------------------------------------------------------------- WideResNet
class _WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(o)
        out = self.conv1(o)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(_TimmLike):
    """WideResNet-depth-widen (Zagoruyko and Komodakis 2016), the backbone of most robust CIFAR models."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, block_drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False))
        stages = []
        in_planes = widths[0]
        for i, stride in enumerate((1, 2, 2)):
            blocks = [_WideBlock(in_planes if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1,
                                 block_drop_rate) for j in range(n)]
            in_planes = widths[i + 1]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_norm = nn.Sequential(nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True))
        self.num_features = in_planes
        self._init_head(num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.stages(self.stem(x)))


# ---------------------------------------------------------------------------- registration
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "global_pool")


def _build(name: str, cls: Any, pretrained: bool, kwargs: dict[str, Any], **fixed: Any) -> nn.Module:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights in timm; give a checkpoint in the pool entry instead")
    for key in _TIMM_ONLY:
        kwargs.pop(key, None)
    model = cls(**{**fixed, **kwargs})
    cfg = dict(default_cfgs[name])
    img = kwargs.get("img_size", 32)
    cfg["input_size"] = (kwargs.get("in_chans", 3), *((img, img) if isinstance(img, int) else img))
    model.pretrained_cfg = model.default_cfg = cfg
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 with a 3x3 stride-1 stem for 32x32 inputs."""
    return _build("resnet18_cifar", CifarResNet, pretrained, kwargs, block=_BasicBlock, layers=(2, 2, 2, 2))


@register_model
def preactresnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Pre-activation ResNet-18 (He et al. 2016b) for 32x32 inputs."""
    return _build("preactresnet18_cifar", CifarResNet, pretrained, kwargs, block=_PreActBlock,
                  layers=(2, 2, 2, 2), preact=True)


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs: Any) -> CifarMobileNetV2:
    """MobileNetV2 with stride-1 stem and first stages for 32x32 inputs."""
    return _build("mobilenetv2_cifar", CifarMobileNetV2, pretrained, kwargs)


@register_model
def wideresnet34_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WideResNet-34-10."""
    return _build("wideresnet34_10", WideResNet, pretrained, kwargs, depth=34, widen_factor=10)


@register_model
def wideresnet70_16(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WideResNet-70-16."""
    return _build("wideresnet70_16", WideResNet, pretrained, kwargs, depth=70, widen_factor=16)


@register_model
def mixer_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MLP-Mixer (Tolstikhin et al. 2021) for small images: patch 4, 8 blocks, width 256 by default."""
    from timm.models.mlp_mixer import MlpMixer

    return _build("mixer_cifar", MlpMixer, pretrained, kwargs, img_size=32, patch_size=4, num_blocks=8, embed_dim=256)


@register_model
def resmlp_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResMLP (Touvron et al. 2021) for small images: patch 4, 12 blocks, width 192 by default."""
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    return _build("resmlp_cifar", MlpMixer, pretrained, kwargs, img_size=32, patch_size=4, num_blocks=12,
                  embed_dim=192, mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)

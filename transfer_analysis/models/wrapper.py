"""The pixel-space wrapper: every model takes [0, 1] images at the data's resolution.

:class:`PixelSpaceModel` does, inside ``forward`` and in this order: replicate a grayscale
channel to RGB (for RGB-pretrained models on 1-channel data), centre-crop a fraction
``crop_pct`` of the image (only when set), resize to the model's own ``input_size`` with its own
``interpolation`` (antialiased when shrinking), normalize with its own ``mean``/``std``, and call
the model. An attack perturbs the wrapper's input, so one ε means the same for every model of a
pool, whatever each does inside.

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = PixelSpaceModel(nn.Flatten(), input_size=(2, 2), mean=[0.5], std=[0.5], channels=3)
    >>> m(torch.ones(1, 1, 4, 4)).shape      # gray -> RGB, 4x4 -> 2x2, then normalized
    torch.Size([1, 12])
    >>> float(m(torch.ones(1, 1, 4, 4)).max())
    1.0
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PixelSpaceModel", "model_fingerprint", "count_params"]


class PixelSpaceModel(nn.Module):
    """Take [0, 1] images at any size; (replicate channels, crop,) resize, normalize, call the model.

    ``mean``/``std`` are non-persistent buffers, so ``state_dict()`` holds only ``model.*``.
    ``weights`` says where the weights came from (``pretrained``, ``checkpoint``, ``random``) and
    ``new_head`` whether the classifier is new (a pretrained backbone given ``num_classes``).
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 name: str | None = None, interpolation: str = "bilinear", crop_pct: float | None = None,
                 channels: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.input_size = tuple(input_size) if input_size is not None else None
        self.interpolation = interpolation
        self.crop_pct = None if crop_pct is None or crop_pct >= 1 else float(crop_pct)
        self.channels = channels
        self.identity_norm = mean is None and std is None
        mean_t = torch.tensor(list(mean) if mean is not None else [0.0], dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std) if std is not None else [1.0], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self.entry: Any = None
        self.fingerprint: str | None = None
        self.weights: str | None = None
        self.new_head = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels is not None and x.shape[1] == 1 and self.channels > 1:
            x = x.expand(-1, self.channels, -1, -1)
        if self.crop_pct is not None:
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * self.crop_pct)), max(1, round(w * self.crop_pct))
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            down = x.shape[-1] > self.input_size[-1]
            smooth = self.interpolation in ("bilinear", "bicubic")
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation,
                              **({"align_corners": False, "antialias": down} if smooth else {}))
        if not self.identity_norm:
            x = (x - self.mean) / self.std
        return self.model(x)

    def preprocessing(self) -> dict[str, Any]:
        """What ``forward`` does before the model, as plain data (for config files and tables)."""
        return {"input_size": list(self.input_size) if self.input_size else None, "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "channels": self.channels,
                "mean": None if self.identity_norm else self.mean.flatten().tolist(),
                "std": None if self.identity_norm else self.std.flatten().tolist()}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, input_size={self.input_size}, interpolation={self.interpolation!r}, "
                f"crop_pct={self.crop_pct}, identity_norm={self.identity_norm}")


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's content: every parameter and buffer (name, dtype, shape, bytes), and
    for a :class:`PixelSpaceModel` what it does to its input.

    Two models with the same fingerprint compute the same function, whatever their names, so it
    is the cache key for anything computed from a model.
    """
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict(keep_vars=False).items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if isinstance(model, PixelSpaceModel):
        pre: dict[str, Any] = {"input_size": model.input_size, "mean": model.mean.flatten().tolist(),
                               "std": model.std.flatten().tolist(), "identity": model.identity_norm}
        # only what differs from the first wrapper's behaviour, so earlier caches stay valid
        if model.interpolation != "bilinear":
            pre["interpolation"] = model.interpolation
        if model.crop_pct is not None:
            pre["crop_pct"] = model.crop_pct
        if model.channels is not None:
            pre["channels"] = model.channels
        h.update(json.dumps(pre).encode())
    return h.hexdigest()

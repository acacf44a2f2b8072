"""A seeded, learnable synthetic image set for tests: ``synthetic[:key=value,...]``.

Example:
    >>> ds = make_synthetic(num_classes=3, in_chans=1, image_size=8, n_train=60, n_test=30)
    >>> tuple(ds.x_train.shape), ds.num_classes
    ((60, 1, 8, 8), 3)
    >>> parse_synthetic_options("num_classes=4,image_size=16")
    {'num_classes': 4, 'image_size': 16}
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from .dataset import Augment, ImageDataset

__all__ = ["SYNTHETIC_OPTIONS", "SYNTHETIC_MAX_BYTES", "make_synthetic", "parse_synthetic_options"]

#: synthetic dataset options and their types
SYNTHETIC_OPTIONS: dict[str, type] = {"num_classes": int, "in_chans": int, "image_size": int, "n_train": int,
                                      "n_test": int, "seed": int, "noise": float}
#: largest synthetic dataset (float32 bytes while it is generated); tests need far less
SYNTHETIC_MAX_BYTES = 2 << 30


def parse_synthetic_options(options: str) -> dict[str, Any]:
    """``key=value,...`` after ``synthetic:``, typed; an unknown key or a bad value is one line."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"synthetic dataset option {item!r} must be key=value, e.g. synthetic:num_classes=4")
        if key not in SYNTHETIC_OPTIONS:
            close = difflib.get_close_matches(key, list(SYNTHETIC_OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown synthetic dataset option {key!r}{hint}; options: {', '.join(SYNTHETIC_OPTIONS)}")
        try:
            out[key] = SYNTHETIC_OPTIONS[key](value)
        except ValueError as err:
            kind = "an integer" if SYNTHETIC_OPTIONS[key] is int else "a number"
            raise UserError(f"synthetic dataset option {item!r} needs {kind}") from err
    return out


def make_synthetic(num_classes: int = 10, in_chans: int = 3, image_size: int = 32, n_train: int = 2000,
                   n_test: int = 500, seed: int = 0, noise: float = 0.12) -> ImageDataset:
    """A seeded, learnable image-classification set for tests.

    Each class has a smooth random prototype (a coarse 4x4 pattern upsampled to the image size);
    a sample is its class prototype under a random brightness shift plus pixel noise, quantized to
    uint8. A small CNN separates the classes in a few epochs, yet an L∞ attack of ~0.1 fools it.
    """
    allowed = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size,
               "n_train": n_train, "n_test": n_test}
    for key, value in allowed.items():
        if value < (2 if key == "num_classes" else 1):
            raise UserError(f"synthetic dataset: {key} must be >= {2 if key == 'num_classes' else 1}, got {value}")
    if not 0 <= noise < float("inf"):
        raise UserError(f"synthetic dataset: noise must be a finite number >= 0, got {noise}")
    size = 4 * (n_train + n_test) * in_chans * image_size * image_size
    if size > SYNTHETIC_MAX_BYTES:
        raise UserError(f"synthetic dataset of {n_train + n_test} images of {in_chans}x{image_size}x{image_size} "
                        f"needs {size / 2**30:.1f} GiB to generate, more than the {SYNTHETIC_MAX_BYTES >> 30} GiB "
                        "allowed; use fewer or smaller images")
    g = torch.Generator().manual_seed(int(seed))
    coarse = torch.rand(num_classes, in_chans, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos = 0.2 + 0.6 * protos

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        shift = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.1
        x = protos[y] + shift + noise * torch.randn(n, in_chans, image_size, image_size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    return ImageDataset("synthetic", x_train, y_train, x_test, y_test, num_classes, Augment())

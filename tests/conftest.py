"""Shared fixtures: tiny synthetic data and pool files built in the test (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# One thread: tiny models gain nothing from more, and OpenMP spinning on a loaded 2-core machine
# made single forwards 100x slower and erratic.
torch.set_num_threads(1)

# A tiny CNN from the registered CIFAR architectures, fast on CPU.
TINY_CNN = {"arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn"}
TINY_VIT = {"arch": "vit_tiny_patch16_224",
            "kwargs": {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}, "family": "vit"}


@pytest.fixture(scope="session")
def tiny_data():
    """Four classes of 1x12x12 synthetic images (learnable in a few epochs)."""
    from transfer_analysis import load_dataset

    return load_dataset("synthetic:num_classes=4,in_chans=1,image_size=12,n_train=512,n_test=128")


@pytest.fixture
def write_pool(tmp_path: Path) -> Callable[[list[dict[str, Any]]], Path]:
    """Write a pool YAML from a list of entries and return its path."""

    def _write(entries: list[dict[str, Any]], name: str = "pool.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
        return path

    return _write

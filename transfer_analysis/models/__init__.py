"""The model pool: YAML entries -> built from their source -> weights -> frozen pixel-space models.

Every pool model takes images in [0, 1] at the dataset's resolution and returns logits; the
:class:`PixelSpaceModel` wrapper does the model's own resize and normalization *inside*
``forward``, so ε means the same thing for every architecture.

An entry's road is one way, one module each: ``entry`` (the YAML schema, parsed and checked, the
one name rule) -> ``sources`` (timm registry, ``hf-hub:``, ``local-dir:``, RobustBench's zoo; the
pretrained config) -> ``weights`` (safe loading of safetensors, torch and timm ``train.py``
checkpoints) -> ``wrapper`` (:class:`PixelSpaceModel`, fingerprints); ``build`` walks it where the
model meets the data (:func:`build_pool_model`, :func:`load_pool`, :class:`LazyPool`); ``archs``
registers the CIFAR architectures into timm.

Example:
    >>> import torch
    >>> m = build_pool_model(PoolEntry("r", "resnet18_cifar", {"width": 4}), 10, 1, 28, warn_random=False)
    >>> m.weights, m(torch.rand(1, 1, 28, 28)).shape
    ('random', torch.Size([1, 10]))
"""

from __future__ import annotations

from .build import LazyPool, ModelInfo, build_pool_model, fit_constants, init_seed_for, load_pool, \
    merge_implied_kwargs, open_pool, warn_random_weights
from .entry import PoolEntry, check_model_name, parse_pool_entries, read_pool_config
from .sources import create_timm_model, pretrained_config
from .weights import apply_state_dict, load_state_dict_file
from .wrapper import PixelSpaceModel, count_params, model_fingerprint

__all__ = [
    "PoolEntry", "PixelSpaceModel", "LazyPool", "ModelInfo", "read_pool_config", "parse_pool_entries",
    "check_model_name", "load_pool", "open_pool", "build_pool_model", "create_timm_model", "pretrained_config",
    "merge_implied_kwargs", "fit_constants", "load_state_dict_file", "apply_state_dict", "model_fingerprint",
    "count_params", "init_seed_for", "warn_random_weights",
]

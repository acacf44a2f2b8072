"""Weights: state dicts read safely from safetensors and torch files, and applied strictly.

Example:
    >>> import torch
    >>> from torch import nn
    >>> m = nn.Linear(2, 2)
    >>> apply_state_dict(m, {"weight": torch.zeros(2, 2), "bias": torch.ones(2)})
    >>> m.bias.tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..utils import safe_torch_load

__all__ = ["load_state_dict_file", "apply_state_dict"]

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | os.PathLike, trust: bool = False, key: str | None = None,
                         ) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, safely.

    Torch files load with ``weights_only=True``; one that needs arbitrary unpickling is refused
    unless ``trust``. Nested ``state_dict``/``model`` keys and ``module.``/``_orig_mod.`` prefixes
    are unwrapped. Checkpoints of timm's ``train.py`` (``state_dict``, ``state_dict_ema``,
    ``optimizer``, ``args`` as an ``argparse.Namespace``) load the same way; ``key`` picks one
    nested state dict by name (``state_dict_ema`` for the EMA weights).

    Example:
        >>> import tempfile, pathlib, argparse
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "checkpoint-9.pth.tar"
        >>> torch.save({"epoch": 9, "args": argparse.Namespace(lr=0.1), "state_dict": {"module.w": torch.ones(1)},
        ...             "state_dict_ema": {"w": torch.zeros(1)}}, p)
        >>> load_state_dict_file(p), load_state_dict_file(p, key="state_dict_ema")
        ({'w': tensor([1.])}, {'w': tensor([0.])})
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"checkpoint {path} is not a valid safetensors file ({err}); re-create it") from err
    else:
        obj = safe_torch_load(path, trust=trust, safe_types=(argparse.Namespace,))
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
            raise UserError(f"checkpoint {path} has no {key!r} (checkpoint_key); it holds {keys}")
        obj = obj[key]
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if nested is None:
            break
        obj = obj[nested]
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"checkpoint {path} holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        out[name] = value
    return out


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the missing, unexpected and misshapen keys."""
    own = model.state_dict()
    if not set(state) & set(own) and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # saved from a PixelSpaceModel
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def show(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

        parts = []
        wrong_keys = [k for k in own if k in state and state[k].shape != own[k].shape]
        heads = {(int(state[k].shape[0]), int(own[k].shape[0])) for k in wrong_keys
                 if state[k].dim() >= 1 and state[k].shape[1:] == own[k].shape[1:]}
        if wrong_keys and len(wrong_keys) <= 2 and not missing and not unexpected and len(heads) == 1 \
                and len(heads) == len({k.rsplit(".", 1)[0] for k in wrong_keys}):
            n_ckpt, n_model = heads.pop()  # only the classifier differs: a class-count mismatch
            raise UserError(f"{what} was trained for {n_ckpt} classes but the data has {n_model} "
                            f"({', '.join(wrong_keys)}); use the dataset it was trained on, or a checkpoint "
                            f"for {n_model} classes")
        if wrong:
            parts.append(f"shape mismatch: {show(wrong)}")
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise UserError(f"{what} does not fit the model ({'; '.join(parts)}); check arch, kwargs and num_classes")
    model.load_state_dict(state, strict=False)

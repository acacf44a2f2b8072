"""Devices, seeds and model modes: where a model runs and which random numbers it sees.

Example:
    >>> import torch
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> with seeded(0, torch.device("cpu")):
    ...     a = torch.rand(1)
    >>> with seeded(0, torch.device("cpu")):
    ...     b = torch.rand(1)
    >>> bool(a == b)
    True
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UserError

__all__ = ["resolve_device", "seed_everything", "seeded", "rng_state", "set_rng_state", "model_device", "eval_mode",
           "peak_memory", "available_memory"]


# --------------------------------------------------------------------------------------------
# devices and seeds
# --------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:i]|mps`` into a :class:`torch.device`.

    ``auto`` picks cuda, then mps, then cpu. An unavailable device is a :class:`UserError`.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available; use `device` cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available; use `device` cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices).

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool((a == torch.rand(1)).all())
        True
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state needed to resume a run bit-for-bit (plain types and tensors only)."""
    state: dict[str, Any] = {
        "python": _python_rng_to_tensor(random.getstate()),
        "numpy": _numpy_rng_to_tensor(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_python_rng_from_tensor(state["python"]))
    np.random.set_state(_numpy_rng_from_tensor(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Python and NumPy RNG states are tuples of ints: store them as int64 tensors so that the resume
# checkpoint loads with ``weights_only=True``.
def _python_rng_to_tensor(st: tuple) -> dict[str, Any]:
    version, internal, gauss = st
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": None if gauss is None else float(gauss)}


def _python_rng_from_tensor(d: Mapping[str, Any]) -> tuple:
    return (int(d["version"]), tuple(int(v) for v in d["internal"].tolist()), d["gauss"])


def _numpy_rng_to_tensor(st: tuple) -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = st
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_rng_from_tensor(d: Mapping[str, Any]) -> tuple:
    keys = d["keys"].numpy().astype(np.uint32)
    return ("MT19937", keys, int(d["pos"]), int(d["has_gauss"]), float(d["cached"]))


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block with torch seeded by ``seed``, leaving the caller's RNG streams (CPU and
    ``device``'s CUDA stream) as they were: the one forked-RNG rule of the toolkit."""
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def model_device(model: nn.Module, fallback: torch.device | str = "cpu") -> torch.device:
    """The device of ``model``'s first parameter (or buffer); ``fallback`` for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(fallback)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards (a model
    already in eval mode is left alone: no walk over its submodules)."""
    was_training = model.training
    if not was_training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: ``{"peak_memory_mb", "peak_memory_kind"}``.

    On CUDA the most memory tensors held on ``device`` since the last reset (the trainer resets
    it when training starts, so it covers training and the final evaluation); elsewhere the
    process's peak resident set size (data and everything else included; Linux and macOS).

    Example:
        >>> peak_memory(torch.device("cpu"))["peak_memory_kind"]
        'process peak RSS'
    """
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda max allocated"}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):  # Windows
        mb = float("nan")
    return {"peak_memory_mb": round(mb, 1), "peak_memory_kind": "process peak RSS"}


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; ``None`` elsewhere).

    Example:
        >>> m = available_memory()
        >>> m is None or m > 0
        True
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

"""Shared plumbing: devices, seeds, ε parsing, atomic writes, safe loading, run directories.

Everything here is small and dependency-free beyond torch, so both halves of the toolkit
(``transfer_analysis`` and ``distill``) build on it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .console import Interrupted, handle_signals, is_rank_zero, progress, setup_logging  # noqa: F401 - re-exported
from .errors import UserError
from .files import (  # noqa: F401 - re-exported
    _json_default,
    _output_error,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_yaml,
)

__all__ = [
    "resolve_device",
    "seed_everything",
    "rng_state",
    "set_rng_state",
    "parse_eps",
    "format_eps",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_save_safetensors",
    "safe_torch_load",
    "read_yaml",
    "prepare_out_dir",
    "write_run_config",
    "write_env_json",
    "environment_info",
    "progress",
    "is_rank_zero",
    "setup_logging",
    "Interrupted",
    "handle_signals",
]

logger = logging.getLogger(__name__)


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
            raise UserError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available; use --device cpu or auto")
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


# --------------------------------------------------------------------------------------------
# ε
# --------------------------------------------------------------------------------------------
_EPS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+))?\s*$")


def parse_eps(value: str | float | int, name: str = "eps") -> float:
    """Parse an ε or step size given as a number or a fraction (``8/255``, ``0.1``).

    Raises :class:`UserError` for anything that is not a finite non-negative number.

    Example:
        >>> parse_eps("8/255") == 8 / 255
        True
        >>> parse_eps(0.1)
        0.1
    """
    if isinstance(value, bool):
        raise UserError(f"--{name} must be a number or a fraction such as 8/255, got {value!r}")
    if isinstance(value, (int, float)):
        out = float(value)
    elif str(value).strip().startswith("-") and _EPS_RE.match(str(value).strip()[1:]):
        raise UserError(f"--{name} must be >= 0 (an L-inf radius or step size), got {value!r}")
    else:
        m = _EPS_RE.match(str(value))
        if not m:
            raise UserError(f"--{name} must be a number or a fraction such as 8/255, got {value!r}")
        num = float(m.group(1))
        den = float(m.group(2)) if m.group(2) is not None else 1.0
        if den == 0:
            raise UserError(f"--{name} divides by zero: {value!r}")
        out = num / den
    if math.isfinite(out) and out < 0:
        raise UserError(f"--{name} must be >= 0, got {value!r}")
    if not math.isfinite(out):
        raise UserError(f"--{name} must be a finite number >= 0, got {value!r}")
    return out


def format_eps(eps: float) -> str:
    """Both readings of ε: ``0.0314 (8/255)`` when it is a multiple of 1/255.

    Example:
        >>> format_eps(8 / 255)
        '0.031373 (8/255)'
    """
    frac = Fraction(eps).limit_denominator(255)
    if frac.denominator == 255 and abs(float(frac) - eps) < 1e-12:
        return f"{eps:.6f} ({frac.numerator}/255)"
    return f"{eps:g}"


# --------------------------------------------------------------------------------------------
# atomic writes and safe loading
# --------------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically. Save only tensors and plain types so it loads with weights_only."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getbuffer())


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Save a state dict as safetensors atomically (tensors are made contiguous and moved to CPU)."""
    from safetensors.torch import save

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob = save(data, metadata=dict(metadata) if metadata else None)
    with atomic_write(path, "wb") as fh:
        fh.write(blob)


def safe_torch_load(path: str | os.PathLike, trust: bool = False, what: str = "checkpoint",
                    trust_hint: str | None = "trust_checkpoint: true in the pool entry, or --trust-checkpoint"
                    ) -> Any:
    """Load a torch file with ``weights_only=True``; unpickling arbitrary objects needs ``trust``.

    A file that is not a torch file at all (or is truncated) is a :class:`UserError` saying so; a
    torch file that can only be read by running pickled code is refused unless ``trust`` is true
    (the user's explicit opt-in for that one file; ``trust_hint`` says how to give it, ``None``
    where the caller offers no opt-in).
    """
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(2)
    # torch.save writes a zip archive; files from torch < 1.6 are a bare pickle (protocol 2: 0x80 0x02)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise UserError(f"{what} {path} is truncated or not a torch file (no zip archive inside); re-create it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        text = str(err)
        if "weights_only" not in text and "Unsupported" not in text and "global" not in text.lower():
            raise UserError(f"{what} {path} is truncated or not a torch file ({type(err).__name__}: "
                            f"{text.splitlines()[0] if text else ''}); re-create it") from err
        if not trust:
            opt_in = f", or opt in for this file ({trust_hint})" if trust_hint else ""
            raise UserError(f"{what} {path} holds pickled objects that only arbitrary unpickling can read "
                            f"(weights_only=True failed), which can run code; re-save it as safetensors or a "
                            f"plain state_dict{opt_in}") from err
    logger.warning("loading %s with weights_only=False (trusted by the user)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, ModuleNotFoundError, AttributeError) as err:
        raise UserError(f"{what} {path} cannot be unpickled even when trusted ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from err


# --------------------------------------------------------------------------------------------
# run directories
# --------------------------------------------------------------------------------------------
def prepare_out_dir(out: str | os.PathLike, resume: bool = False, force: bool = False,
                    marker: str = "config.yaml") -> Path:
    """Create an output directory, refusing to clobber an earlier run.

    A directory that already holds ``marker`` is a run: it is refused unless ``resume`` (continue
    it) or ``force`` (wipe it and start again).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and (out / marker).exists():
        if force:
            shutil.rmtree(out)
        elif not resume:
            raise UserError(f"{out} already holds a run; pass --resume to continue it or --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _yaml_ready(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _yaml_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_yaml_ready(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    return obj


def write_run_config(run_dir: str | os.PathLike, config: Mapping[str, Any], name: str = "config.yaml") -> Path:
    """Write the resolved configuration of a run as YAML (atomically)."""
    import yaml

    path = Path(run_dir) / name
    atomic_write_text(path, yaml.safe_dump(_yaml_ready(config), sort_keys=False))
    return path


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device and git revision, for ``env.json``."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in ("torch", "torchvision", "timm", "torchattacks", "numpy", "pandas", "networkx"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": str(device) if device is not None else None,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "git_revision": _git_revision(),
        "argv": sys.argv,
    }
    if torch.cuda.is_available():
        info["cuda_device_name"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
    return info


def write_env_json(run_dir: str | os.PathLike, device: torch.device | str | None = None) -> Path:
    """Write ``env.json`` (versions, device, git revision) into a run directory."""
    path = Path(run_dir) / "env.json"
    atomic_write_json(path, environment_info(device))
    return path



"""ε parsing and tensor files (atomic ``torch.save`` / safetensors, the safe ``torch.load``), and
the one import point of the shared plumbing: devices and seeds (:mod:`transfer_analysis.runtime`),
atomic text/JSON/YAML files (:mod:`transfer_analysis.files`), run directories
(:mod:`transfer_analysis.rundir`) and the console (:mod:`transfer_analysis.console`) are
re-exported here, so ``from transfer_analysis.utils import ...`` keeps working.

Example:
    >>> parse_eps("8/255") == 8 / 255, format_eps(8 / 255)
    (True, '0.031373 (8/255)')
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .console import Interrupted, handle_signals, is_rank_zero, progress, setup_logging  # noqa: F401 - re-exported
from .errors import UserError
from .rundir import environment_info, prepare_out_dir, write_env_json, write_run_config  # noqa: F401 - re-exported
from .runtime import (  # noqa: F401 - re-exported
    eval_mode,
    model_device,
    resolve_device,
    rng_state,
    seed_everything,
    seeded,
    set_rng_state,
)
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
        >>> parse_eps("8")
        Traceback (most recent call last):
        ...
        transfer_analysis.errors.UserError: --eps '8' is larger than the [0, 1] pixel range; did you mean 8/255?
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
    if out > 1 and name.split(":")[-1].strip().split(".")[-1] in ("eps", "step-size", "step_size", "alpha"):
        # images are in [0, 1]: a radius above 1 allows any image; 8 means 8/255
        raise UserError(f"--{name} {value!r} is larger than the [0, 1] pixel range; did you mean {value}/255?")
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
                    trust_hint: str | None = "trust_checkpoint: true in the pool entry, or `trust_checkpoint`",
                    safe_types: tuple[type, ...] = ()) -> Any:
    """Load a torch file with ``weights_only=True``; unpickling arbitrary objects needs ``trust``.

    A file that is not a torch file at all (or is truncated) is a :class:`UserError` saying so; a
    torch file that can only be read by running pickled code is refused unless ``trust`` is true
    (the user's explicit opt-in for that one file; ``trust_hint`` says how to give it, ``None``
    where the caller offers no opt-in). ``safe_types`` are classes allowed in a weights-only load
    because building them runs no code of the file's choosing (``argparse.Namespace`` in timm's
    ``train.py`` checkpoints).
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
        with torch.serialization.safe_globals(list(safe_types)):
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

"""Shared plumbing: devices, seeds, ε parsing, atomic writes, safe loading, run directories.

Everything here is small and dependency-free beyond torch, so both halves of the toolkit
(``transfer_analysis`` and ``distill``) build on it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

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
    "sha256_file",
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
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_write(p, "w") as f:
        ...     _ = f.write("hello")
        >>> p.read_text()
        'hello'
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _output_error(path, err) from err
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are as readable as any other file
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
            raise _output_error(path, err) from err
        raise


#: OS errors that say something about where the user asked to write, not about the code
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                       errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST}


def _output_error(path: Path, err: OSError) -> Exception:
    """A one-line :class:`UserError` naming the output ``path`` for an OS error on it; others unchanged."""
    if err.errno not in _ENVIRONMENT_ERRNOS:
        return err
    return UserError(f"cannot write {path}: {err.strerror or err}; the files written before it are kept")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() != 1 else obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically; numbers stay numbers (NumPy and tensor scalars are converted)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


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


def read_yaml(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a YAML file with the safe loader; a missing or malformed file is a one-line :class:`UserError`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.yaml"
        >>> _ = p.write_text("k: [1, 2]")
        >>> read_yaml(p)
        {'k': [1, 2]}
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not a UTF-8 text file (byte {err.start}: {err.reason}); a {what} is YAML "
                        "text") from err
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{at}: {getattr(err, 'problem', err)}") from err


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


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


# --------------------------------------------------------------------------------------------
# progress and logging
# --------------------------------------------------------------------------------------------
def is_rank_zero() -> bool:
    """True unless this is a non-zero rank of a ``torch.distributed`` job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm bar that is silent when stderr is not a terminal or on non-zero ranks."""
    from tqdm.auto import tqdm

    disable = kwargs.pop("disable", None)
    if disable is None:
        disable = not (sys.stderr.isatty() and is_rank_zero())
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=kwargs.pop("leave", False), **kwargs)


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger for the command line (library code only calls ``getLogger``)."""
    level = level if isinstance(level, int) else getattr(logging, str(level).upper(), logging.INFO)
    if not is_rank_zero():  # under torchrun, the other ranks only report problems
        level = max(level, logging.WARNING)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


# --------------------------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: unwind (``finally`` blocks run, atomic writes are dropped).

    A subclass of :class:`KeyboardInterrupt`, so ``except Exception`` never swallows it. The
    ``darht`` command reports it in one line and exits with ``128 + signum`` (130, 143).
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + the signal number."""
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        """``SIGTERM`` or ``SIGINT``."""
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def handle_signals(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` inside the block; restore the old handlers after.

    Work already checkpointed (the last epoch, finished cache entries) stays on disk; a half-written
    file never replaces a good one, because every write goes through :func:`atomic_write`. Outside
    the main thread (where handlers cannot be installed) this does nothing.

    Example:
        >>> import os, signal
        >>> try:
        ...     with handle_signals():
        ...         os.kill(os.getpid(), signal.SIGTERM)
        ... except Interrupted as err:
        ...     err.exit_code
        143
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signal API's signature
        raise Interrupted(signum)

    previous = {}
    for sig in signals:
        previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""Atomic file writes and safe YAML reading (no torch: the command line uses them before any model).

Every output of the toolkit goes through :func:`atomic_write`: a crash leaves the old file or the
new one, never half of one; an OS error on the path (disk full, read-only) is a one-line
:class:`~transfer_analysis.errors.UserError` naming it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "read_yaml", "to_plain"]


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


def to_plain(obj: Any, *, nan_to_none: bool = False) -> Any:
    """``obj`` as plain data for YAML or strict JSON: mappings (string keys), lists, and Python
    numbers for NumPy scalars and tensors; paths and devices as strings; NaN as ``None`` when
    ``nan_to_none`` (strict JSON). The one converter of the toolkit's outputs.

    Example:
        >>> to_plain({"a": (np.int64(1), Path("x")), 2: np.float32(0.5)})
        {'a': [1, 'x'], '2': 0.5}
        >>> to_plain([float("nan")], nan_to_none=True)
        [None]
    """
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, nan_to_none=nan_to_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, nan_to_none=nan_to_none) for v in obj]
    if isinstance(obj, np.ndarray) or (type(obj).__module__.startswith("torch") and hasattr(obj, "tolist")):
        return to_plain(obj.tolist(), nan_to_none=nan_to_none)  # an array or a tensor (torch not imported here)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if nan_to_none and math.isnan(float(obj)) else float(obj)
    if isinstance(obj, Path) or type(obj).__module__ == "torch" and type(obj).__name__ == "device":
        return str(obj)
    return obj


def _json_default(obj: Any) -> Any:
    plain = to_plain(obj)
    if plain is obj:
        raise TypeError(f"not JSON serializable: {type(obj).__name__}")
    return plain


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically; numbers stay numbers (NumPy and tensor scalars are converted)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


#: most aliases a YAML file may use (a few are normal; thousands are an expansion bomb)
MAX_YAML_ALIASES = 100


def _strict_loader() -> type:
    """yaml's safe loader, refusing a mapping that repeats a key (YAML keeps the last value silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {str(key)[:40]!r} (first at line {seen[key] + 1}); YAML would "
                            "keep the last value silently", key_node.start_mark)
                    seen[key] = key_node.start_mark.line
                except TypeError:  # an unhashable key: the constructor's own error follows
                    pass
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML text strictly: the safe loader, no repeated key, at most :data:`MAX_YAML_ALIASES` aliases.

    Example:
        >>> load_yaml_text("a: 1\\nb: 2\\n", "cfg")
        {'a': 1, 'b': 2}
        >>> load_yaml_text("a: 1\\na: 2\\n", "cfg")
        Traceback (most recent call last):
        ...
        transfer_analysis.errors.UserError: cfg is not valid YAML at line 2: duplicate key 'a' (first at line 1); YAML would keep the last value silently
    """
    import yaml

    loader = _strict_loader()
    try:
        aliases = sum(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=loader))
        if aliases > MAX_YAML_ALIASES:
            raise UserError(f"{where} uses {aliases} YAML aliases (*name), more than the {MAX_YAML_ALIASES} allowed")
        reader = loader(text)  # a SafeLoader subclass, used as yaml.safe_load uses its loader
        try:
            return reader.get_single_data()
        finally:
            reader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(err, "problem", None) or err).splitlines()[0][:160]
        raise UserError(f"{where} is not valid YAML{at}: {problem}") from err


def read_yaml(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a YAML file strictly (:func:`load_yaml_text`); a missing or malformed file is a one-line
    :class:`UserError`.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.yaml"
        >>> _ = p.write_text("k: [1, 2]")
        >>> read_yaml(p)
        {'k': [1, 2]}
    """

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
    return load_yaml_text(text, str(path))

"""Claiming output paths before any work: every command checks where it will write first.

A run that can only fail at its end (a read-only disk, ``--out`` under a file, a side file that would
be overwritten) wastes the whole run; these checks make it a one-line refusal at the start.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("x")
    >>> check_output_path(d / "new" / "out.json")
    >>> try:
    ...     check_output_path(d / "a.txt" / "out.json")
    ... except UserError as err:
    ...     "is a file, not a directory" in str(err)
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError

__all__ = ["check_output_path", "claim_output_files"]


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(os.sep)


def check_output_path(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse a path that cannot be written: under an existing file, or in a read-only or
    unwritable directory. Nothing is created."""
    path = Path(path)
    anc = _nearest_existing(path)
    if anc != path and not anc.is_dir():
        raise UserError(f"{flag} {path}: {anc} is a file, not a directory; choose another path")
    folder = anc if anc.is_dir() else anc.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        try:
            readonly = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            readonly = False
        why = "a read-only file system" if readonly else "no write permission"
        raise UserError(f"{flag} {path}: cannot write under {folder} ({why}); choose another path")


def claim_output_files(paths: Iterable[str | os.PathLike], *, force: bool = False, flag: str = "--out") -> None:
    """Check every file a command will write (``--out`` and its side files) before any work: each is
    writable (:func:`check_output_path`), none is a directory, and none exists unless ``force``.

    The message names the first file that already exists, so side files (``rec.png`` beside
    ``rec.json``, ``m.indices.json`` beside ``m.json``) are never overwritten without ``--force``.
    """
    for p in map(Path, paths):
        check_output_path(p, flag)
        if p.is_dir():
            raise UserError(f"{flag}: {p} is a directory; give a file name")
        if p.exists() and not force:
            raise UserError(f"{p} already exists (written by an earlier run); pass --force to replace it or choose "
                            f"another {flag}")

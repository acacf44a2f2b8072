"""Run directories: claiming output paths before any work, then the directory, ``config.yaml`` and
``env.json`` of a run.

Every command checks where it will write first.

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
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import atomic_write_json, atomic_write_text, to_plain

__all__ = ["check_output_path", "claim_output_files"]


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(os.sep)


def check_output_path(path: str | os.PathLike, flag: str = "`out`") -> None:
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


def claim_output_files(paths: Iterable[str | os.PathLike], *, force: bool = False, flag: str = "`out`") -> None:
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
            raise UserError(f"{p} already exists (written by an earlier run); pass `force` to replace it or choose "
                            f"another {flag}")


def check_run_dir(out: str | os.PathLike, *, resume: bool, force: bool, what: str = "run") -> None:
    """What ``out`` may be for a run (training, a study): new (neither flag), an unfinished run
    (``resume``), or anything to replace (``force``); checked before any work, nothing is written.
    The one rule of every command that writes a run directory."""
    out = Path(out)
    check_output_path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"`out` {out} exists and is not a directory; choose another path")
    if resume and force:
        raise UserError("`resume` continues a run and `force` replaces it; give one of them")
    is_run = (out / "config.yaml").is_file()
    if is_run and not (resume or force):
        raise UserError(f"{out} already holds a {what}; pass `resume` to continue it or `force` to replace it")
    if resume and not is_run:
        raise UserError(f"nothing to resume in {out}: it holds no {what} (no config.yaml); drop `resume` to start one")


def prepare_out_dir(out: str | os.PathLike, resume: bool = False, force: bool = False,
                    marker: str = "config.yaml", lock: bool = True) -> Path:
    """Create an output directory, refusing to clobber an earlier run.

    A directory that already holds ``marker`` is a run: it is refused unless ``resume`` (continue
    it) or ``force`` (wipe it and start again). A directory another live process is writing
    (its lock file ``.darht.lock`` names it) is refused whatever ``resume`` and ``force`` say; a
    lock left by a process that is gone is taken over. The lock is held until the command ends
    (:func:`release_run_dirs`, or the process's exit). ``lock=False`` is for writers that share a
    directory by design (the array tasks of one sharded matrix).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"`out` {out} exists and is not a directory; choose another path")
    if lock:
        _check_lock(out)
    if out.is_dir() and (out / marker).exists():
        if force:
            shutil.rmtree(out)
        elif not resume:
            raise UserError(f"{out} already holds a run; pass `resume` to continue it or `force` to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if lock:
        _take_lock(out)
    return out


LOCK_NAME = ".darht.lock"
_HELD: list[Path] = []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _check_lock(out: Path) -> None:
    import json

    lock = out / LOCK_NAME
    try:
        held = json.loads(lock.read_text())
        pid = int(held["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no lock (or an unreadable one: taken over)
    if pid != os.getpid() and held.get("host") == platform.node() and _pid_alive(pid):
        raise UserError(f"{out} is being written by another run (process {pid}, started {held.get('started')}); "
                        "wait for it to finish or stop it, then resume")


def _take_lock(out: Path) -> None:
    import atexit
    import time

    lock = out / LOCK_NAME
    atomic_write_json(lock, {"pid": os.getpid(), "host": platform.node(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    if not _HELD:
        atexit.register(release_run_dirs)
    if lock not in _HELD:
        _HELD.append(lock)


def release_run_dirs() -> None:
    """Remove the locks this process holds (the end of a command)."""
    import json

    while _HELD:
        lock = _HELD.pop()
        try:
            if int(json.loads(lock.read_text())["pid"]) == os.getpid():
                lock.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            pass


def write_run_config(run_dir: str | os.PathLike, config: Mapping[str, Any], name: str = "config.yaml") -> Path:
    """Write the resolved configuration of a run as YAML (atomically)."""
    import yaml

    path = Path(run_dir) / name
    atomic_write_text(path, yaml.safe_dump(to_plain(config), sort_keys=False))
    return path


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


_WARNED: list[bool] = []


def environment_info(device: Any = None) -> dict[str, Any]:
    """Versions, device, git revision and the thread policy, for ``env.json`` (the first call of a
    process also warns when the machine is busier than the process's CPUs)."""
    import importlib.metadata as md

    import torch

    from .threads import thread_policy, warn_if_oversubscribed

    if not _WARNED:
        _WARNED.append(warn_if_oversubscribed())

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
        "threads": thread_policy(),
        "git_revision": _git_revision(),
        "argv": sys.argv,
    }
    if torch.cuda.is_available():
        info["cuda_device_name"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
    return info


def update_env_json(run_dir: str | os.PathLike, **fields: Any) -> Path:
    """Add ``fields`` to a run's ``env.json`` (written earlier by :func:`write_env_json`)."""
    import json

    path = Path(run_dir) / "env.json"
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        env = {}
    atomic_write_json(path, {**env, **fields})
    return path


def write_env_json(run_dir: str | os.PathLike, device: Any = None) -> Path:
    """Write ``env.json`` (versions, device, git revision) into a run directory."""
    path = Path(run_dir) / "env.json"
    atomic_write_json(path, environment_info(device))
    return path


def refuse_outputs_as_inputs(inputs: Iterable[tuple[str, str | os.PathLike | None]],
                             outputs: Iterable[tuple[str, str | os.PathLike | None, bool]]) -> None:
    """An output is never one of the inputs, whatever ``--force`` says.

    ``inputs`` are ``(flag, path)`` of every file a command reads; ``outputs`` are
    ``(flag, path, is_directory)`` of what it writes. Refused: an output that *is* an input file,
    and an input inside an output directory (a ``--force`` run replaces that directory). Writing a
    new file into an input's folder (``rec.json`` beside the matrix) is fine.

    Example:
        >>> refuse_outputs_as_inputs([("--matrix", "m/transfer_matrix.csv")], [("--out", "m/transfer_matrix.csv", False)])
        Traceback (most recent call last):
        ...
        transfer_analysis.errors.UserError: --out m/transfer_matrix.csv is also an input (--matrix); an output is never one of the inputs, even with --force: choose another path
    """
    ins = [(flag, Path(os.path.expanduser(str(p))).resolve()) for flag, p in inputs if p is not None]
    for oflag, opath, is_dir in outputs:
        if opath is None:
            continue
        o = Path(os.path.expanduser(str(opath))).resolve()
        for iflag, i in ins:
            if o == i or (is_dir and o in i.parents):
                what = "is also an input" if o == i else f"holds an input ({i})"
                raise UserError(f"{oflag} {opath} {what} ({iflag}); an output is never one of the inputs, even with "
                                "--force: choose another path")

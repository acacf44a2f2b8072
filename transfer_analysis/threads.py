"""The CPU thread policy, in one place (no torch import: the CLI sets it before torch loads).

Every ``darht`` subcommand takes ``--threads N``; without it ``DARHT_THREADS``, then
``OMP_NUM_THREADS``, then the number of CPUs this process may use: its affinity mask and, in a
container, the cgroup CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``), never the host's core count. The choice is set before the first torch
op (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for a torch not yet imported, ``torch.set_num_threads``
otherwise) and recorded in every ``env.json`` (``threads``).

Why it matters: OpenMP threads spin while they wait, so a process with more threads than the
CPUs it actually gets collapses: one ``darht distill --method pgd-at`` epoch measured 9.6 s idle
with 2 threads on 2 cores and 37.9 s (3.95x) beside one other CPU-bound process, against 18.0 s
with one thread. When the load average at the start exceeds the process's CPUs, one warning says so.

Example:
    >>> choose_threads(3, env={})
    (3, '--threads')
    >>> choose_threads(None, env={"DARHT_THREADS": "2"})
    (2, 'DARHT_THREADS')
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["available_cpus", "cgroup_cpu_limit", "choose_threads", "apply_threads", "thread_policy",
           "warn_if_oversubscribed", "OVERSUBSCRIPTION_COST"]

logger = logging.getLogger("transfer_analysis.threads")

#: measured slowdown of a 2-thread epoch beside one other CPU-bound process on 2 cores
OVERSUBSCRIPTION_COST = 3.95
_POLICY: dict[str, Any] = {}
#: where the default number comes from (no flag, no environment variable)
DEFAULT_SOURCE = "available CPUs (affinity and cgroup quota)"


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup CPU quota under ``root`` (v2 ``cpu.max`` or v1
    ``cpu/cpu.cfs_quota_us``), ``None`` when there is no quota.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "cpu.max").write_text("150000 100000\\n")
        >>> cgroup_cpu_limit(d)
        1.5
    """
    root = Path(root)
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or 100000)
        for v1 in (root / "cpu", root / "cpu,cpuacct", root):
            q, p = v1 / "cpu.cfs_quota_us", v1 / "cpu.cfs_period_us"
            if q.is_file() and p.is_file():
                quota, period = int(q.read_text()), int(p.read_text())
                return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def available_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _positive(text: str, where: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{where} must be a positive integer (threads), got {text!r}")
    return n


def choose_threads(flag: int | None, env: Mapping[str, str] | None = None,
                   cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> tuple[int, str]:
    """``(threads, where the number came from)``: the flag, ``DARHT_THREADS``, ``OMP_NUM_THREADS``,
    else :func:`available_cpus`."""
    env = os.environ if env is None else env
    if flag is not None:
        return _positive(str(flag), "--threads"), "--threads"
    for key in ("DARHT_THREADS", "OMP_NUM_THREADS"):
        if env.get(key, "").strip():
            return _positive(env[key].strip(), key), key
    return available_cpus(cgroup_root), DEFAULT_SOURCE


def apply_threads(n: int, source: str) -> dict[str, Any]:
    """Use ``n`` threads from now on; returns what to restore with :func:`restore_threads`.

    Called by the command line before torch loads. When torch is already loaded (a program calling
    ``distill.cli.main`` itself) and nothing asked for a number (``source`` is the default), its
    current thread count is kept."""
    saved = {"env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}, "torch": None}
    if "torch" in sys.modules:
        import torch

        if source == DEFAULT_SOURCE:  # a program that loaded torch itself chose its threads: keep them
            n = torch.get_num_threads()
        saved["torch"] = torch.get_num_threads()
        torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)  # torch not loaded yet, and children
    _POLICY.clear()
    _POLICY.update({"threads": n, "source": source, "available_cpus": available_cpus()})
    return saved


def restore_threads(saved: Mapping[str, Any]) -> None:
    """Undo :func:`apply_threads` (for callers that run several commands in one process)."""
    for key, value in saved["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if saved.get("torch") is not None:
        import torch

        torch.set_num_threads(int(saved["torch"]))


def thread_policy() -> dict[str, Any]:
    """What was chosen (for ``env.json``), with torch's intra- and inter-op threads when loaded."""
    out = dict(_POLICY)
    if "torch" in sys.modules:
        import torch

        out["torch_intra_op"] = torch.get_num_threads()
        out["torch_inter_op"] = torch.get_num_interop_threads()
    return out


def warn_if_oversubscribed(threads: int | None = None) -> bool:
    """One warning when the machine is busier than this process's CPUs (load average above them)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return False
    cpus = available_cpus()
    threads = threads or _POLICY.get("threads") or cpus
    if load <= cpus or threads <= 1:
        return False
    logger.warning("the machine is busier than the %d CPU(s) this process may use (load average %.1f): with %d "
                   "threads a run can be several times slower (measured %.2fx on 2 cores beside one other job); "
                   "--threads 1 (or DARHT_THREADS=1) avoids it", cpus, load, threads, OVERSUBSCRIPTION_COST)
    return True

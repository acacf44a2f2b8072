"""Small helpers for runs under ``torchrun`` (docs/design.md, Scale), used by the trainer and the matrix.

``torchrun --nproc_per_node N --no-python darht ...`` sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` and the rendezvous variables; :func:`process_group` then initializes the default
process group (nccl on CUDA, gloo on CPU) and destroys it on exit. Without those variables (or
with ``WORLD_SIZE=1``) every helper is a no-op for a single process: ``world_size() == 1``,
``rank() == 0``, reductions return their input.

Example:
    >>> world_size(), rank(), shard(list(range(5)), rank=1, world=2)
    (1, 0, [1, 3, 0])
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "env_world_size",
    "is_distributed",
    "init_from_env",
    "process_group",
    "world_size",
    "rank",
    "local_rank",
    "rank_device",
    "barrier",
    "all_reduce_sum",
    "all_gather_object",
    "broadcast_buffers",
    "shard",
    "cleanup",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_distributed() -> bool:
    """True when a process group of more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the job (1 outside ``torchrun``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 outside ``torchrun``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its host (``LOCAL_RANK``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Initialize the default process group when the ``torchrun`` variables ask for more than one process.

    nccl on CUDA (and the CUDA device becomes ``cuda:LOCAL_RANK``), gloo otherwise. Returns True
    when this call initialized the group, False when there is nothing to do (a single process,
    or a group already initialized).
    """
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    logger.debug("process group: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), backend)
    return True


def cleanup() -> None:
    """Destroy the default process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Context: :func:`init_from_env` on entry, :func:`cleanup` on exit if it initialized the group.

    Yields whether the run is distributed (more than one process).
    """
    created = init_from_env(device)
    try:
        yield is_distributed()
    finally:
        if created:
            cleanup()


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA under ``torchrun``, else ``device``."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over the ranks (a new tensor on ``values``' device; the input for one process)."""
    if not is_distributed():
        return values
    buf = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(values.device)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` for one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (batch-norm statistics) to every rank, as DDP does before each forward."""
    if not is_distributed():
        return
    for buf in module.buffers():
        if buf.numel() == 0:
            continue
        tmp = buf.detach().to(_comm_device(), copy=True)
        dist.broadcast(tmp, src=src)
        buf.copy_(tmp.to(buf.device))


def shard(indices: Sequence[T] | torch.Tensor, rank: int | None = None, world: int | None = None) -> Any:
    """This rank's part of ``indices``, the way ``DistributedSampler`` does it.

    The list is padded by wrapping around to a multiple of ``world`` and rank ``r`` takes
    positions ``r, r + world, ...``; every rank must pass the same (same-seed shuffled) order.

    Example:
        >>> shard(list(range(6)), rank=0, world=2), shard(list(range(6)), rank=1, world=2)
        ([0, 2, 4], [1, 3, 5])
    """
    r = rank if rank is not None else globals()["rank"]()
    w = world if world is not None else world_size()
    n = len(indices)
    if w <= 1 or n == 0:
        return indices
    total = -(-n // w) * w
    if isinstance(indices, torch.Tensor):
        padded = torch.cat([indices, indices[:total - n]]) if total > n else indices
        return padded[r:total:w]
    items = list(indices)
    padded_list = (items * (total // n + 1))[:total]
    return padded_list[r:total:w]

"""The run directory of a training run: what ``out`` may be, the resume checkpoint, a finished run.

``checkpoint.pt`` holds the student, optimizer, scheduler, finished epochs, every RNG state
(the data-order generator included), the method's state and the summary rows; it is written
atomically after every epoch, tensors and plain types only (it loads with ``weights_only=True``).

Example:
    >>> CHECKPOINT_NAME, CHECKPOINT_FORMAT
    ('checkpoint.pt', 'darht-train-1')
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_analysis import distributed as dist_utils
from transfer_analysis.errors import UserError
from transfer_analysis.utils import rng_state, safe_torch_load, seed_everything, set_rng_state

from .config import _RUNTIME_KEYS, TrainConfig, TrainResult, read_config_file, resolve_config

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "FINAL_EVAL_STATE", "checkpoint_state", "restore_checkpoint"]

logger = logging.getLogger("distill.trainer")

CHECKPOINT_NAME = "checkpoint.pt"
#: the final evaluation's resumable state (distill.eval_state), deleted once metrics.json is written
FINAL_EVAL_STATE = "final_eval.state.pt"
CHECKPOINT_FORMAT = "darht-train-1"


def _rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed of rank ``rank``'s training noise streams (attack starts, dropout) in a data-parallel run."""
    return (seed * 1_000_003 + 7919 * (rank + 1) + 104_729 * epoch) % 2**63


def checkpoint_state(epoch: int, student: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     generator: torch.Generator, method: Any, history: list[dict[str, float]],
                     ema: nn.Module | None) -> dict[str, Any]:
    """The resume checkpoint after ``epoch`` finished epochs (under ``torchrun``: every rank's RNG states)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data_generator": generator.get_state(),
        "rng": rng_state(),
        "method": method.state_dict(),
        "history": history,
    }
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    if dist_utils.world_size() > 1:
        ckpt["world_size"] = dist_utils.world_size()
        ckpt["rng_ranks"] = dist_utils.all_gather_object(ckpt["rng"])
    return ckpt


def restore_checkpoint(path: Path, cfg: TrainConfig, student: nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, generator: torch.Generator, method: Any,
                       ema: nn.Module | None) -> tuple[int, list[dict[str, float]]]:
    """Load ``path`` into the training objects; returns ``(finished epochs, summary rows)``.

    The same number of processes continues bit-identically; another number continues the data
    order and schedule but re-seeds the per-rank random streams (a warning says so).
    """
    world, rank = dist_utils.world_size(), dist_utils.rank()
    ckpt = safe_torch_load(path, what="resume checkpoint", trust_hint=None)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a darht training checkpoint; use `force` to start over")
    student.load_state_dict(ckpt["student"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    generator.set_state(ckpt["data_generator"])
    method.load_state_dict(ckpt["method"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    saved_world = int(ckpt.get("world_size", 1))
    if world == 1 and saved_world == 1:
        set_rng_state(ckpt["rng"])
    elif saved_world == world:
        set_rng_state(ckpt["rng_ranks"][rank])
    else:
        if rank == 0:
            logger.warning("resuming a run of %d process(es) with %d: the data order and schedule continue, "
                           "the per-rank random streams are re-seeded (not bit-identical to an uninterrupted "
                           "run)", saved_world, world)
        seed_everything(_rank_seed(cfg.seed, rank, int(ckpt["epoch"])))
    return int(ckpt["epoch"]), [dict(row) for row in ckpt["history"]]


def _check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = resolve_config(read_config_file(saved_path)).to_dict()
    now = cfg.to_dict()
    for key in now:
        if key in _RUNTIME_KEYS:
            continue
        if saved.get(key) != now[key]:
            raise UserError(f"cannot resume {run_dir}: {key} was {saved.get(key)!r}, now {now[key]!r}; pass the same "
                            "options (or none: the run's config.yaml is the default), or `force` to start over")


def _finished_run(out: Path, cfg: TrainConfig) -> TrainResult:
    """A resume of a run that already finished: nothing is trained, evaluated or written again."""
    import json

    from distill.student import load_student

    logger.info("%s finished earlier: nothing to resume; its metrics.json and student are kept as they are", out)
    with open(out / "summary.csv", newline="") as fh:
        history = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
    return TrainResult(out, load_student(out / "student.safetensors"), history,
                       json.loads((out / "metrics.json").read_text()), True, cfg)

"""Experiment tracking: TensorBoard event files and Weights & Biases runs, each optional.

Both are imported only when asked for (``pip install -e ".[tensorboard]"`` / ``".[wandb]"``;
``WANDB_MODE=offline`` works with no network). Tag names follow the usual split of timm-style
training scripts: ``train/loss`` and every loss part (``train/ce``, ``train/kd``...),
``train/lr``, ``train/acc``, ``test/clean_acc``, ``test/pgd_acc``, ``time/epoch_s``, and after
the run ``final/<attack>_acc`` and ``final/worst_case_acc``. Only the process that writes the run
directory logs (rank 0 under ``torchrun``).

Example:
    >>> tracking_tags({"epoch": 1, "lr": 0.1, "loss": 2.0, "ce": 1.5, "train_acc": 0.3, "test_pgd_acc": 0.2})
    {'train/lr': 0.1, 'train/loss': 2.0, 'train/ce': 1.5, 'train/acc': 0.3, 'test/pgd_acc': 0.2}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transfer_analysis.errors import UserError

__all__ = ["Tracker", "tracking_tags", "check_tracking"]

logger = logging.getLogger(__name__)

_RENAMED = {"lr": "train/lr", "loss": "train/loss", "train_acc": "train/acc", "test_clean_acc": "test/clean_acc",
            "test_pgd_acc": "test/pgd_acc", "epoch_time_s": "time/epoch_s"}


def tracking_tags(row: Mapping[str, Any]) -> dict[str, float]:
    """Tag -> value for one ``summary.csv`` row (NaN values and the epoch itself are left out)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch" or not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            continue
        out[_RENAMED.get(key, f"train/{key}")] = float(value)
    return out


def check_tracking(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The tracking options of a pipeline (``tensorboard``, ``log_wandb``, ``wandb_project``), checked:
    what every training run of a study gets (they change no result, so they are not part of a run's
    recorded config).

    Example:
        >>> check_tracking({"tensorboard": True})
        {'tensorboard': True}
    """
    from transfer_analysis.checks import as_bool

    options = dict(options or {})
    unknown = sorted(set(options) - {"tensorboard", "log_wandb", "wandb_project"})
    if unknown:
        raise UserError(f"unknown tracking option {unknown[0]!r}; use tensorboard, log_wandb or wandb_project")
    for key in ("tensorboard", "log_wandb"):
        if key in options:
            as_bool(options[key], key)
    project = options.get("wandb_project")
    if project is not None and (not isinstance(project, str) or not project.strip()):
        raise UserError(f"wandb_project must be a project name, got {project!r}")
    return options


class Tracker:
    """TensorBoard and/or W&B for one training run; a no-op when neither is asked for.

    Args:
        run_dir: the run directory (TensorBoard writes ``run_dir/tensorboard/``; W&B keeps its files
            under ``run_dir/wandb/``).
        config: the run's resolved configuration (W&B's run config).
        tensorboard: write TensorBoard event files.
        wandb_project: log to this W&B project (``None``: no W&B).
        name: the run's name in W&B (default: the run directory's name).
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], *, tensorboard: bool = False,
                 wandb_project: str | None = None, name: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise UserError("`tensorboard` needs the tensorboard package: pip install -e \".[tensorboard]\"") \
                    from err
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if wandb_project is not None:
            try:
                import wandb
            except ImportError as err:
                raise UserError("`log_wandb` needs the wandb package: pip install -e \".[wandb]\" (WANDB_MODE=offline "
                                "logs without a network)") from err
            self._wandb = wandb.init(project=wandb_project, name=name or self.run_dir.name, dir=str(self.run_dir),
                                     config=dict(config), reinit=True)

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def log_epoch(self, epoch: int, row: Mapping[str, Any]) -> None:
        """Log one finished epoch (a ``summary.csv`` row) at step ``epoch``."""
        tags = tracking_tags(row)
        if self._tb is not None:
            for tag, value in tags.items():
                self._tb.add_scalar(tag, value, global_step=epoch)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({**tags, "epoch": epoch}, step=epoch)

    def log_final(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the final robust evaluation (``metrics.json``)."""
        tags = {f"final/{k}_acc": float(v) for k, v in metrics.get("accuracy", {}).items()}
        if metrics.get("worst_case") is not None:
            tags["final/worst_case_acc"] = float(metrics["worst_case"])
        if self._tb is not None:
            for tag, value in tags.items():
                self._tb.add_scalar(tag, value, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.summary.update(tags)
            self._wandb.log(tags, step=step)

    def close(self) -> None:
        """Flush and close (safe to call twice)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

"""The training configuration: :class:`TrainConfig`, its validation (:func:`resolve_config`) and
the LR schedule (:func:`lr_factor`).

Example:
    >>> LR_SCHEDULES
    ('step', 'cosine', 'cyclic', 'constant')
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.methods import get_method_class
from distill.student import Student
from distill.tracking import check_tracking
from transfer_analysis.checks import as_bool, as_int, as_number, ema_decay
from transfer_analysis.errors import UserError
from transfer_analysis.utils import parse_eps, read_yaml

__all__ = ["TrainConfig", "TrainResult", "NumericalFault", "LR_SCHEDULES", "DEFAULT_FINAL_ATTACKS", "resolve_config",
           "read_config_file", "lr_factor"]

logger = logging.getLogger("distill.trainer")

LR_SCHEDULES: tuple[str, ...] = ("step", "cosine", "cyclic", "constant")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
DEFAULT_FINAL_ATTACKS: tuple[str, ...] = ("clean", "fgsm", "pgd20", "cw", "autoattack")

# Used when neither the user nor the method's reference protocol sets them.
_FALLBACKS: dict[str, Any] = {"epochs": 200, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4,
                              "lr_schedule": "step", "milestones": [0.5, 0.75]}
# Keys that may differ when a run is resumed (they do not change the training trajectory).
_RUNTIME_KEYS = {"device", "compile", "data_root", "download", "final_attacks", "final_eval_samples",
                 "final_attack_samples", "final_check_eps_sweep", "eval_batch_size", "tensorboard", "log_wandb",
                 "wandb_project"}


class NumericalFault(UserError):
    """A non-finite loss during training (names the epoch and batch; the last good checkpoint is kept)."""


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that defines a training run (the fields of ``config.yaml`` and ``--config RUN.yaml``).

    ``None`` means "the method's reference protocol, else the fallback" for ``epochs``,
    ``batch_size``, ``lr``, ``weight_decay``, ``lr_schedule`` and ``milestones``;
    :func:`resolve_config` fills them in.
    """

    method: str
    student: str
    dataset: str
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    download: bool = True
    pool: str | None = None
    teachers: list[str] = field(default_factory=list)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    nesterov: bool = False
    lr_schedule: str | None = None
    milestones: list[float] | None = None
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    eps: float | str = 8 / 255
    augment: bool = True
    normalize: bool = True
    eval_samples: int = 500
    eval_pgd_steps: int = 10
    eval_batch_size: int | None = None
    final_attacks: list[str] = field(default_factory=lambda: list(DEFAULT_FINAL_ATTACKS))
    final_eval_samples: int | None = None
    final_attack_samples: dict[str, int] = field(default_factory=dict)
    final_check_eps_sweep: bool = True
    eval_seed: int | None = None
    ema: float | None = None
    tensorboard: bool = False
    log_wandb: bool = False
    wandb_project: str | None = None
    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-ready)."""
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    student: Student
    history: list[dict[str, float]]
    metrics: dict[str, Any] | None
    completed: bool
    config: TrainConfig


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _normalize_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).strip().replace("-", "_")
        if name not in _FIELDS:
            close = difflib.get_close_matches(name, list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{source}: unknown option {key!r}{hint}; options: {', '.join(_FIELDS)}")
        out[name] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run configuration YAML (``--config RUN.yaml`` or a run's ``config.yaml``).

    Keys are :class:`TrainConfig` fields (``-`` or ``_``); a run's ``resolved`` section is skipped.
    """
    path = Path(path)
    data = read_yaml(path, "config file") or {}
    if not isinstance(data, Mapping):
        raise UserError(f"{path} must hold a mapping of options (method, student, epochs, ...)")
    data = {k: v for k, v in data.items() if k != "resolved"}
    return _normalize_keys(data, str(path))


def _as_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UserError(f"{key} must be a list (or a comma-separated string), got {value!r}")


def resolve_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """Validate a configuration and fill in the method's reference defaults.

    Example:
        >>> cfg = resolve_config({"method": "pgd-at", "student": "resnet18_cifar", "dataset": "cifar10"})
        >>> cfg.epochs, cfg.milestones, cfg.weight_decay, round(cfg.eps * 255)
        (200, [0.5, 0.75], 0.0005, 8)
    """
    data = config.to_dict() if isinstance(config, TrainConfig) else _normalize_keys(config, "config")
    for key in ("method", "student", "dataset"):
        if not data.get(key) or not isinstance(data[key], str):
            raise UserError(f"no `{key}` given; set it (or '{key}:' in the `config` file)")
    cls = get_method_class(data["method"])
    data["method"] = cls.name
    defaults = {**_FALLBACKS, **cls.training_defaults}
    for key, value in defaults.items():
        if data.get(key) is None:
            data[key] = value
    for key in ("student_kwargs", "method_kwargs"):
        value = data.get(key) or {}
        if not isinstance(value, Mapping):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        data[key] = dict(value)
    if "eps" in data["method_kwargs"]:
        raise UserError("set `eps` (or 'eps:' in the config), not inside `method_kwargs`")
    data["teachers"] = [str(t) for t in _as_list(data.get("teachers") or [], "teachers")]
    if len(set(data["teachers"])) != len(data["teachers"]):
        raise UserError(f"teachers must be distinct, got {data['teachers']}")
    data["epochs"] = as_int(data["epochs"], "epochs", 1)
    data["batch_size"] = as_int(data["batch_size"], "batch_size", 1)
    data["lr"] = as_number(data["lr"], "lr", 0.0, strict=True)
    data["momentum"] = as_number(data.get("momentum", 0.9), "momentum")
    data["weight_decay"] = as_number(data["weight_decay"], "weight_decay")
    data["gamma"] = as_number(data.get("gamma", 0.1), "gamma", 0.0, strict=True)
    data["warmup_epochs"] = as_number(data.get("warmup_epochs", 0.0), "warmup_epochs")
    data["eps"] = parse_eps(data.get("eps", 8 / 255), "eps")
    data["optimizer"] = str(data.get("optimizer", "sgd")).lower()
    if data["optimizer"] not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {data['optimizer']!r}; choose one of {', '.join(OPTIMIZERS)}")
    if data["lr_schedule"] not in LR_SCHEDULES:
        raise UserError(f"unknown lr_schedule {data['lr_schedule']!r}; choose one of {', '.join(LR_SCHEDULES)}")
    milestones = [as_number(m, "milestones") for m in _as_list(data["milestones"], "milestones")]
    if any(m > 1 for m in milestones) or milestones != sorted(milestones):
        raise UserError(f"milestones are increasing fractions of training in [0, 1] (e.g. 0.5,0.75), got {milestones}")
    data["milestones"] = milestones
    data["eval_samples"] = as_int(data.get("eval_samples", 500), "eval_samples", 0)
    data["eval_pgd_steps"] = as_int(data.get("eval_pgd_steps", 10), "eval_pgd_steps", 0)
    if data.get("eval_batch_size") is not None:
        data["eval_batch_size"] = as_int(data["eval_batch_size"], "eval_batch_size", 1)
    if data.get("final_eval_samples") is not None:
        data["final_eval_samples"] = as_int(data["final_eval_samples"], "final_eval_samples", 1)
    from distill.evaluation import check_attack_samples, parse_attacks

    data["final_attacks"] = parse_attacks(data.get("final_attacks") or list(DEFAULT_FINAL_ATTACKS))
    try:
        data["final_attack_samples"] = check_attack_samples(data.get("final_attack_samples"), data["final_attacks"])
    except UserError as err:
        raise UserError(f"final_attack_samples: {err}") from None
    check_tracking({k: data[k] for k in ("tensorboard", "log_wandb", "wandb_project") if k in data})
    for key in ("download", "nesterov", "augment", "normalize", "final_check_eps_sweep", "amp", "channels_last",
                "compile", "tensorboard", "log_wandb"):
        if key in data:
            data[key] = as_bool(data[key], key)
    data["ema"] = ema_decay(data.get("ema"))
    data["seed"] = as_int(data.get("seed", 0), "seed", 0)
    data["device"] = str(data.get("device") or "auto")
    for key in ("pool", "data_root"):
        if data.get(key) is not None:
            data[key] = str(data[key])
    return TrainConfig(**data)


def lr_factor(iteration: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """LR multiplier at 0-based ``iteration`` (the scheduler steps once per iteration).

    ``step``: x ``gamma`` at each milestone (fraction of the epochs; a milestone at epoch m applies
    from m's first iteration); ``cosine``: half cosine to 0; ``cyclic`` (Wong et al.): linear from 0
    to the peak at 40% of training, then to 0; ``constant``. A linear warm-up over
    ``warmup_epochs`` multiplies any of them.

    Example:
        >>> cfg = TrainConfig(method="standard", student="s", dataset="d", epochs=4, lr_schedule="step",
        ...                   milestones=[0.5, 0.75], gamma=0.1)
        >>> [round(lr_factor(i, 10, cfg), 4) for i in (0, 19, 20, 30)]
        [1.0, 1.0, 0.1, 0.01]
    """
    epochs = float(cfg.epochs)
    t = iteration / iters_per_epoch
    t_end = (iteration + 1) / iters_per_epoch
    if cfg.lr_schedule == "step":
        f = cfg.gamma ** sum(t >= m * epochs - 1e-9 for m in (cfg.milestones or []))
    elif cfg.lr_schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(t / epochs, 1.0)))
    elif cfg.lr_schedule == "cyclic":
        peak = 0.4 * epochs
        f = t_end / peak if t_end < peak else max(0.0, (epochs - t_end) / max(epochs - peak, 1e-12))
    else:
        f = 1.0
    if cfg.warmup_epochs > 0 and t_end < cfg.warmup_epochs:
        f *= t_end / cfg.warmup_epochs
    return f

"""The trainer: one loop for every method (DARHT, its baselines, teacher training).

``train(config, out)`` builds the student, loads and freezes the teachers, and runs the epochs:
SGD with momentum and weight decay (or AdamW), a step (milestones as fractions of training), cosine,
cyclic or constant LR schedule stepped per iteration, the dataset's training augmentation, bf16
autocast on CUDA (attack gradients stay fp32: ``pgd_attack`` turns autocast off), optional
channels_last and ``torch.compile``. Each method's ``step`` returns named loss parts; all of them
are logged.

The run directory (CLI.md, ``darht distill``):

- ``config.yaml``: the resolved configuration (every :class:`TrainConfig` field, plus a
  ``resolved`` section: the method's full hyperparameters, the student's spec, the dataset);
- ``env.json``: versions, device, git revision;
- ``summary.csv``: one row per finished epoch: ``epoch`` (1-based), ``lr`` (at the epoch's first
  iteration), ``loss`` and every loss part (batch-size-weighted epoch means), ``train_acc``
  (accuracy of the logits the method trains on: adversarial for PGD-AT, clean for TRADES, see each
  method), ``test_clean_acc`` and ``test_pgd_acc`` on a seeded class-balanced test subset
  (``eval_samples``, indices in ``eval_indices.json``; PGD with ``eval_pgd_steps`` steps of ε/4
  from a uniform start), and ``epoch_time_s``;
- ``checkpoint.pt``: the resume checkpoint (student, optimizer, scheduler, finished epochs, every
  RNG state including the data-order generator, the method's state, the summary rows), written
  atomically after every epoch, tensors and plain types only (loads with ``weights_only=True``);
- ``student.safetensors``: the last epoch's student (no model selection on the test set), with
  its spec in the metadata (:func:`distill.student.load_student`);
- ``metrics.json``: :func:`distill.evaluation.evaluate_robustness` on the test set
  (``final_eval_samples``, default all; indices in ``final_eval_indices.json``; an expensive
  attack can run on a nested class-balanced part of them, ``final_attack_samples``) plus a
  ``training`` section.

``resume=True`` continues from the checkpoint and ends with the same weights as an uninterrupted
run (bit-identical on CPU). A non-finite loss stops training with a :class:`NumericalFault`
naming the epoch and batch; the checkpoint of the last finished epoch is kept.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel over the processes, with
``batch_size`` as the global batch, and rank 0 alone writes the run directory (see :func:`_train`).

Example:
    >>> from transfer_analysis.data import make_synthetic
    >>> import tempfile
    >>> data = make_synthetic(num_classes=3, in_chans=1, image_size=8, n_train=64, n_test=30)
    >>> cfg = {"method": "standard", "student": "resnet18_cifar", "student_kwargs": {"width": 4},
    ...        "dataset": "synthetic", "epochs": 1, "batch_size": 32, "eval_samples": 9,
    ...        "final_attacks": ["clean"], "device": "cpu"}
    >>> result = train(cfg, tempfile.mkdtemp(), dataset=data)
    >>> result.completed, len(result.history), sorted(result.metrics["accuracy"])
    (True, 1, ['clean'])
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.attacks import eval_mode, pgd_attack
from distill.methods import FrozenTeachers, Method, create_method, get_method_class
from distill.tracking import check_tracking
from distill.student import Student, build_student, data_parallel, save_student
from transfer_analysis import distributed as dist_utils
from transfer_analysis.checks import as_bool, as_int, as_number, ema_decay
from transfer_analysis.data import ImageDataset, balanced_subset, load_dataset, save_indices
from transfer_analysis.errors import UserError
from transfer_analysis.pool import merge_implied_kwargs
from transfer_analysis.utils import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    format_eps,
    parse_eps,
    prepare_out_dir,
    read_yaml,
    progress,
    resolve_device,
    rng_state,
    safe_torch_load,
    seed_everything,
    set_rng_state,
    write_env_json,
    write_run_config,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "NumericalFault",
    "LR_SCHEDULES",
    "DEFAULT_FINAL_ATTACKS",
    "CHECKPOINT_NAME",
    "peak_memory",
    "resolve_config",
    "read_config_file",
    "lr_factor",
    "train",
]

logger = logging.getLogger(__name__)

LR_SCHEDULES: tuple[str, ...] = ("step", "cosine", "cyclic", "constant")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
DEFAULT_FINAL_ATTACKS: tuple[str, ...] = ("clean", "fgsm", "pgd20", "cw", "autoattack")
CHECKPOINT_NAME = "checkpoint.pt"
#: the final evaluation's resumable state (distill.eval_state), deleted once metrics.json is written
FINAL_EVAL_STATE = "final_eval.state.pt"
CHECKPOINT_FORMAT = "darht-train-1"

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


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
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
            flag = {"student": "--student ARCH", "method": "--method NAME", "dataset": "--dataset D"}[key]
            raise UserError(f"no {key} given; pass {flag} (or set '{key}:' in --config RUN.yaml)")
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
        raise UserError("set eps with --eps (or 'eps:' in the config), not inside method_kwargs")
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


# --------------------------------------------------------------------------------------------
# pieces of the loop
# --------------------------------------------------------------------------------------------
def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_device_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run a block with its own seeded RNG, leaving the training RNG streams untouched."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _evaluate_epoch(student: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, device: torch.device,
                    epoch: int) -> tuple[float, float]:
    """Clean and PGD accuracy of ``student`` on the per-epoch test subset (fp32, eval mode)."""
    if len(y) == 0:
        return float("nan"), float("nan")
    batch = cfg.eval_batch_size or cfg.batch_size
    clean = robust = 0
    with eval_mode(student), _forked_rng(device, cfg.seed * 1_000_003 + epoch):
        for start in range(0, len(y), batch):
            xb = _to_device_format(x[start:start + batch].to(device), cfg.channels_last)
            yb = y[start:start + batch].to(device)
            with torch.no_grad():
                clean += int((student(xb).argmax(1) == yb).sum())
            x_adv = pgd_attack(student, xb, yb, eps=cfg.eps, alpha=cfg.eps / 4, steps=cfg.eval_pgd_steps,
                               start="uniform")
            with torch.no_grad():
                robust += int((student(x_adv).argmax(1) == yb).sum())
    return clean / len(y), robust / len(y)


def _write_summary(path: Path, history: Sequence[Mapping[str, float]]) -> None:
    if not history:
        return
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in columns})
    atomic_write_text(path, buf.getvalue())


def _scalar_parts(parts: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor | float]]:
    for key, value in parts.items():
        if key in ("loss", "logits"):
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                yield key, value.detach().float().reshape(())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, float(value)


def _check_teacher_request(cfg: TrainConfig, method: Method, teachers: Mapping[str, nn.Module] | None) -> None:
    """Cheap checks of the teacher options, before anything is loaded."""
    if method.max_teachers == 0:
        return
    names = list(teachers) if teachers is not None else cfg.teachers
    if not names:
        raise UserError(f"method {method.name!r} needs teachers; pass --pool POOL.yaml --teachers a,b,... "
                        f"(at least {method.min_teachers})")
    if teachers is None and not cfg.pool:
        raise UserError("--teachers needs --pool POOL.yaml (the pool file that defines them)")
    if len(names) < method.min_teachers or (method.max_teachers is not None and len(names) > method.max_teachers):
        want = (f"exactly {method.min_teachers}" if method.min_teachers == method.max_teachers
                else f"at least {method.min_teachers}" if method.max_teachers is None
                else f"{method.min_teachers} to {method.max_teachers}")
        order = " (ROBUST,CLEAN)" if method.name == "mtard" else ""
        raise UserError(f"method {method.name!r} takes {want} teacher(s){order}, got {len(names)}: {', '.join(names)}")


def _load_teachers(cfg: TrainConfig, method: Method, data: ImageDataset, device: torch.device,
                   teachers: Mapping[str, nn.Module] | None) -> dict[str, nn.Module]:
    if method.max_teachers == 0:
        if cfg.teachers or teachers:
            logger.warning("method %s uses no teachers; ignoring %s", method.name,
                           ", ".join(cfg.teachers or list(teachers or {})))
        return {}
    if teachers is not None:
        return dict(teachers)
    from transfer_analysis.pool import load_pool

    return load_pool(cfg.pool, num_classes=data.num_classes, in_chans=data.in_chans, image_size=data.image_size,
                     device=device, names=cfg.teachers)


def _transfer_sources(cfg: TrainConfig, loaded: Mapping[str, nn.Module], data: ImageDataset,
                      device: torch.device) -> dict[str, nn.Module]:
    names = [a.split(":", 1)[1] for a in cfg.final_attacks if a.startswith("transfer:")]
    missing = [n for n in names if n not in loaded]
    sources = {n: loaded[n] for n in names if n in loaded}
    if missing:
        if not cfg.pool:
            raise UserError(f"final attack transfer:{missing[0]} needs --pool POOL.yaml holding {missing[0]!r}")
        from transfer_analysis.pool import load_pool

        sources.update(load_pool(cfg.pool, num_classes=data.num_classes, in_chans=data.in_chans,
                                 image_size=data.image_size, device=device, names=missing))
    return sources


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
                            "options (or none: the run's config.yaml is the default), or --force to start over")


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------
def train(config: TrainConfig | Mapping[str, Any], out: str | os.PathLike, *, resume: bool = False,
          force: bool = False, dataset: ImageDataset | None = None, teachers: Mapping[str, nn.Module] | None = None,
          stop_after_epochs: int | None = None,
          on_epoch_end: Callable[[int, Mapping[str, float]], None] | None = None) -> TrainResult:
    """Train a student (or a teacher) with a registered method and write the run directory.

    Args:
        config: a :class:`TrainConfig` or a mapping of its fields (see :func:`resolve_config`).
        out: the run directory.
        resume: continue the run in ``out`` from its checkpoint (the configuration must match).
        force: replace a run already in ``out``.
        dataset: an already loaded dataset (default: ``load_dataset(config.dataset)``).
        teachers: already built teacher models by name (default: ``config.teachers`` from
            ``config.pool``); they are frozen here.
        stop_after_epochs: stop, as if interrupted, after this many epochs in this call (time-sliced
            jobs, tests); the run is then resumable and ``completed`` is false.
        on_epoch_end: called with ``(epoch, summary_row)`` after each epoch's checkpoint is written.

    Returns:
        A :class:`TrainResult`; ``metrics`` is the ``metrics.json`` dict when training completed.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialized here (and destroyed
    at the end) and the run is data-parallel; see :func:`_train`.

    Example: see the module docstring.
    """
    cfg = resolve_config(config)
    with dist_utils.process_group(resolve_device(cfg.device)):
        return _train(cfg, out, resume=resume, force=force, dataset=dataset, teachers=teachers,
                      stop_after_epochs=stop_after_epochs, on_epoch_end=on_epoch_end)


def _check_run_dir(out: Path, *, resume: bool, force: bool) -> None:
    """What ``out`` may be for a training run: new (neither flag), an unfinished run (``resume``), or
    anything to replace (``force``); checked before any work, nothing is written."""
    from transfer_analysis.rundir import check_output_path

    check_output_path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    if resume and force:
        raise UserError("--resume continues a run and --force replaces it; give one of them")
    is_run = (out / "config.yaml").is_file()
    if is_run and not (resume or force):
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --force to replace it")
    if resume and not is_run:
        raise UserError(f"nothing to resume in {out}: it holds no run (no config.yaml); drop --resume to start one")


def _make_ema(student: nn.Module, decay: float | None) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the student (weights and buffers: batch-norm statistics too),
    updated after every optimizer step; ``None`` without ``decay``.

    Example:
        >>> ema = _make_ema(nn.Linear(2, 1), 0.9)
        >>> type(ema).__name__, ema.n_averaged.item()
        ('AveragedModel', 0)
    """
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _finished_run(out: Path, cfg: TrainConfig) -> TrainResult:
    """A resume of a run that already finished: nothing is trained, evaluated or written again."""
    import json

    from distill.student import load_student

    logger.info("%s finished earlier: nothing to resume; its metrics.json and student are kept as they are", out)
    with open(out / "summary.csv", newline="") as fh:
        history = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
    return TrainResult(out, load_student(out / "student.safetensors"), history,
                       json.loads((out / "metrics.json").read_text()), True, cfg)


def _train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool, force: bool, dataset: ImageDataset | None,
           teachers: Mapping[str, nn.Module] | None, stop_after_epochs: int | None,
           on_epoch_end: Callable[[int, Mapping[str, float]], None] | None) -> TrainResult:
    """The body of :func:`train`, in one process or as one rank of a ``torchrun`` job.

    Data-parallel (``world`` processes): ``batch_size`` is the global batch. Every rank draws the
    same global batch (and its augmentation) from the same seeded generator, as one process
    would, and trains on its strided slice ``[rank::world]``, which is what ``DistributedSampler``
    gives (the generator's state carries the epoch); the student alone is wrapped in
    ``DistributedDataParallel`` (:func:`distill.student.data_parallel`: its training forwards go
    through DDP, its attack passes stay local), so each backward averages the gradients over the
    ranks; rank 0's buffers (batch-norm statistics) are broadcast before each step (for the attack)
    and, by DDP, before each training forward;
    teachers stay unwrapped and frozen on every rank; the logged sums are all-reduced, so
    ``summary.csv`` holds what one process would log up to floating point and the per-rank
    batch-norm statistics; rank 0 alone writes files and runs the per-epoch evaluation; the final
    evaluation is sharded over every rank (the same metrics as one process). The checkpoint holds every rank's RNG states;
    resuming with another number of processes continues the same data order and schedule but
    re-seeds the per-rank random streams (a warning says so), so it is not bit-identical.
    """
    world, rank = dist_utils.world_size(), dist_utils.rank()
    main = rank == 0
    device = dist_utils.rank_device(resolve_device(cfg.device))
    method = create_method(cfg.method, eps=cfg.eps, **cfg.method_kwargs)
    out = Path(out)
    _check_teacher_request(cfg, method, teachers)
    _check_run_dir(out, resume=resume, force=force)
    if resume and out.is_dir():
        _check_resume_config(out, cfg)
    if resume and (out / "metrics.json").is_file() and (out / "student.safetensors").is_file():
        return _finished_run(out, cfg)
    data = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, download=cfg.download)
    teacher_models = _load_teachers(cfg, method, data, device, teachers)
    if cfg.batch_size > len(data.y_train):
        raise UserError(f"batch size {cfg.batch_size} exceeds the {len(data.y_train)} training images; lower "
                        "--batch-size")
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
                        f"{world} processes")
    frozen = FrozenTeachers(teacher_models) if teacher_models else None
    method.bind(frozen)
    transfer_pool = _transfer_sources(cfg, teacher_models, data, device)

    seed_everything(cfg.seed)
    mean, std = data.channel_stats() if cfg.normalize else (None, None)
    num_teachers = len(teacher_models) if method.uses_feature_map else 0
    student_kwargs = merge_implied_kwargs(cfg.student_kwargs, "student_kwargs", in_chans=data.in_chans,
                                          num_classes=data.num_classes)
    student = build_student(cfg.student, data.num_classes, num_teachers, in_chans=data.in_chans,
                            image_size=data.image_size, mean=mean, std=std, **student_kwargs)
    student.to(device)
    ema = _make_ema(student, cfg.ema)
    for model in teacher_models.values():
        model.to(device)
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
        for model in teacher_models.values():
            model.to(memory_format=torch.channels_last)
    amp = cfg.amp and device.type == "cuda"
    if cfg.amp and not amp:
        logger.debug("AMP (bf16) is used on CUDA only; training in fp32 on %s", device)
    if world > 1:  # same initial weights on every rank (seeded above); distinct training noise per rank
        seed_everything(_rank_seed(cfg.seed, rank))

    run_dir = prepare_out_dir(out, resume=resume, force=force) if main else out
    dist_utils.barrier()
    resolved = {
        **cfg.to_dict(),
        "resolved": {
            "method": method.config(),
            "student": student.spec,
            "teachers": list(teacher_models),
            "dataset": {"name": data.name, "num_classes": data.num_classes, "in_chans": data.in_chans,
                        "image_size": data.image_size, "n_train": len(data.y_train), "n_test": len(data.y_test),
                        "augment": dataclasses.asdict(data.augment) if cfg.augment else None},
            "eps_text": format_eps(cfg.eps),
            "amp_active": amp,
            "iterations_per_epoch": len(data.y_train) // cfg.batch_size,
        },
    }
    if main:
        write_run_config(run_dir, resolved)
        write_env_json(run_dir, device)
    from distill.tracking import Tracker

    tracker = Tracker(run_dir, resolved, tensorboard=cfg.tensorboard,
                      wandb_project=(cfg.wandb_project or "darht") if cfg.log_wandb else None) if main else \
        Tracker(run_dir, {})

    iters = len(data.y_train) // cfg.batch_size
    if cfg.optimizer == "adamw":  # what timm trains ViTs and MLP-Mixers with; SGD leaves small ones near chance
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr,
                                                             weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, iters, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = run_dir / CHECKPOINT_NAME
    if resume and ckpt_path.is_file():
        ckpt = safe_torch_load(ckpt_path, what="resume checkpoint", trust_hint=None)
        if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{ckpt_path} is not a darht training checkpoint; use --force to start over")
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
            if main:
                logger.warning("resuming a run of %d process(es) with %d: the data order and schedule continue, "
                               "the per-rank random streams are re-seeded (not bit-identical to an uninterrupted "
                               "run)", saved_world, world)
            seed_everything(_rank_seed(cfg.seed, rank, int(ckpt["epoch"])))
        history = [dict(row) for row in ckpt["history"]]
        start_epoch = int(ckpt["epoch"])
        logger.info("resuming %s after epoch %d of %d", run_dir, start_epoch, cfg.epochs)
    elif resume:
        logger.info("no checkpoint in %s; starting from the beginning", run_dir)
    if cfg.compile:  # in place (nn.Module.compile): state_dict keys and checkpoints are unchanged
        student.backbone.compile()
        for model in teacher_models.values():
            model.compile()

    eval_seed = _eval_seed(cfg)
    eval_idx = balanced_subset(data.y_test, cfg.eval_samples, seed=eval_seed) if cfg.eval_samples else \
        torch.zeros(0, dtype=torch.long)
    if main:
        save_indices(run_dir / "eval_indices.json", eval_idx, split="test", dataset=data.name, seed=eval_seed)
    x_eval, y_eval = data.images("test", eval_idx), data.labels("test", eval_idx)
    augment = data.augment if cfg.augment else None

    logger.info("training %s with %s on %s: %d epochs x %d iterations, batch %d, eps %s, teachers: %s",
                cfg.student, method.name, data.name, cfg.epochs, iters, cfg.batch_size, format_eps(cfg.eps),
                ", ".join(teacher_models) or "none")
    stopped = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parallel = contextlib.ExitStack()
    if world > 1:  # DDP around the student only; built after any checkpoint is loaded
        parallel.enter_context(data_parallel(student, device))
    with parallel:
        for epoch in range(start_epoch, cfg.epochs):
            if stop_after_epochs is not None and epoch - start_epoch >= stop_after_epochs:
                stopped = True
                break
            t0 = time.perf_counter()
            lr_now = float(optimizer.param_groups[0]["lr"])
            method.on_epoch_start(epoch, cfg.epochs, lr_now, cfg.lr)
            student.train()
            sums: dict[str, torch.Tensor | float] = {}
            loss_sum = 0.0
            correct = 0
            seen = 0
            batches = data.batches("train", cfg.batch_size, shuffle=True, generator=generator, augment=augment,
                                   device=device, drop_last=True)
            bar = progress(batches, total=iters, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            for batch_idx, (x, y) in enumerate(bar):
                if world > 1:  # this rank's slice of the global batch (DistributedSampler's striding)
                    x, y = x[rank::world], y[rank::world]
                    # DDP broadcasts rank 0's buffers before each training forward, but the attack's
                    # passes come first: give them rank 0's batch-norm statistics too, so every rank
                    # attacks the same model and a resumed run (rank 0's checkpoint) is bit-identical
                    dist_utils.broadcast_buffers(student)
                x = _to_device_format(x, cfg.channels_last)
                with _autocast(device, amp):
                    parts = method.step(student, x, y)
                loss = parts["loss"]
                # one device sync for both checks: sum(logits) * 0 is NaN exactly when a logit is NaN or Inf
                loss_value, logits_probe = torch.stack([loss.detach().float(),
                                                        parts["logits"].detach().float().sum() * 0]).tolist()
                if not (math.isfinite(loss_value) and math.isfinite(logits_probe)):
                    what = f"loss ({loss_value})" if not math.isfinite(loss_value) else "logits (NaN or Inf)"
                    kept = (f"the checkpoint of epoch {len(history)} is kept in {ckpt_path}" if ckpt_path.is_file()
                            else "no checkpoint was written yet")
                    raise NumericalFault(
                        f"non-finite {what} at epoch {epoch + 1}, batch {batch_idx + 1} (method "
                        f"{method.name}); {kept}; start again with a lower lr or without AMP (--lr, --no-amp) "
                        "in a new --out or with --force (a resume keeps the run's settings)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # under torchrun, DDP averages the gradients over the ranks here
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(student)
                n = len(y)
                seen += n
                loss_sum += loss_value * n
                correct += int((parts["logits"].argmax(1) == y).sum())
                for key, value in _scalar_parts(parts):
                    sums[key] = sums.get(key, 0.0) + value * n
                if hasattr(bar, "set_postfix") and batch_idx % 10 == 0:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
            if world > 1:
                sums, loss_sum, correct, seen = _all_reduce_sums(sums, loss_sum, correct, seen)
            reported = student if ema is None else ema.module  # with --ema the average is the reported model
            clean_acc, pgd_acc = _evaluate_epoch(reported, x_eval, y_eval, cfg, device, epoch) if main else \
                (float("nan"), float("nan"))
            row: dict[str, float] = {"epoch": epoch + 1, "lr": lr_now, "loss": loss_sum / seen}
            for key, total in sums.items():
                row[key] = float(total) / seen
            row.update({"train_acc": correct / seen, "test_clean_acc": clean_acc, "test_pgd_acc": pgd_acc,
                        "epoch_time_s": time.perf_counter() - t0})
            history.append(row)
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
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
            if world > 1:
                ckpt["world_size"] = world
                ckpt["rng_ranks"] = dist_utils.all_gather_object(ckpt["rng"])
            if main:  # the checkpoint first: summary.csv never lists an epoch the checkpoint lacks
                atomic_torch_save(ckpt, ckpt_path)
                _write_summary(run_dir / "summary.csv", history)
            del ckpt
            dist_utils.barrier()  # the checkpoint is on disk before any rank goes on (or stops)
            logger.info("epoch %d/%d: %s", epoch + 1, cfg.epochs,
                        ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
            tracker.log_epoch(epoch + 1, row)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
    if stopped:
        logger.info("stopped after epoch %d of %d; continue with --resume", len(history), cfg.epochs)
        tracker.close()
        return TrainResult(run_dir, student, history, None, False, cfg)

    if ema is not None:  # the reported model is the moving average (its buffers averaged too)
        student = ema.module
    student.eval()
    if main:
        save_student(student, run_dir / "student.safetensors",
                     extra_metadata={"method": method.name, "epochs": cfg.epochs, "teachers": list(teacher_models)})
    # every rank takes part (the samples are sharded, the metrics are those of one process); rank 0 writes
    metrics = _final_evaluation(student, data, cfg, device, run_dir, transfer_pool)
    if not main:
        tracker.close()
        return TrainResult(run_dir, student, history, None, True, cfg)
    metrics["training"] = {
        "method": method.name,
        "method_config": method.config(),
        "student": cfg.student,
        "student_kwargs": cfg.student_kwargs,
        "teachers": list(teacher_models),
        "epochs": cfg.epochs,
        "params": sum(p.numel() for p in student.parameters()),
        "dataset": data.name,
        "train_seconds": sum(row["epoch_time_s"] for row in history),
        "last_epoch": history[-1] if history else None,
        "model_selection": "last epoch (no selection on the test set)" + (
            f"; exponential moving average of the weights and buffers, decay {cfg.ema}" if cfg.ema else ""),
        "seed": cfg.seed,
        **peak_memory(device),
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    (run_dir / FINAL_EVAL_STATE).unlink(missing_ok=True)  # the evaluation is complete and written
    tracker.log_final(metrics, cfg.epochs)
    tracker.close()
    logger.info("done: %s; peak memory %.0f MB (%s)", ", ".join(f"{k} {v:.4f}" for k, v in metrics["accuracy"].items()),
                metrics["training"]["peak_memory_mb"], metrics["training"]["peak_memory_kind"])
    return TrainResult(run_dir, student, history, metrics, True, cfg)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: ``{"peak_memory_mb", "peak_memory_kind"}``.

    On CUDA the most memory tensors held on ``device`` since the last reset (the trainer resets
    it when training starts, so it covers training and the final evaluation); elsewhere the
    process's peak resident set size (data and everything else included; Linux and macOS).

    Example:
        >>> peak_memory(torch.device("cpu"))["peak_memory_kind"]
        'process peak RSS'
    """
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda max allocated"}
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):  # Windows
        mb = float("nan")
    return {"peak_memory_mb": round(mb, 1), "peak_memory_kind": "process peak RSS"}


def _rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed of rank ``rank``'s training noise streams (attack starts, dropout) in a data-parallel run."""
    return (seed * 1_000_003 + 7919 * (rank + 1) + 104_729 * epoch) % 2**63


def _all_reduce_sums(sums: dict[str, torch.Tensor | float], loss_sum: float, correct: int,
                     seen: int) -> tuple[dict[str, float], float, int, int]:
    """Sum the epoch's logged totals over the ranks (one all-reduce, float64)."""
    keys = list(sums)
    local = torch.tensor([float(sums[k]) for k in keys] + [loss_sum, float(correct), float(seen)],
                         dtype=torch.float64)
    total = dist_utils.all_reduce_sum(local).tolist()
    return ({k: total[i] for i, k in enumerate(keys)}, total[len(keys)], int(round(total[len(keys) + 1])),
            int(round(total[len(keys) + 2])))


def _eval_seed(cfg: TrainConfig) -> int:
    """Seed of the evaluation subsets: ``eval_seed`` when set (a study evaluates every student on the
    same images whatever its training seed), else ``seed``."""
    return cfg.eval_seed if cfg.eval_seed is not None else cfg.seed


def _final_evaluation(student: Student, data: ImageDataset, cfg: TrainConfig, device: torch.device, run_dir: Path,
                      pool: Mapping[str, nn.Module]) -> dict[str, Any]:
    from distill.evaluation import evaluate_robustness

    n_test = len(data.y_test)
    n = cfg.final_eval_samples if cfg.final_eval_samples is not None else n_test
    idx = balanced_subset(data.y_test, n, seed=_eval_seed(cfg))
    if dist_utils.rank() == 0:
        save_indices(run_dir / "final_eval_indices.json", idx, split="test", dataset=data.name, seed=_eval_seed(cfg))
    x, y = data.images("test", idx), data.labels("test", idx)
    return evaluate_robustness(student, x, y, attacks=cfg.final_attacks, eps=cfg.eps,
                               batch_size=cfg.eval_batch_size or cfg.batch_size, pool=dict(pool) or None,
                               seed=cfg.seed, device=device, n_classes=data.num_classes,
                               check_eps_sweep=cfg.final_check_eps_sweep,
                               attack_samples=cfg.final_attack_samples, subset_seed=_eval_seed(cfg),
                               state_path=run_dir / FINAL_EVAL_STATE)

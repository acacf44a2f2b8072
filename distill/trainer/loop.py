"""The training loop: :func:`train` and one epoch of it, :func:`train_one_epoch`.

See the package docstring for the run directory it writes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
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

from distill.methods import FrozenTeachers, Method, create_method
from distill.student import Student, build_student, data_parallel, save_student
from transfer_analysis import distributed as dist_utils
from transfer_analysis.attacks import attack_config, build_attack, eval_mode
from transfer_analysis.data import ImageDataset, balanced_subset, load_dataset, save_indices
from transfer_analysis.errors import UserError
from transfer_analysis.models import merge_implied_kwargs
from transfer_analysis.runtime import peak_memory
from transfer_analysis.rundir import check_run_dir
from transfer_analysis.utils import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    format_eps,
    prepare_out_dir,
    progress,
    resolve_device,
    seed_everything,
    seeded,
    write_env_json,
    write_run_config,
)

from .checkpoint import (
    CHECKPOINT_NAME,
    FINAL_EVAL_STATE,
    _check_resume_config,
    _finished_run,
    _rank_seed,
    checkpoint_state,
    restore_checkpoint,
)
from .config import NumericalFault, TrainConfig, TrainResult, lr_factor, resolve_config

__all__ = ["train", "train_one_epoch", "peak_memory"]

logger = logging.getLogger("distill.trainer")


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


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_device_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def _evaluate_epoch(student: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, device: torch.device,
                    epoch: int) -> tuple[float, float]:
    """Clean and PGD accuracy of ``student`` on the per-epoch test subset (fp32, eval mode)."""
    if len(y) == 0:
        return float("nan"), float("nan")
    batch = cfg.eval_batch_size or cfg.batch_size
    clean = robust = 0
    # the evaluation vocabulary's pgdN (the registry's PGD, ε/4 steps, uniform start); 0 steps: clean
    attack = build_attack(attack_config(f"pgd{cfg.eval_pgd_steps}", cfg.eps), student) if cfg.eval_pgd_steps else None
    with eval_mode(student), seeded(cfg.seed * 1_000_003 + epoch, device):
        for start in range(0, len(y), batch):
            xb = _to_device_format(x[start:start + batch].to(device), cfg.channels_last)
            yb = y[start:start + batch].to(device)
            with torch.no_grad():
                clean += int((student(xb).argmax(1) == yb).sum())
            x_adv = attack(xb, yb) if attack is not None else xb
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
    """Cheap checks of the teacher options, before anything is loaded (options that would be ignored
    are refused: a method without teachers given teachers)."""
    names = list(teachers) if teachers is not None else cfg.teachers
    if method.max_teachers == 0:
        if names:
            raise UserError(f"method {method.name!r} uses no teachers, got {', '.join(names)}; drop `teachers` (and "
                            "`pool`)")
        return
    if len(set(names)) != len(names):
        raise UserError(f"`teachers` names a teacher twice: {', '.join(names)}")
    if not names:
        raise UserError(f"method {method.name!r} needs teachers; give `pool` and `teachers` "
                        f"(at least {method.min_teachers})")
    if teachers is None and not cfg.pool:
        raise UserError("`teachers` needs `pool` (the pool file that defines them)")
    if len(names) < method.min_teachers or (method.max_teachers is not None and len(names) > method.max_teachers):
        want = (f"exactly {method.min_teachers}" if method.min_teachers == method.max_teachers
                else f"at least {method.min_teachers}" if method.max_teachers is None
                else f"{method.min_teachers} to {method.max_teachers}")
        order = " (ROBUST,CLEAN)" if method.name == "mtard" else ""
        raise UserError(f"method {method.name!r} takes {want} teacher(s){order}, got {len(names)}: {', '.join(names)}")


def _load_teachers(cfg: TrainConfig, method: Method, data: ImageDataset, device: torch.device,
                   teachers: Mapping[str, nn.Module] | None) -> dict[str, nn.Module]:
    if method.max_teachers == 0:
        return {}  # teachers given anyway were refused by _check_teacher_request
    if teachers is not None:
        return dict(teachers)
    from transfer_analysis.models import load_pool

    return load_pool(cfg.pool, num_classes=data.num_classes, in_chans=data.in_chans, image_size=data.image_size,
                     device=device, names=cfg.teachers)


def _transfer_sources(cfg: TrainConfig, loaded: Mapping[str, nn.Module], data: ImageDataset,
                      device: torch.device) -> dict[str, nn.Module]:
    names = [a.split(":", 1)[1] for a in cfg.final_attacks if a.startswith("transfer:")]
    missing = [n for n in names if n not in loaded]
    sources = {n: loaded[n] for n in names if n in loaded}
    if missing:
        if not cfg.pool:
            raise UserError(f"final attack transfer:{missing[0]} needs `pool` holding {missing[0]!r}")
        from transfer_analysis.models import load_pool

        sources.update(load_pool(cfg.pool, num_classes=data.num_classes, in_chans=data.in_chans,
                                 image_size=data.image_size, device=device, names=missing))
    return sources


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

@dataclass
class _Session:
    """Everything one training run holds while its epochs run."""

    cfg: TrainConfig
    method: Method
    data: ImageDataset
    device: torch.device
    run_dir: Path
    student: Student
    ema: Any
    teacher_models: dict[str, nn.Module]
    transfer_pool: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    tracker: Any
    amp: bool
    iters: int
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0

    @property
    def main(self) -> bool:
        return dist_utils.rank() == 0

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME


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
    and, by DDP, before each training forward; teachers stay unwrapped and frozen on every rank;
    the logged sums are all-reduced, so ``summary.csv`` holds what one process would log up to
    floating point and the per-rank batch-norm statistics; rank 0 alone writes files and runs the
    per-epoch evaluation; the final evaluation is sharded over every rank (the same metrics as one
    process). The checkpoint holds every rank's RNG states; resuming with another number of
    processes continues the same data order and schedule but re-seeds the per-rank random streams
    (a warning says so), so it is not bit-identical.
    """
    method = create_method(cfg.method, eps=cfg.eps, **cfg.method_kwargs)
    out = Path(out)
    _check_teacher_request(cfg, method, teachers)
    check_run_dir(out, resume=resume, force=force)
    if resume and out.is_dir():
        _check_resume_config(out, cfg)
    if resume and (out / "metrics.json").is_file() and (out / "student.safetensors").is_file():
        return _finished_run(out, cfg)
    s = _setup(cfg, method, out, resume=resume, force=force, dataset=dataset, teachers=teachers)
    logger.info("training %s with %s on %s: %d epochs x %d iterations, batch %d, eps %s, teachers: %s",
                cfg.student, method.name, s.data.name, cfg.epochs, s.iters, cfg.batch_size, format_eps(cfg.eps),
                ", ".join(s.teacher_models) or "none")
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    parallel = contextlib.ExitStack()
    if dist_utils.world_size() > 1:  # DDP around the student only; built after any checkpoint is loaded
        parallel.enter_context(data_parallel(s.student, s.device))
    with parallel:
        for epoch in range(s.start_epoch, cfg.epochs):
            if stop_after_epochs is not None and epoch - s.start_epoch >= stop_after_epochs:
                logger.info("stopped after epoch %d of %d; continue with `resume`", len(s.history), cfg.epochs)
                s.tracker.close()
                return TrainResult(s.run_dir, s.student, s.history, None, False, cfg)
            started = time.perf_counter()
            row = train_one_epoch(s, epoch)
            _end_epoch(s, epoch, row, started)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
    return _finish(s)


def _setup(cfg: TrainConfig, method: Method, out: Path, *, resume: bool, force: bool,
           dataset: ImageDataset | None, teachers: Mapping[str, nn.Module] | None) -> _Session:
    """Data, teachers, student, optimizer and the run directory; a resume restores the checkpoint."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    device = dist_utils.rank_device(resolve_device(cfg.device))
    data = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_root, download=cfg.download)
    if not data.has_train:
        raise UserError(f"dataset {cfg.dataset} has no training split (an image folder without train/ and val/ "
                        "sub-folders is a test-only set: darht matrix, evaluate and recommend only)")
    teacher_models = _load_teachers(cfg, method, data, device, teachers)
    if cfg.batch_size > len(data.y_train):
        raise UserError(f"batch size {cfg.batch_size} exceeds the {len(data.y_train)} training images; lower "
                        "`batch_size`")
    if cfg.batch_size % world:
        raise UserError(f"`batch_size` {cfg.batch_size} is the global batch and must be divisible by the "
                        f"{world} processes")
    method.bind(FrozenTeachers(teacher_models) if teacher_models else None)
    transfer_pool = _transfer_sources(cfg, teacher_models, data, device)
    student, ema, amp = _build_student(cfg, method, data, device, teacher_models)
    run_dir = prepare_out_dir(out, resume=resume, force=force) if rank == 0 else out
    dist_utils.barrier()
    resolved = _resolved_config(cfg, method, student, teacher_models, data, amp)
    if rank == 0:
        write_run_config(run_dir, resolved)
        write_env_json(run_dir, device)
    from distill.tracking import Tracker

    tracker = Tracker(run_dir, resolved, tensorboard=cfg.tensorboard,
                      wandb_project=(cfg.wandb_project or "darht") if cfg.log_wandb else None) if rank == 0 else \
        Tracker(run_dir, {})
    iters = len(data.y_train) // cfg.batch_size
    if cfg.optimizer == "adamw":  # what timm trains ViTs and MLP-Mixers with; SGD leaves small ones near chance
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr,
                                                             weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, iters, cfg))
    eval_idx = balanced_subset(data.y_test, cfg.eval_samples, seed=_eval_seed(cfg)) if cfg.eval_samples else \
        torch.zeros(0, dtype=torch.long)
    if rank == 0:
        save_indices(run_dir / "eval_indices.json", eval_idx, split="test", dataset=data.name, seed=_eval_seed(cfg))
    s = _Session(cfg=cfg, method=method, data=data, device=device, run_dir=run_dir, student=student, ema=ema,
                 teacher_models=teacher_models, transfer_pool=transfer_pool, optimizer=optimizer,
                 scheduler=scheduler, generator=torch.Generator().manual_seed(cfg.seed), tracker=tracker, amp=amp,
                 iters=iters, x_eval=data.images("test", eval_idx), y_eval=data.labels("test", eval_idx))
    if resume and s.ckpt_path.is_file():
        s.start_epoch, s.history = restore_checkpoint(s.ckpt_path, cfg, student, optimizer, scheduler, s.generator,
                                                      method, ema)
        logger.info("resuming %s after epoch %d of %d", run_dir, s.start_epoch, cfg.epochs)
    elif resume:
        logger.info("no checkpoint in %s; starting from the beginning", run_dir)
    if cfg.compile:  # in place (nn.Module.compile): state_dict keys and checkpoints are unchanged
        student.backbone.compile()
        for model in teacher_models.values():
            model.compile()
    return s


def _pretrained_preprocessing(arch: str, student_kwargs: dict[str, Any], in_chans: int,
                              ) -> tuple[list[float] | None, list[float] | None]:
    """A pretrained student's own mean/std (and, unless given, its input size, set in
    ``student_kwargs``): fine-tuning keeps the preprocessing the weights were trained with."""
    from transfer_analysis.models import pretrained_config

    cfg = pretrained_config(arch, f"student {arch}")
    if "input_size" not in student_kwargs and cfg.get("input_size"):
        student_kwargs["input_size"] = list(cfg["input_size"][-2:])
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None, None
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != in_chans:  # timm folds RGB filters into one channel for gray data: one constant
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    logger.info("student %s starts from pretrained weights: its mean %s, std %s, input size %s", arch, mean, std,
                student_kwargs.get("input_size"))
    return mean, std


def _build_student(cfg: TrainConfig, method: Method, data: ImageDataset, device: torch.device,
                   teacher_models: Mapping[str, nn.Module]) -> tuple[Student, Any, bool]:
    """The seeded student on ``device`` (and its EMA), the teachers moved there; whether AMP is on."""
    seed_everything(cfg.seed)
    num_teachers = len(teacher_models) if method.uses_feature_map else 0
    student_kwargs = merge_implied_kwargs(cfg.student_kwargs, "student_kwargs", in_chans=data.in_chans,
                                          num_classes=data.num_classes)
    mean, std = _pretrained_preprocessing(cfg.student, student_kwargs, data.in_chans) \
        if student_kwargs.get("pretrained") else (None, None)
    if mean is None and cfg.normalize:
        mean, std = data.channel_stats()
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
    if dist_utils.world_size() > 1:  # same initial weights on every rank (seeded above); distinct noise per rank
        seed_everything(_rank_seed(cfg.seed, dist_utils.rank()))
    return student, ema, amp


def _resolved_config(cfg: TrainConfig, method: Method, student: Student, teacher_models: Mapping[str, nn.Module],
                     data: ImageDataset, amp: bool) -> dict[str, Any]:
    """``config.yaml``: every field plus what they resolved to (method, student spec, dataset)."""
    return {
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


def train_one_epoch(s: _Session, epoch: int) -> dict[str, float]:
    """One epoch of ``s.method`` over the training set; returns its ``summary.csv`` row (without the
    per-epoch test accuracies and the epoch time, which :func:`_end_epoch` adds)."""
    cfg, student, world, rank = s.cfg, s.student, dist_utils.world_size(), dist_utils.rank()
    lr_now = float(s.optimizer.param_groups[0]["lr"])
    s.method.on_epoch_start(epoch, cfg.epochs, lr_now, cfg.lr)
    student.train()
    sums: dict[str, torch.Tensor | float] = {}
    loss_sum, correct, seen = 0.0, 0, 0
    batches = s.data.batches("train", cfg.batch_size, shuffle=True, generator=s.generator,
                             augment=s.data.augment if cfg.augment else None, device=s.device, drop_last=True)
    bar = progress(batches, total=s.iters, desc=f"epoch {epoch + 1}/{cfg.epochs}")
    for batch_idx, (x, y) in enumerate(bar):
        if world > 1:  # this rank's slice of the global batch (DistributedSampler's striding)
            x, y = x[rank::world], y[rank::world]
            # DDP broadcasts rank 0's buffers before each training forward, but the attack's
            # passes come first: give them rank 0's batch-norm statistics too, so every rank
            # attacks the same model and a resumed run (rank 0's checkpoint) is bit-identical
            dist_utils.broadcast_buffers(student)
        x = _to_device_format(x, cfg.channels_last)
        with _autocast(s.device, s.amp):
            parts = s.method.step(student, x, y)
        loss = parts["loss"]
        loss_value = _checked_loss(s, parts, epoch, batch_idx)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under torchrun, DDP averages the gradients over the ranks here
        s.optimizer.step()
        s.scheduler.step()
        if s.ema is not None:
            s.ema.update_parameters(student)
        n = len(y)
        seen += n
        loss_sum += loss_value * n
        correct += int((parts["logits"].argmax(1) == y).sum())
        for key, value in _scalar_parts(parts):
            sums[key] = sums.get(key, 0.0) + value * n
        if hasattr(bar, "set_postfix") and batch_idx % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{s.optimizer.param_groups[0]['lr']:.4g}")
    if world > 1:
        sums, loss_sum, correct, seen = _all_reduce_sums(sums, loss_sum, correct, seen)
    row: dict[str, float] = {"epoch": epoch + 1, "lr": lr_now, "loss": loss_sum / seen}
    row.update({key: float(total) / seen for key, total in sums.items()})
    row["train_acc"] = correct / seen
    return row


def _checked_loss(s: _Session, parts: Mapping[str, torch.Tensor], epoch: int, batch_idx: int) -> float:
    """The step's loss as a float; a :class:`NumericalFault` when it or a logit is not finite."""
    # one device sync for both checks: sum(logits) * 0 is NaN exactly when a logit is NaN or Inf
    loss_value, logits_probe = torch.stack([parts["loss"].detach().float(),
                                            parts["logits"].detach().float().sum() * 0]).tolist()
    if math.isfinite(loss_value) and math.isfinite(logits_probe):
        return loss_value
    what = f"loss ({loss_value})" if not math.isfinite(loss_value) else "logits (NaN or Inf)"
    kept = (f"the checkpoint of epoch {len(s.history)} is kept in {s.ckpt_path}" if s.ckpt_path.is_file()
            else "no checkpoint was written yet")
    raise NumericalFault(f"non-finite {what} at epoch {epoch + 1}, batch {batch_idx + 1} (method {s.method.name}); "
                         f"{kept}; start again with a lower `lr` or without AMP (`amp`) in a new `out` or with "
                         "`force` (a resume keeps the run's settings)")


def _end_epoch(s: _Session, epoch: int, row: dict[str, float], started: float) -> None:
    """Test accuracies of the reported model and the epoch's time (training and this evaluation,
    since ``started``), then the checkpoint, ``summary.csv``, the log and the tracker."""
    reported = s.student if s.ema is None else s.ema.module  # with --ema the average is the reported model
    clean_acc, pgd_acc = _evaluate_epoch(reported, s.x_eval, s.y_eval, s.cfg, s.device, epoch) if s.main else \
        (float("nan"), float("nan"))
    row.update({"test_clean_acc": clean_acc, "test_pgd_acc": pgd_acc,
                "epoch_time_s": time.perf_counter() - started})
    s.history.append(row)
    ckpt = checkpoint_state(epoch + 1, s.student, s.optimizer, s.scheduler, s.generator, s.method, s.history, s.ema)
    if s.main:  # the checkpoint first: summary.csv never lists an epoch the checkpoint lacks
        atomic_torch_save(ckpt, s.ckpt_path)
        _write_summary(s.run_dir / "summary.csv", s.history)
    del ckpt
    dist_utils.barrier()  # the checkpoint is on disk before any rank goes on (or stops)
    logger.info("epoch %d/%d: %s", epoch + 1, s.cfg.epochs,
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
    s.tracker.log_epoch(epoch + 1, row)


def _finish(s: _Session) -> TrainResult:
    """Save the reported student, run the final evaluation (every rank), write ``metrics.json``."""
    cfg, run_dir = s.cfg, s.run_dir
    student = s.student if s.ema is None else s.ema.module  # the moving average (its buffers averaged too)
    student.eval()
    if s.main:
        save_student(student, run_dir / "student.safetensors",
                     extra_metadata={"method": s.method.name, "epochs": cfg.epochs, "teachers": list(s.teacher_models)})
    # every rank takes part (the samples are sharded, the metrics are those of one process); rank 0 writes
    metrics = _final_evaluation(student, s.data, cfg, s.device, run_dir, s.transfer_pool)
    if not s.main:
        s.tracker.close()
        return TrainResult(run_dir, student, s.history, None, True, cfg)
    metrics["training"] = {
        "method": s.method.name,
        "method_config": s.method.config(),
        "student": cfg.student,
        "student_kwargs": cfg.student_kwargs,
        "teachers": list(s.teacher_models),
        "epochs": cfg.epochs,
        "params": sum(p.numel() for p in student.parameters()),
        "dataset": s.data.name,
        "train_seconds": sum(row["epoch_time_s"] for row in s.history),
        "last_epoch": s.history[-1] if s.history else None,
        "model_selection": "last epoch (no selection on the test set)" + (
            f"; exponential moving average of the weights and buffers, decay {cfg.ema}" if cfg.ema else ""),
        "seed": cfg.seed,
        **peak_memory(s.device),
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    (run_dir / FINAL_EVAL_STATE).unlink(missing_ok=True)  # the evaluation is complete and written
    s.tracker.log_final(metrics, cfg.epochs)
    s.tracker.close()
    logger.info("done: %s; peak memory %.0f MB (%s)", ", ".join(f"{k} {v:.4f}" for k, v in metrics["accuracy"].items()),
                metrics["training"]["peak_memory_mb"], metrics["training"]["peak_memory_kind"])
    return TrainResult(run_dir, student, s.history, metrics, True, cfg)


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

"""Teacher training: the trainer with ``standard``, ``fast-at``, ``pgd-at`` or ``trades``, plus a pool entry.

:func:`train_teacher` trains a plain timm classifier (normalization by the dataset's channel
statistics inside the model), writes its weights as a bare timm state dict (``W.safetensors``)
and, beside them, ``W.yaml``: a valid pool file with one entry (name, arch, kwargs, checkpoint,
input_size, mean, std, family, training, eps, notes) whose ``models:`` item can be pasted into any
pool file. The training run (config, summary, checkpoint, metrics) lives in ``W.run/``, so an
interrupted teacher resumes with ``resume=True``.

Example:
    >>> import tempfile, pathlib
    >>> from transfer_analysis.data import make_synthetic
    >>> from transfer_analysis.models import load_pool
    >>> data = make_synthetic(num_classes=3, in_chans=1, image_size=8, n_train=64, n_test=30)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
    >>> entry = train_teacher("resnet18_cifar", data, out, model_kwargs={"width": 4}, epochs=1, batch_size=32,
    ...                       device="cpu", eval_samples=9, final_eval_samples=9)
    >>> entry.name, entry.checkpoint, entry.training
    ('t', 't.safetensors', 'standard')
    >>> sorted(load_pool(out.with_suffix(".yaml"), 3, 1, 8))
    ['t']
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transfer_analysis.data import ImageDataset
from transfer_analysis.errors import UserError
from transfer_analysis.models import PoolEntry
from transfer_analysis.utils import atomic_save_safetensors, atomic_write_text

from .methods import canonical_method_name
from .trainer import TrainConfig, train

__all__ = ["TEACHER_METHODS", "train_teacher", "guess_family", "teacher_paths", "write_pool_entry"]

logger = logging.getLogger(__name__)

TEACHER_METHODS: tuple[str, ...] = ("standard", "fast-at", "pgd-at", "trades")
TEACHER_FINAL_ATTACKS: tuple[str, ...] = ("clean", "pgd20")

_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("transformer", ("vit", "deit", "swin", "beit", "cait", "eva", "xcit", "levit", "pit_", "tnt", "twins",
                     "crossvit", "convit", "coat", "mvit", "efficientformer", "maxvit", "fastvit", "hiera")),
    ("mlp", ("mixer", "resmlp", "gmlp", "mlp")),
)


def guess_family(arch: str) -> str:
    """A family label from the architecture's name: ``transformer``, ``mlp`` or ``cnn``.

    Example:
        >>> guess_family("vit_tiny_patch16_224"), guess_family("mixer_b16_224"), guess_family("resnet18_cifar")
        ('transformer', 'mlp', 'cnn')
    """
    name = arch.lower()
    for family, keys in _FAMILIES:
        if any(k in name for k in keys):
            return family
    return "cnn"


def teacher_paths(out: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(weights, pool entry YAML, run directory)`` for ``--out W.safetensors``."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"`out` must name a .safetensors file (e.g. teachers/vit_a.safetensors), got {out}")
    stem = out.with_suffix("")
    return out, stem.with_name(stem.name + ".yaml"), stem.with_name(stem.name + ".run")


def write_pool_entry(entry: PoolEntry, path: str | os.PathLike) -> Path:
    """Write ``entry`` as a one-model pool file (its ``models:`` item pastes into any pool file)."""
    import yaml

    path = Path(path)
    text = ("# Pool entry written by `darht train-teacher`. `checkpoint` is relative to this file's folder:\n"
            "# adjust it when pasting the item below into a pool file elsewhere.\n")
    text += yaml.safe_dump({"models": [entry.to_dict()]}, sort_keys=False)
    atomic_write_text(path, text)
    return path


def train_teacher(arch: str, dataset: str | ImageDataset, out: str | os.PathLike, *, method: str = "standard",
                  model_kwargs: Mapping[str, Any] | None = None, epochs: int | None = None,
                  eps: float | str = 8 / 255, batch_size: int | None = None, lr: float | None = None,
                  name: str | None = None, family: str | None = None, method_kwargs: Mapping[str, Any] | None = None,
                  final_attacks: Sequence[str] = TEACHER_FINAL_ATTACKS, final_eval_samples: int | None = 1000,
                  input_size: int | Sequence[int] | None = None, resume: bool = False, force: bool = False,
                  **config: Any) -> PoolEntry:
    """Train a teacher and write ``W.safetensors``, ``W.yaml`` (pool entry) and ``W.run/``.

    Args:
        arch: timm architecture (or a registered CIFAR one).
        dataset: dataset name or ``.npz`` path (see ``load_dataset``), or an already loaded
            :class:`~transfer_analysis.data.ImageDataset`.
        out: the weights file, ``*.safetensors``.
        method: ``standard``, ``fast-at``, ``pgd-at`` or ``trades``.
        model_kwargs: passed to ``timm.create_model``.
        input_size: build the model for this input size and resize images to it inside the model
            (the pool entry's ``input_size``), e.g. 32 for a ConvNeXt on 28x28 Fashion-MNIST, whose
            stride-32 stem and stages leave nothing of a 28x28 image. Default: the data's size.
        epochs, eps, batch_size, lr: training settings (``None``: the method's reference protocol).
        name: the pool name (default: the file's stem). family: label (default: guessed from arch).
        method_kwargs: the method's hyperparameters (``steps``, ``beta``...).
        final_attacks, final_eval_samples: the evaluation written to ``W.run/metrics.json`` and
            summarized in the entry's ``notes``.
        resume, force: continue an interrupted run / replace existing outputs.
        **config: any other :class:`~distill.trainer.TrainConfig` field (``device``, ``seed``,
            ``lr_schedule``, ``eval_samples``, ``amp``...).

    Returns:
        The :class:`~transfer_analysis.models.PoolEntry` written to ``W.yaml``.

    Example: see the module docstring.
    """
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise UserError(f"train_teacher: unknown option {unknown[0]!r}; see distill.trainer.TrainConfig")
    dataset_obj = dataset if isinstance(dataset, ImageDataset) else None
    dataset_name = dataset.name if isinstance(dataset, ImageDataset) else str(dataset)
    key = canonical_method_name(method)
    if key not in TEACHER_METHODS:
        raise UserError(f"teacher method must be one of {', '.join(TEACHER_METHODS)}, got {method!r}")
    weights, entry_path, run_dir = teacher_paths(out)
    from transfer_analysis.rundir import check_output_path

    check_output_path(weights)
    if input_size is not None:
        sizes = [input_size] if isinstance(input_size, int) else list(input_size) \
            if isinstance(input_size, (list, tuple)) else [None]
        if len(sizes) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                               for v in sizes):
            raise UserError(f"input_size must be a positive integer or (height, width), got {input_size!r}")
    if not resume and not force:
        for p in (weights, entry_path):
            if p.exists():
                raise UserError(f"{p} already exists; pass `force` to replace it (or `resume` to finish its run)")
    entry_name = name or weights.stem
    from transfer_analysis.models import check_model_name

    check_model_name(entry_name, "train_teacher (`name`, default the file's stem)")
    if model_kwargs and "input_size" in model_kwargs:
        raise UserError("train_teacher: pass input_size as its own argument, not inside model_kwargs")
    student_kwargs = {**dict(model_kwargs or {}), **({"input_size": input_size} if input_size is not None else {})}
    cfg = TrainConfig(method=key, student=arch, dataset=dataset_name, student_kwargs=student_kwargs,
                      method_kwargs=dict(method_kwargs or {}), epochs=epochs, batch_size=batch_size, lr=lr, eps=eps,
                      final_attacks=list(final_attacks), final_eval_samples=final_eval_samples, **config)
    # (a resume of a run that finished before its weights were written only writes them)
    result = train(cfg, run_dir, resume=resume, force=force, dataset=dataset_obj)
    if not result.completed:  # pragma: no cover - only with stop_after_epochs
        raise UserError(f"teacher training of {entry_name} stopped early; finish it with `resume`")
    student = result.student
    spec = student.spec
    atomic_save_safetensors(student.timm_model.state_dict(), weights,
                            metadata={"arch": arch, "training": key, "darht_run": str(run_dir.name)})
    metrics = result.metrics or {}
    acc = metrics.get("accuracy", {})
    notes = ", ".join(f"{k} acc {v:.4f}" for k, v in acc.items())
    if notes:
        notes += f" on {metrics.get('n')} test images at eps {result.config.eps:.6g}; "
    notes += f"{result.config.epochs} epochs of {key} (run: {run_dir.name}/)"
    image_size = spec.get("input_size") or spec["image_size"]  # what the model itself takes
    entry = PoolEntry(
        name=entry_name,
        arch=arch,
        kwargs={k: v for k, v in dict(model_kwargs or {}).items() if k != "pretrained"},  # the checkpoint has all
        checkpoint=weights.name,
        input_size=int(image_size[0]) if image_size and image_size[0] == image_size[1] else image_size,
        mean=spec["mean"],
        std=spec["std"],
        family=family or guess_family(arch),
        training=key,
        eps=None if key == "standard" else float(result.config.eps),
        notes=notes,
    )
    write_pool_entry(entry, entry_path)
    logger.info("teacher %s: weights %s, pool entry %s", entry_name, weights, entry_path)
    return entry

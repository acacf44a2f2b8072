"""Students: any timm backbone, optionally followed by DARHT's student-teacher feature map.

A DARHT student is a timm model built with ``num_classes=0`` (it returns pooled features of size
``d``) followed by the :class:`StudentTeacherFeatureMap`: ``Linear(d, K*C)`` then ``Linear(K*C, C)``
for K teachers and C classes. Slice k of the map (shape ``(N, C)``) stands for teacher k's logits;
the second layer turns the whole map into the student's final logits. A baseline student
(``num_teachers`` 0 or ``None``) is a plain timm classifier.

Like every model of the toolkit, a student takes images in [0, 1] at the dataset's resolution:
resizing (optional) and normalization happen inside ``forward``, through the pool's
:class:`~transfer_analysis.models.PixelSpaceModel` wrapper around the backbone.

Example:
    >>> import torch
    >>> student = build_student("resnet18_cifar", num_classes=10, num_teachers=3, in_chans=1, width=4)
    >>> x = torch.rand(2, 1, 12, 12)
    >>> student(x).shape
    torch.Size([2, 10])
    >>> logits, fmap = student.forward_with_map(x)
    >>> tuple(fmap.shape)
    (2, 3, 10)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_analysis.errors import UserError
from transfer_analysis.models import PixelSpaceModel, apply_state_dict, create_timm_model, load_state_dict_file

__all__ = [
    "StudentTeacherFeatureMap",
    "Student",
    "build_student",
    "load_student",
    "save_student",
    "data_parallel",
    "STUDENT_METADATA_KEY",
]

logger = logging.getLogger(__name__)

#: Key of the safetensors metadata entry that holds the student's spec (JSON).
STUDENT_METADATA_KEY = "darht_student"


class StudentTeacherFeatureMap(nn.Module):
    """DARHT's head: pooled features ``(N, d)`` -> map ``(N, K, C)`` -> final logits ``(N, C)``.

    ``map = Linear(d, K*C)(features)`` viewed as ``(N, K, C)``; ``logits = Linear(K*C, C)(map)``.

    Example:
        >>> head = StudentTeacherFeatureMap(num_features=8, num_classes=5, num_teachers=2)
        >>> logits, fmap = head(torch.rand(3, 8))
        >>> tuple(logits.shape), tuple(fmap.shape)
        ((3, 5), (3, 2, 5))
    """

    def __init__(self, num_features: int, num_classes: int, num_teachers: int) -> None:
        super().__init__()
        if num_features <= 0 or num_classes <= 0 or num_teachers <= 0:
            raise ValueError(f"num_features, num_classes and num_teachers must be positive, got "
                             f"{num_features}, {num_classes}, {num_teachers}")
        self.num_features = num_features
        self.num_classes = num_classes
        self.num_teachers = num_teachers
        self.map = nn.Linear(num_features, num_teachers * num_classes)
        self.classifier = nn.Linear(num_teachers * num_classes, num_classes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits (N, C), map (N, K, C))``."""
        flat = self.map(features)
        logits = self.classifier(flat)
        return logits, flat.view(-1, self.num_teachers, self.num_classes)

    def extra_repr(self) -> str:
        return f"d={self.num_features}, K={self.num_teachers}, C={self.num_classes}"


class Student(nn.Module):
    """A student model in pixel space: backbone (resize + normalize inside) and optional feature map.

    ``forward(x)`` returns the final logits ``(N, C)``; ``forward_with_map(x)`` returns
    ``(logits, map)`` with ``map`` shaped ``(N, K, C)`` (only when built with teachers).
    ``spec`` holds what :func:`build_student` needs to rebuild it (saved with the weights).

    Example:
        >>> s = build_student("resnet18_cifar", num_classes=4, num_teachers=None, in_chans=1, width=4)
        >>> s.has_map, s(torch.rand(2, 1, 8, 8)).shape
        (False, torch.Size([2, 4]))
    """

    def __init__(self, backbone: PixelSpaceModel, feature_map: StudentTeacherFeatureMap | None,
                 spec: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_map = feature_map
        self.spec: dict[str, Any] = dict(spec or {})

    @property
    def has_map(self) -> bool:
        """Whether the student has a student-teacher feature map (a DARHT student)."""
        return self.feature_map is not None

    @property
    def num_teachers(self) -> int:
        """K, the number of teachers the map has slices for (0 for a plain classifier)."""
        return 0 if self.feature_map is None else self.feature_map.num_teachers

    @property
    def timm_model(self) -> nn.Module:
        """The timm model inside the pixel-space wrapper."""
        return self.backbone.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ddp = self._data_parallel()
        return self._forward(x) if ddp is None else ddp(x)

    def forward_with_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final logits ``(N, C)`` and the student-teacher map ``(N, K, C)``."""
        if self.feature_map is None:
            raise RuntimeError("this student has no student-teacher feature map; build it with num_teachers >= 1")
        ddp = self._data_parallel()
        return self._forward(x, with_map=True) if ddp is None else ddp(x, with_map=True)

    def _forward(self, x: torch.Tensor, with_map: bool = False) -> Any:
        if self.feature_map is None:
            return self.backbone(x)
        out = self.feature_map(self.backbone(x))
        return out if with_map else out[0]

    def _data_parallel(self) -> nn.Module | None:
        """The DDP wrapper that training forwards go through (see :func:`data_parallel`), else None.

        Only forwards in train mode with gradients enabled take it: an attack's passes (eval mode,
        gradients w.r.t. the input only) and no-grad forwards stay local, as DDP requires.
        """
        ddp = self.__dict__.get("_ddp")
        return ddp if ddp is not None and self.training and torch.is_grad_enabled() else None


class _DDPEntry(nn.Module):
    """What DDP wraps: the student's own forward, so DDP's hooks see every training forward."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor, with_map: bool = False) -> Any:
        return self.student._forward(x, with_map=with_map)


@contextlib.contextmanager
def data_parallel(student: Student, device: torch.device) -> Iterator[nn.Module]:
    """Inside the block, the student's training forwards run through ``DistributedDataParallel``.

    DDP wraps the student only (teachers stay plain and frozen on every rank). A step may call the
    student many times (attack passes, then one or two training forwards); only the training
    forwards (train mode, gradients on) go through DDP, so ``loss.backward()`` averages the
    gradients over the ranks in DDP's buckets and rank 0's buffers (batch-norm statistics) are
    broadcast before each of them. The student's ``state_dict`` is unchanged (DDP is not a
    submodule). ``find_unused_parameters`` is on for a student with a feature map, whose map
    slices get no gradient in DARHT's CE phase. Needs an initialized process group.

    Example (one process, gloo)::

        with data_parallel(student, torch.device("cpu")):
            loss = F.cross_entropy(student(x), y)   # through DDP
            loss.backward()                          # gradients averaged over the ranks
    """
    from torch.nn.parallel import DistributedDataParallel

    # DDP's default syncs rank 0's buffers before each forward (the argument's name changed in torch 2.15)
    ddp = DistributedDataParallel(_DDPEntry(student), device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=student.has_map)
    object.__setattr__(student, "_ddp", ddp)  # a plain attribute: not a submodule, no cycle in modules()
    try:
        yield ddp
    finally:
        student.__dict__.pop("_ddp", None)


def _feature_dim(model: nn.Module, in_chans: int, probe_size: tuple[int, int]) -> int:
    """Width of what ``model`` (built with ``num_classes=0``) returns, measured with one probe."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_chans, *probe_size))
    except Exception as err:  # noqa: BLE001 - any failure here is an arch/kwargs/size mismatch
        raise UserError(f"student backbone fails on {in_chans}x{probe_size[0]}x{probe_size[1]} images: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; check the "
                        "student kwargs (e.g. img_size, patch_size) and input_size") from err
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise UserError(f"student backbone returns features of shape {tuple(out.shape)} with num_classes=0, "
                        "not (N, d); choose a timm architecture with a pooled feature output")
    return int(out.shape[1])


def _hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def build_student(arch: str, num_classes: int, num_teachers: int | None = None, in_chans: int = 3,
                  image_size: int | Sequence[int] | None = None, input_size: int | Sequence[int] | None = None,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  **timm_kwargs: Any) -> Student:
    """Build a student for any timm architecture (including the toolkit's registered CIFAR ones).

    Args:
        arch: timm name, e.g. ``resnet18_cifar``, ``vit_tiny_patch16_224``.
        num_classes: C.
        num_teachers: K. With K >= 1 the backbone is built with ``num_classes=0`` and followed by a
            :class:`StudentTeacherFeatureMap`; 0 or ``None`` gives a plain timm classifier.
        in_chans: image channels.
        image_size: the dataset's image size (sets ``img_size`` for fixed-size architectures such as
            ViT, and the size of the probe that measures the feature width).
        input_size: resize inputs to this inside ``forward`` (default: no resizing).
        mean, std: per-channel normalization inside ``forward`` (default: none, inputs stay in [0, 1]).
        **timm_kwargs: passed to ``timm.create_model`` (``width``, ``drop_rate``, ``patch_size``...);
            ``pretrained=True`` starts from timm's pretrained weights (any timm name, ``hf-hub:``,
            ``local-dir:``) with a new head for ``num_classes`` (fine-tuning). It is recorded in the
            spec, and :func:`load_student` rebuilds the architecture without downloading anything.

    Example:
        >>> s = build_student("resnet18_cifar", 10, 2, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, width=4)
        >>> s.forward_with_map(torch.rand(1, 3, 16, 16))[1].shape
        torch.Size([1, 2, 10])
    """
    k = int(num_teachers or 0)
    if k < 0:
        raise UserError(f"num_teachers must be >= 0, got {num_teachers}")
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if (mean is None) != (std is None):
        raise UserError("student normalization: give both mean and std, or neither")
    if std is not None and any(float(s) <= 0 for s in std):
        raise UserError(f"student normalization: std values must be positive, got {list(std)}")
    size_hw = _hw(input_size) or _hw(image_size)
    timm_kwargs = dict(timm_kwargs)
    pretrained = bool(timm_kwargs.pop("pretrained", False))
    backbone = create_timm_model(arch, num_classes=0 if k else num_classes, in_chans=in_chans, pretrained=pretrained,
                                 image_size=(size_hw[0] if size_hw and size_hw[0] == size_hw[1] else size_hw),
                                 **dict(timm_kwargs))
    feature_map = None
    if k:
        probe = size_hw
        if probe is None:
            cfg_size = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size", (in_chans, 32, 32))
            probe = (int(cfg_size[-2]), int(cfg_size[-1]))
        d = _feature_dim(backbone, in_chans, probe)
        feature_map = StudentTeacherFeatureMap(d, num_classes, k)
    wrapped = PixelSpaceModel(backbone, _hw(input_size), None if mean is None else [float(m) for m in mean],
                              None if std is None else [float(s) for s in std], name="student")
    spec = {
        "arch": arch,
        "kwargs": dict(timm_kwargs),
        "num_classes": int(num_classes),
        "num_teachers": k,
        "in_chans": int(in_chans),
        "image_size": list(_hw(image_size)) if image_size is not None else None,
        "input_size": list(_hw(input_size)) if input_size is not None else None,
        "mean": None if mean is None else [float(m) for m in mean],
        "std": None if std is None else [float(s) for s in std],
    }
    if pretrained:
        spec["pretrained"] = True  # how it started; load_student rebuilds the architecture only
    return Student(wrapped, feature_map, spec)


def save_student(student: Student, path: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a student's weights as safetensors, with its spec in the metadata (atomically).

    :func:`load_student` rebuilds it from that file alone.
    """
    from transfer_analysis.utils import atomic_save_safetensors

    meta = {STUDENT_METADATA_KEY: json.dumps(student.spec)}
    if extra_metadata:
        meta.update({str(k): json.dumps(v) for k, v in extra_metadata.items()})
    path = Path(path)
    atomic_save_safetensors(student.state_dict(), path, metadata=meta)
    return path


def load_student(path: str | os.PathLike, device: torch.device | str = "cpu") -> Student:
    """Rebuild a student from ``student.safetensors`` (or a run directory holding one).

    The returned model is in eval mode with frozen parameters (ready for evaluation).

    Example:
        >>> import tempfile, pathlib
        >>> s = build_student("resnet18_cifar", 4, 2, in_chans=1, width=4)
        >>> p = save_student(s, pathlib.Path(tempfile.mkdtemp()) / "student.safetensors")
        >>> t = load_student(p)
        >>> x = torch.rand(2, 1, 8, 8)
        >>> bool(torch.equal(s.eval()(x), t(x)))
        True
    """
    path = Path(path)
    if path.is_dir():
        path = path / "student.safetensors"
    if not path.is_file():
        raise UserError(f"student weights not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # noqa: BLE001 - corrupt headers come as several exception types
        raise UserError(f"{path} is not a valid safetensors file ({err}); re-create it") from err
    if STUDENT_METADATA_KEY not in meta:
        raise UserError(f"{path} has no student spec in its metadata (not written by darht distill); load it "
                        "through a pool entry (arch, kwargs, checkpoint) instead")
    spec = json.loads(meta[STUDENT_METADATA_KEY])
    student = build_student(spec["arch"], spec["num_classes"], spec["num_teachers"], in_chans=spec["in_chans"],
                            image_size=spec.get("image_size"), input_size=spec.get("input_size"),
                            mean=spec.get("mean"), std=spec.get("std"), **spec.get("kwargs", {}))
    apply_state_dict(student, load_state_dict_file(path), what=f"student weights {path}")
    student.eval().requires_grad_(False)
    return student.to(device)

"""The in-memory dataset (:class:`ImageDataset`), training augmentation and the checks every dataset
passes, wherever it came from.

Images are kept as uint8 (a quarter of the memory of float32) and converted to float in [0, 1] per
batch, shape (N, C, H, W).

Example:
    >>> from transfer_analysis.data import make_synthetic
    >>> ds = make_synthetic(num_classes=3, in_chans=1, image_size=8, n_train=60, n_test=30)
    >>> ds.test_images().shape, ds.num_classes, ds.has_train
    (torch.Size([30, 1, 8, 8]), 3, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["Augment", "ImageDataset", "SplitAccess", "augment_batch", "channel_stats", "check_dataset", "default_augment",
           "float_batch", "shuffled_order"]


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop with zero padding, then horizontal flip.

    ``crop_padding=0`` and ``flip=False`` is no augmentation.
    """

    crop_padding: int = 0
    flip: bool = False

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip


def shuffled_order(n: int, indices: torch.Tensor | None, shuffle: bool,
                   generator: torch.Generator | None) -> torch.Tensor:
    """The order in which a split's batches visit its images: ``indices`` (or all ``n``), permuted by
    ``generator`` when ``shuffle``. The one rule for in-memory and streamed datasets alike, so a run
    sees the same batches whichever it uses."""
    order = indices if indices is not None else torch.arange(n)
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    return order


class SplitAccess:
    """What every dataset serves the same way from its ``_split(split) -> (images or files, labels)``
    and its ``images``: labels, the per-split shorthands, and the float batch a training step gets."""

    def _split(self, split: str) -> tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def images(self, split: str = "test", indices: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def labels(self, split: str = "test", indices: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Int64 labels of a split (optionally a subset), on ``device``."""
        _, y = self._split(split)
        return (y if indices is None else y[indices]).to(device=device)

    def train_images(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.images("train", indices)

    def test_images(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.images("test", indices)


def float_batch(xb: torch.Tensor, yb: torch.Tensor, augment: Augment | None, generator: torch.Generator | None,
                device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 batch as float in [0, 1] on ``device``, augmented there when asked (the one rule for
    every dataset's ``batches``)."""
    xb = xb.to(device=device, non_blocking=True).float().div_(255)
    if augment is not None and augment.enabled:
        xb = augment_batch(xb, augment, generator=generator)
    return xb, yb.to(device=device, non_blocking=True)


@dataclass
class ImageDataset(SplitAccess):
    """A dataset held in memory: uint8 images (N, C, H, W) and int64 labels for both splits."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: Augment = field(default_factory=Augment)
    class_names: tuple[str, ...] | None = None

    #: the pixel-space options of an image folder; an in-memory dataset has none
    options: Any = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(f"x_{split} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} must have shape ({x.shape[0]},), got {tuple(y.shape)}")

    @property
    def has_train(self) -> bool:
        """Whether there is a training split: an in-memory dataset always has one (an empty one is
        refused by :func:`check_dataset`)."""
        return True

    @property
    def in_chans(self) -> int:
        return int(self.x_test.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the (square) images; for non-square images, the height."""
        return int(self.x_test.shape[2])

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def images(self, split: str = "test", indices: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Float images in [0, 1] of a split (optionally a subset), on ``device``."""
        x, _ = self._split(split)
        if indices is not None:
            x = x[indices]
        return x.to(device=device).float().div_(255)

    def batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None, shuffle: bool = False,
                generator: torch.Generator | None = None, augment: Augment | None = None,
                device: torch.device | str | None = None, drop_last: bool = False,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches (float in [0, 1]) of a split, in order or shuffled by ``generator``.

        Augmentation, when given, runs on the batch on ``device`` with the same generator.
        """
        x_all, y_all = self._split(split)
        order = shuffled_order(len(y_all), indices, shuffle, generator)
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield float_batch(x_all[idx], y_all[idx], augment, generator, device)

    def with_train_subset(self, n: int | None, seed: int = 0) -> ImageDataset:
        """The same dataset with a seeded class-balanced subset of ``n`` training images.

        ``None`` (or ``n`` at least the training-set size) returns ``self``. The test split is kept.

        Example:
            >>> from transfer_analysis.data import make_synthetic
            >>> ds = make_synthetic(num_classes=2, in_chans=1, image_size=4, n_train=10, n_test=4)
            >>> len(ds.with_train_subset(6).y_train)
            6
        """
        from .sampling import balanced_subset

        if n is None or n >= len(self.y_train):
            return self
        return self.select_train(balanced_subset(self.y_train, n, seed))

    def select_train(self, indices: torch.Tensor) -> ImageDataset:
        """The same dataset with only the training images at ``indices`` (in that order); the test
        split is kept."""
        return dataclasses.replace(self, x_train=self.x_train[indices], y_train=self.y_train[indices])

    def holdout(self, n: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """``(rest, validation)``: the dataset without a seeded class-balanced ``n`` of its training
        images, and a dataset whose *test* split is those ``n`` (so a run evaluated on "test" is
        evaluated on the held-out images, never on the real test set)."""
        from .sampling import holdout_indices

        kept, held = holdout_indices(self.y_train, n, seed)
        rest = self.select_train(kept)
        return rest, dataclasses.replace(rest, x_test=self.x_train[held], y_test=self.y_train[held])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images (for a model's normalization)."""
        return channel_stats(self.x_train[i:i + 8192] for i in range(0, len(self.x_train), 8192))


def channel_stats(chunks: Any) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (rounded to 4 decimals) over uint8 (N, C, H, W) chunks, in float64.

    Example:
        >>> channel_stats([torch.tensor([[[[0, 255]]]], dtype=torch.uint8)])
        ([0.5], [0.5])
    """
    total = total_sq = None
    count = 0
    for chunk in chunks:
        x = chunk.double().div_(255)
        s, sq = x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if total is None or count == 0:
        raise UserError("no training images to compute the channel statistics from")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def augment_batch(x: torch.Tensor, augment: Augment, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, vectorized.

    Random numbers are drawn on the CPU from ``generator`` so the result does not depend on the
    device.

    Example:
        >>> x = torch.rand(4, 3, 8, 8)
        >>> augment_batch(x, Augment(crop_padding=2, flip=True), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 8, 8])
    """
    n, _, h, w = x.shape
    if augment.crop_padding > 0:
        p = augment.crop_padding
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device)[None, :])  # (n, h)
        cols = (ox[:, None] + torch.arange(w, device=x.device)[None, :])  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    if augment.flip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def default_augment(name: str) -> Augment:
    """The standard augmentation of a named dataset: random crop with padding (an eighth of the side,
    2 px for 28 px Fashion-MNIST) and flips; none for synthetic patterns and user files, whose
    symmetries are unknown."""
    if name in ("cifar10", "cifar100"):
        return Augment(crop_padding=4, flip=True)
    if name == "tiny-imagenet":
        return Augment(crop_padding=8, flip=True)
    if name == "fashion-mnist":
        return Augment(crop_padding=2, flip=True)
    return Augment()


def check_dataset(ds: Any, where: str) -> Any:
    """Refuse a dataset no run can use, wherever it came from: an empty test split, an empty training
    split where there is one, fewer than two classes, labels outside ``0 .. num_classes - 1``, or a
    test class with no training image.

    A test-only dataset (an image folder without splits: ``has_train`` is False) is checked on its
    test split alone.

    Example:
        >>> from transfer_analysis.data import make_synthetic
        >>> ds = make_synthetic(num_classes=3, in_chans=1, image_size=4, n_train=6, n_test=3)
        >>> check_dataset(ds, "synthetic").num_classes
        3
    """
    splits = ("train", "test") if getattr(ds, "has_train", True) else ("test",)
    for split in ("train", "test"):
        if split in splits and len(getattr(ds, f"y_{split}")) == 0:
            raise UserError(f"dataset {where}: the {split} split has no images")
    if ds.num_classes < 2:
        raise UserError(f"dataset {where}: {ds.num_classes} class; classification needs at least 2")
    for split in splits:
        y = getattr(ds, f"y_{split}")
        if int(y.min()) < 0 or int(y.max()) >= ds.num_classes:
            raise UserError(f"dataset {where}: y_{split} has labels outside 0..{ds.num_classes - 1} (e.g. "
                            f"{int(y.max()) if int(y.max()) >= ds.num_classes else int(y.min())}), the classes "
                            "of the training split")
    if "train" in splits:
        missing = sorted(set(torch.unique(ds.y_test).tolist()) - set(torch.unique(ds.y_train).tolist()))
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise UserError(f"dataset {where}: test labels {shown} have no training image; every test class must "
                            "appear in y_train")
    return ds

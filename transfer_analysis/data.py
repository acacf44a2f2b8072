"""Datasets as uint8 tensors in memory, served as float images in [0, 1], shape (N, C, H, W).

Names (``--dataset``): ``cifar10``, ``cifar100``, ``tiny-imagenet``, ``fashion-mnist``,
``synthetic[:key=value,...]`` or a path to an ``.npz`` file with ``x_train, y_train, x_test,
y_test`` (uint8 images (N, H, W) or (N, H, W, C), integer labels).

Images are kept as uint8 (a quarter of the memory of float32) and converted per batch.

Example:
    >>> ds = load_dataset("synthetic:num_classes=3,in_chans=1,image_size=8,n_train=60,n_test=30")
    >>> ds.test_images().shape, ds.num_classes
    (torch.Size([30, 1, 8, 8]), 3)
    >>> idx = balanced_subset(ds.y_test, 9, seed=0)
    >>> torch.bincount(ds.y_test[idx]).tolist()
    [3, 3, 3]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UserError
from .utils import atomic_write_json

__all__ = [
    "DATASET_NAMES",
    "check_dataset",
    "Augment",
    "ImageDataset",
    "load_dataset",
    "make_synthetic",
    "balanced_subset",
    "save_indices",
    "load_indices",
    "augment_batch",
    "default_data_root",
    "dataset_shape",
]

logger = logging.getLogger(__name__)

DATASET_NAMES = ("cifar10", "cifar100", "tiny-imagenet", "fashion-mnist", "synthetic")


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


@dataclass
class ImageDataset:
    """A dataset held in memory: uint8 images (N, C, H, W) and int64 labels for both splits."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: Augment = field(default_factory=Augment)
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(f"x_{split} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} must have shape ({x.shape[0]},), got {tuple(y.shape)}")

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

    def labels(self, split: str = "test", indices: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        _, y = self._split(split)
        if indices is not None:
            y = y[indices]
        return y.to(device=device)

    def train_images(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.images("train", indices)

    def test_images(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.images("test", indices)

    def batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None, shuffle: bool = False,
                generator: torch.Generator | None = None, augment: Augment | None = None,
                device: torch.device | str | None = None, drop_last: bool = False,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches (float in [0, 1]) of a split, in order or shuffled by ``generator``.

        Augmentation, when given, runs on the batch on ``device`` with the same generator.
        """
        x_all, y_all = self._split(split)
        order = indices if indices is not None else torch.arange(len(y_all))
        if shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            xb = x_all[idx].to(device=device, non_blocking=True).float().div_(255)
            yb = y_all[idx].to(device=device, non_blocking=True)
            if augment is not None and augment.enabled:
                xb = augment_batch(xb, augment, generator=generator)
            yield xb, yb

    def with_train_subset(self, n: int | None, seed: int = 0) -> ImageDataset:
        """The same dataset with a seeded class-balanced subset of ``n`` training images.

        ``None`` (or ``n`` at least the training-set size) returns ``self``. The test split is kept.

        Example:
            >>> ds = make_synthetic(num_classes=2, in_chans=1, image_size=4, n_train=10, n_test=4)
            >>> len(ds.with_train_subset(6).y_train)
            6
        """
        if n is None or n >= len(self.y_train):
            return self
        idx = balanced_subset(self.y_train, n, seed)
        return dataclasses.replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images (for a model's normalization)."""
        x = self.x_train
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for start in range(0, len(x), 8192):
            chunk = x[start:start + 8192].double().div_(255)
            total += chunk.sum(dim=(0, 2, 3))
            total_sq += chunk.pow(2).sum(dim=(0, 2, 3))
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
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


def _default_augment(name: str, image_size: int) -> Augment:
    if name in ("cifar10", "cifar100"):
        return Augment(crop_padding=4, flip=True)
    if name == "tiny-imagenet":
        return Augment(crop_padding=8, flip=True)
    if name == "fashion-mnist":
        return Augment(crop_padding=2, flip=True)
    return Augment()  # synthetic patterns and user .npz files: no assumption about symmetry


# --------------------------------------------------------------------------------------------
# subsets
# --------------------------------------------------------------------------------------------
def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Seeded class-balanced subset of ``n`` indices (sorted); all indices in order if ``n >= len``.

    Each class gets ``n // C`` samples; the remainder goes to classes drawn by the seed. A class
    with too few samples gives all it has and the others make up the difference.

    Example:
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
        >>> torch.bincount(y[balanced_subset(y, 6, seed=1)]).tolist()
        [2, 2, 2]
    """
    labels = torch.as_tensor(labels).long().cpu()
    total = len(labels)
    if n <= 0:
        raise UserError(f"`n` (the number of images) must be a positive integer, got {n}")
    if n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(labels)
    pools = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    pools = {c: p[torch.randperm(len(p), generator=g)] for c, p in pools.items()}
    quota = {c: 0 for c in pools}
    remaining = n
    # Fill round by round: each round gives every class with samples left an equal share, and the
    # leftover of a round to classes drawn by the seed.
    while remaining > 0:
        open_classes = [c for c in pools if quota[c] < len(pools[c])]
        share, extra = divmod(remaining, len(open_classes))
        lucky = set(torch.tensor(open_classes)[torch.randperm(len(open_classes), generator=g)[:extra]].tolist())
        for c in open_classes:
            take = min(share + (1 if c in lucky else 0), len(pools[c]) - quota[c])
            quota[c] += take
            remaining -= take
    chosen = torch.cat([pools[c][:quota[c]] for c in pools])
    return torch.sort(chosen).values


def save_indices(path: str | os.PathLike, indices: torch.Tensor, **meta: Any) -> None:
    """Save evaluation indices (and what they index) as JSON, atomically."""
    atomic_write_json(path, {**meta, "n": int(len(indices)), "indices": [int(i) for i in indices]})


def load_indices(path: str | os.PathLike) -> torch.Tensor:
    """Load indices written by :func:`save_indices`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        values = data["indices"]
    except FileNotFoundError as err:
        raise UserError(f"indices file not found: {path}") from err
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not an indices file written by the toolkit ({err})") from err
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
        raise UserError(f"{path}: 'indices' must be a list of non-negative integers (no fractions, which would be "
                        "truncated to other images)")
    return torch.tensor(values, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
_KNOWN_SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "tiny-imagenet": (3, 64, 200),
                 "fashion-mnist": (1, 28, 10)}


def dataset_shape(name: str | os.PathLike) -> tuple[int, int, int]:
    """``(in_chans, image_size, num_classes)`` of a dataset, without loading a named one.

    Example:
        >>> dataset_shape("cifar100"), dataset_shape("synthetic:in_chans=1,image_size=8")
        ((3, 32, 100), (1, 8, 10))
    """
    spec = str(name)
    base, _, options = spec.partition(":")
    if base.strip().lower() in _KNOWN_SHAPES and not options:
        return _KNOWN_SHAPES[base.strip().lower()]
    if base.strip().lower() == "synthetic":
        opts = {"in_chans": 3, "image_size": 32, "num_classes": 10, **_parse_options(options)}
        return opts["in_chans"], opts["image_size"], opts["num_classes"]
    ds = load_dataset(spec, download=False)
    return ds.in_chans, ds.image_size, ds.num_classes


def default_data_root() -> Path:
    """``$DARHT_DATA`` or ``~/.cache/darht/data``."""
    return Path(os.environ.get("DARHT_DATA", Path.home() / ".cache" / "darht" / "data"))


def load_dataset(name: str | os.PathLike, data_root: str | os.PathLike | None = None, download: bool = True,
                 ) -> ImageDataset:
    """Load a dataset by name (see the module docstring) or from an ``.npz`` path.

    Raises :class:`UserError` with where to put the files when a dataset is missing and cannot be
    downloaded.
    """
    from .dataset_files import _load_cifar, _load_fashion_mnist, _load_npz, _load_tiny_imagenet

    spec = str(name)
    root = Path(data_root) if data_root is not None else default_data_root()
    if spec.endswith(".npz") or (Path(spec).suffix == ".npz"):
        return check_dataset(_load_npz(Path(spec)), spec)
    base, _, options = spec.partition(":")
    base = base.strip().lower()
    if base == "synthetic":
        return check_dataset(make_synthetic(**_parse_options(options)), spec)
    if options:
        raise UserError(f"dataset {base!r} takes no options (got {spec!r})")
    if base in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return check_dataset(_load_fashion_mnist(root, data_root is not None, download), spec)
    if base in ("cifar10", "cifar100"):
        return check_dataset(_load_cifar(base, root, download), spec)
    if base in ("tiny-imagenet", "tiny_imagenet", "tinyimagenet"):
        return check_dataset(_load_tiny_imagenet(root, download), spec)
    import difflib

    close = difflib.get_close_matches(base, DATASET_NAMES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"unknown dataset {spec!r}; {hint}choose one of {', '.join(DATASET_NAMES)} or a .npz path")


def check_dataset(ds: ImageDataset, where: str) -> ImageDataset:
    """Refuse a dataset no run can use, wherever it came from: an empty split, fewer than two classes,
    labels outside ``0 .. num_classes - 1``, or a test class with no training image.

    Example:
        >>> ds = make_synthetic(num_classes=3, in_chans=1, image_size=4, n_train=6, n_test=3)
        >>> check_dataset(ds, "synthetic").num_classes
        3
    """
    for split in ("train", "test"):
        if len(getattr(ds, f"y_{split}")) == 0:
            raise UserError(f"dataset {where}: the {split} split has no images")
    if ds.num_classes < 2:
        raise UserError(f"dataset {where}: {ds.num_classes} class; classification needs at least 2")
    for split in ("train", "test"):
        y = getattr(ds, f"y_{split}")
        if int(y.min()) < 0 or int(y.max()) >= ds.num_classes:
            raise UserError(f"dataset {where}: y_{split} has labels outside 0..{ds.num_classes - 1} (e.g. "
                            f"{int(y.max()) if int(y.max()) >= ds.num_classes else int(y.min())}), the classes "
                            "of the training split")
    missing = sorted(set(torch.unique(ds.y_test).tolist()) - set(torch.unique(ds.y_train).tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise UserError(f"dataset {where}: test labels {shown} have no training image; every test class must "
                        "appear in y_train")
    return ds


#: synthetic dataset options and their types
SYNTHETIC_OPTIONS: dict[str, type] = {"num_classes": int, "in_chans": int, "image_size": int, "n_train": int,
                                      "n_test": int, "seed": int, "noise": float}
#: largest synthetic dataset (float32 bytes while it is generated); tests need far less
SYNTHETIC_MAX_BYTES = 2 << 30


def _parse_options(options: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"synthetic dataset option {item!r} must be key=value, e.g. synthetic:num_classes=4")
        if key not in SYNTHETIC_OPTIONS:
            import difflib

            close = difflib.get_close_matches(key, list(SYNTHETIC_OPTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown synthetic dataset option {key!r}{hint}; options: {', '.join(SYNTHETIC_OPTIONS)}")
        try:
            out[key] = SYNTHETIC_OPTIONS[key](value)
        except ValueError as err:
            kind = "an integer" if SYNTHETIC_OPTIONS[key] is int else "a number"
            raise UserError(f"synthetic dataset option {item!r} needs {kind}") from err
    return out


def make_synthetic(num_classes: int = 10, in_chans: int = 3, image_size: int = 32, n_train: int = 2000,
                   n_test: int = 500, seed: int = 0, noise: float = 0.12) -> ImageDataset:
    """A seeded, learnable image-classification set for tests.

    Each class has a smooth random prototype (a coarse 4x4 pattern upsampled to the image size);
    a sample is its class prototype under a random brightness shift plus pixel noise, quantized to
    uint8. A small CNN separates the classes in a few epochs, yet an L∞ attack of ~0.1 fools it.
    """
    allowed = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size,
               "n_train": n_train, "n_test": n_test}
    for key, value in allowed.items():
        if value < (2 if key == "num_classes" else 1):
            raise UserError(f"synthetic dataset: {key} must be >= {2 if key == 'num_classes' else 1}, got {value}")
    if not 0 <= noise < float("inf"):
        raise UserError(f"synthetic dataset: noise must be a finite number >= 0, got {noise}")
    size = 4 * (n_train + n_test) * in_chans * image_size * image_size
    if size > SYNTHETIC_MAX_BYTES:
        raise UserError(f"synthetic dataset of {n_train + n_test} images of {in_chans}x{image_size}x{image_size} "
                        f"needs {size / 2**30:.1f} GiB to generate, more than the {SYNTHETIC_MAX_BYTES >> 30} GiB "
                        "allowed; use fewer or smaller images")
    g = torch.Generator().manual_seed(int(seed))
    coarse = torch.rand(num_classes, in_chans, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos = 0.2 + 0.6 * protos

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        shift = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.1
        x = protos[y] + shift + noise * torch.randn(n, in_chans, image_size, image_size, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    return ImageDataset("synthetic", x_train, y_train, x_test, y_test, num_classes, Augment())


# the file readers live in dataset_files (imported lazily by load_dataset); their constants are re-exported
from .dataset_files import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES  # noqa: E402, F401

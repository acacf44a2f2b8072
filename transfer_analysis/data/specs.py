"""``--dataset`` names and what they open: ``cifar10``, ``cifar100``, ``tiny-imagenet``,
``fashion-mnist``, ``synthetic[:key=value,...]``, a path to an ``.npz`` file with ``x_train,
y_train, x_test, y_test`` (uint8 images (N, H, W) or (N, H, W, C), integer labels), or an image
folder (``imagefolder:DIR[?options]``, ``imagenet:DIR[?options]``; see
:mod:`transfer_analysis.data.folders`).

Example:
    >>> ds = load_dataset("synthetic:num_classes=3,in_chans=1,image_size=8,n_train=60,n_test=30")
    >>> ds.test_images().shape, ds.num_classes
    (torch.Size([30, 1, 8, 8]), 3)
    >>> dataset_shape("cifar100"), dataset_shape("synthetic:in_chans=1,image_size=8")
    ((3, 32, 100), (1, 8, 10))
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from .dataset import check_dataset
from .folders import is_folder_spec, open_image_folder
from .synthetic import make_synthetic, parse_synthetic_options

__all__ = ["DATASET_NAMES", "dataset_shape", "default_data_root", "load_dataset"]

DATASET_NAMES = ("cifar10", "cifar100", "tiny-imagenet", "fashion-mnist", "synthetic")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "tiny_imagenet": "tiny-imagenet",
            "tinyimagenet": "tiny-imagenet"}
_KNOWN_SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "tiny-imagenet": (3, 64, 200),
                 "fashion-mnist": (1, 28, 10)}


def default_data_root() -> Path:
    """``$DARHT_DATA`` or ``~/.cache/darht/data``."""
    return Path(os.environ.get("DARHT_DATA", Path.home() / ".cache" / "darht" / "data"))


def dataset_shape(name: str | os.PathLike) -> tuple[int, int, int]:
    """``(in_chans, image_size, num_classes)`` of a dataset, without loading a named one (an image
    folder's file list is read; no image is decoded)."""
    spec = str(name)
    base, _, options = spec.partition(":")
    base = _ALIASES.get(base.strip().lower(), base.strip().lower())
    if base in _KNOWN_SHAPES and not options:
        return _KNOWN_SHAPES[base]
    if base == "synthetic":
        opts: dict[str, Any] = {"in_chans": 3, "image_size": 32, "num_classes": 10,
                                **parse_synthetic_options(options)}
        return opts["in_chans"], opts["image_size"], opts["num_classes"]
    ds = load_dataset(spec, download=False)
    return ds.in_chans, ds.image_size, ds.num_classes


def load_dataset(name: str | os.PathLike, data_root: str | os.PathLike | None = None, download: bool = True) -> Any:
    """Load a dataset by name (see the module docstring): an
    :class:`~transfer_analysis.data.ImageDataset`, or a
    :class:`~transfer_analysis.data.FolderDataset` for an image folder.

    Under ``torchrun`` only rank 0 downloads; the other ranks wait for it and then read the files.
    Raises :class:`UserError` with where to put the files when a dataset is missing and cannot be
    downloaded.
    """
    from .. import distributed as dist_utils

    spec = str(name)
    root = Path(data_root) if data_root is not None else default_data_root()
    if download and dist_utils.world_size() > 1:
        if dist_utils.rank() == 0:
            ds = _load_dataset(spec, root, True)
            dist_utils.barrier()
            return ds
        dist_utils.barrier()
        return _load_dataset(spec, root, False)
    return _load_dataset(spec, root, download)


def _load_dataset(spec: str, root: Path, download: bool) -> Any:
    """The dataset ``spec`` names, checked (:func:`~transfer_analysis.data.check_dataset`)."""
    from . import files

    if is_folder_spec(spec):
        return open_image_folder(spec)
    if spec.endswith(".npz") or Path(spec).suffix == ".npz":
        return check_dataset(files.load_npz(Path(spec)), spec)
    base, _, options = spec.partition(":")
    base = _ALIASES.get(base.strip().lower(), base.strip().lower())
    if base == "synthetic":
        return check_dataset(make_synthetic(**parse_synthetic_options(options)), spec)
    if base in _KNOWN_SHAPES and options:
        raise UserError(f"dataset {base!r} takes no options (got {spec!r})")
    if base == "fashion-mnist":
        return check_dataset(files.load_fashion_mnist(root, download), spec)
    if base in ("cifar10", "cifar100"):
        return check_dataset(files.load_cifar(base, root, download), spec)
    if base == "tiny-imagenet":
        return check_dataset(files.load_tiny_imagenet(root, download), spec)
    if Path(os.path.expanduser(spec)).is_dir():
        raise UserError(f"dataset {spec!r} is a folder; name it imagefolder:{spec} (classes in sub-folders) or "
                        f"imagenet:{spec} (ImageNet synset folders)")
    close = difflib.get_close_matches(base, DATASET_NAMES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"unknown dataset {spec!r}; {hint}choose one of {', '.join(DATASET_NAMES)}, "
                    "imagefolder:DIR, imagenet:DIR or a .npz path")

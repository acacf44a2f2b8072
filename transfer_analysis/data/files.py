"""Datasets from their files: ``.npz`` archives, Fashion-MNIST's IDX files (Debian's package or a
download), CIFAR-10/100 (torchvision) and Tiny ImageNet; each offline failure names where to put
the files.

Example:
    >>> DEBIAN_FASHION_MNIST.as_posix()
    '/usr/share/datasets/fashion-mnist'
"""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .dataset import Augment, ImageDataset, default_augment

__all__ = ["DEBIAN_FASHION_MNIST", "FASHION_MNIST_CLASSES", "TINY_IMAGENET_URL", "load_npz", "load_fashion_mnist",
           "load_cifar", "load_tiny_imagenet"]

logger = logging.getLogger("transfer_analysis.data")

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


def _to_nchw(x: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{path}: {key} must have shape (N, H, W) or (N, H, W, C), got {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def load_npz(path: Path) -> ImageDataset:
    import zipfile

    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a .npz archive (no zip archive inside: truncated, or another kind of "
                        "file); write it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        reason = "it holds pickled objects, which are never loaded" if "pickle" in str(err) else \
            f"{type(err).__name__}: {err}"
        raise UserError(f"{path} is a damaged or unsupported .npz archive ({reason}); re-create it with "
                        "numpy.savez") from err
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it needs x_train, y_train, x_test, y_test")
    out: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            raise UserError(f"{path}: x_{split} must be uint8 with values 0-255, got dtype {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path}: y_{split} must hold integer labels, got dtype {y.dtype}")
        if y.ndim != 1 or len(y) != len(x):
            raise UserError(f"{path}: x_{split} has {len(x)} images but y_{split} has shape {y.shape}")
        if len(y) and y.min() < 0:
            raise UserError(f"{path}: y_{split} has negative labels")
        out[f"x_{split}"] = _to_nchw(x, f"x_{split}", path)
        out[f"y_{split}"] = torch.from_numpy(y.astype(np.int64))
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise UserError(f"{path}: train images {tuple(out['x_train'].shape[1:])} and test images "
                        f"{tuple(out['x_test'].shape[1:])} differ in shape")
    if not len(out["y_train"]) or not len(out["y_test"]):
        raise UserError(f"{path}: x_train and x_test each need at least one image")
    # the classes are those of the training split: a test label beyond them is refused by check_dataset
    num_classes = int(out["y_train"].max()) + 1
    return ImageDataset(path.stem, num_classes=num_classes, augment=Augment(), **out)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def _find_idx_dir(candidates: list[Path]) -> Path | None:
    for d in candidates:
        if all((d / f).exists() or (d / f"{f}.gz").exists() for f in _FMNIST_FILES.values()):
            return d
    return None


def load_fashion_mnist(root: Path, download: bool) -> ImageDataset:
    # DEBIAN_FASHION_MNIST is read at call time, so a test can point it elsewhere
    candidates = [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST]
    found = _find_idx_dir(candidates)
    if found is None:
        if not download:
            raise UserError(f"Fashion-MNIST not found under {root} or {DEBIAN_FASHION_MNIST}; install the Debian "
                            "package dataset-fashion-mnist or put the four IDX files in `data_root`")
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except Exception as err:  # noqa: BLE001 - any network failure means the same thing to the user
            raise UserError(f"Fashion-MNIST not found under {root} or {DEBIAN_FASHION_MNIST} and the download failed "
                            f"({type(err).__name__}); install the Debian package dataset-fashion-mnist or put "
                            "train-images-idx3-ubyte.gz and the other three IDX files in `data_root`") from err
        found = _find_idx_dir(candidates)
        assert found is not None
    logger.info("Fashion-MNIST from %s", found)
    arrays = {}
    for key, fname in _FMNIST_FILES.items():
        p = found / fname if (found / fname).exists() else found / f"{fname}.gz"
        arrays[key] = _read_idx(p)
    return ImageDataset(
        "fashion-mnist",
        torch.from_numpy(arrays["x_train"].copy())[:, None], torch.from_numpy(arrays["y_train"].astype(np.int64)),
        torch.from_numpy(arrays["x_test"].copy())[:, None], torch.from_numpy(arrays["y_test"].astype(np.int64)),
        10, default_augment("fashion-mnist"), FASHION_MNIST_CLASSES,
    )


def load_cifar(name: str, root: Path, download: bool) -> ImageDataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as err:  # noqa: BLE001 - offline downloads fail with many exception types
        why = "download disabled" if not download else f"download failed: {type(err).__name__}"
        raise UserError(f"{name} not found under {root} ({why}); put {archive} or the extracted {folder}/ "
                        "folder there, or pass `data_root`") from err

    def pack(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))),
                torch.tensor(ds.targets, dtype=torch.long))

    x_train, y_train = pack(train)
    x_test, y_test = pack(test)
    return ImageDataset(name, x_train, y_train, x_test, y_test, len(train.classes), default_augment(name),
                        tuple(train.classes))


TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def load_tiny_imagenet(root: Path, download: bool) -> ImageDataset:
    """Tiny ImageNet from ``root/tiny-imagenet-200`` (train/ and the labelled val/ as the test split)."""
    folder = root / "tiny-imagenet-200"
    cache = folder / "darht-uint8.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            arrays = {k: torch.from_numpy(data[k]) for k in data.files}
        names = tuple((folder / "wnids.txt").read_text().split())
        return ImageDataset("tiny-imagenet", arrays["x_train"], arrays["y_train"].long(), arrays["x_test"],
                            arrays["y_test"].long(), len(names), default_augment("tiny-imagenet"), names)
    if not (folder / "wnids.txt").is_file():
        if not download:
            raise UserError(f"Tiny ImageNet not found: expected {folder}/ (wnids.txt, train/, val/); unzip "
                            "tiny-imagenet-200.zip into `data_root`")
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(TINY_IMAGENET_URL, str(root))
        except Exception as err:  # noqa: BLE001
            raise UserError(f"Tiny ImageNet not found under {root} and the download failed ({type(err).__name__}); "
                            f"unzip tiny-imagenet-200.zip into {root} or pass `data_root`") from err
    from PIL import Image

    wnids = (folder / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}

    def read(paths: list[Path]) -> torch.Tensor:
        imgs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8) for p in paths]
        return torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy())

    train_paths, train_labels = [], []
    for w in wnids:
        files = sorted((folder / "train" / w / "images").glob("*"))
        train_paths += files
        train_labels += [index[w]] * len(files)
    val_paths, val_labels = [], []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            val_paths.append(folder / "val" / "images" / parts[0])
            val_labels.append(index[parts[1]])
    logger.info("reading %d Tiny ImageNet images (cached as uint8 afterwards)", len(train_paths) + len(val_paths))
    x_train, x_test = read(train_paths), read(val_paths)
    y_train, y_test = torch.tensor(train_labels), torch.tensor(val_labels)
    try:
        from ..files import atomic_write

        with atomic_write(cache, "wb") as fh:
            np.savez(fh, x_train=x_train.numpy(), y_train=y_train.numpy(), x_test=x_test.numpy(),
                     y_test=y_test.numpy())
    except OSError:
        logger.warning("could not write the Tiny ImageNet cache %s (read-only?)", cache)
    return ImageDataset("tiny-imagenet", x_train, y_train, x_test, y_test, len(wnids),
                        default_augment("tiny-imagenet"), tuple(wnids))

"""Image folders as datasets: ``imagefolder:DIR`` and ``imagenet:DIR``, options after ``?``.

``DIR`` holds one sub-folder per class (torchvision ``ImageFolder`` semantics: classes in sorted
order, files found recursively in sorted order, image extensions only). When ``DIR`` holds
``train/`` and ``val/`` (or ``validation/``), those are the splits; ``DIR`` holding only ``val/``
(or ``validation/``) is a test-only set from it; otherwise ``DIR`` itself is a test-only set.
``imagenet:`` folders are synsets (``n01440764``, ...) and their labels follow timm's
ImageNet-1k order (1000 classes), so a pretrained head's outputs mean what the labels mean.

The shared pixel space: each image is decoded as RGB, its shorter side resized (PIL bilinear,
antialiased) to ``round(size / crop_pct)`` and centre-cropped to ``size x size``. Options:
``size`` (default 224), ``crop_pct`` (default 0.875: 256 -> 224, ImageNet's evaluation transform),
``workers`` (decoding processes, default up to 4), ``skip_bad=true`` (decode every file once when
the folder is opened and leave the unreadable ones out, each with a warning).

Only the file list is read when a folder is opened; labels are known from it, so class-balanced
subsets are chosen before any image is decoded, and a command decodes only the images it uses.

Example:
    >>> parse_folder_spec("imagefolder:/data/pets?size=160&crop_pct=1")[2]
    FolderOptions(size=160, crop_pct=1.0, workers=None, skip_bad=False)
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .dataset import Augment, SplitAccess, channel_stats, float_batch, shuffled_order

__all__ = ["FOLDER_PREFIXES", "IMAGE_EXTENSIONS", "FolderOptions", "FolderDataset", "decode_image",
           "is_folder_spec", "open_image_folder", "parse_folder_spec"]

logger = logging.getLogger(__name__)

FOLDER_PREFIXES = ("imagefolder:", "imagenet:")
#: torchvision's image extensions (compared case-insensitively)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_TEST_SPLITS = ("val", "validation")
#: images decoded per loader batch when a whole subset is decoded
_DECODE_CHUNK = 64
#: training images the channel statistics of a folder are estimated from (a balanced subset)
STATS_IMAGES = 2000


@dataclass(frozen=True)
class FolderOptions:
    """How a folder's images become the shared pixel space (see the module docstring)."""

    size: int = 224
    crop_pct: float = 0.875
    workers: int | None = None
    skip_bad: bool = False

    @property
    def resize_to(self) -> int:
        """The shorter side before the centre crop: ``round(size / crop_pct)``."""
        return round(self.size / self.crop_pct)

    def num_workers(self) -> int:
        """Decoding processes: ``workers``, else up to 4 of the CPUs this process may use."""
        if self.workers is not None:
            return self.workers
        from ..threads import available_cpus

        return min(4, available_cpus())


_OPTION_TYPES = {"size": int, "crop_pct": float, "workers": int, "skip_bad": bool}


def is_folder_spec(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names an image folder (``imagefolder:`` or ``imagenet:``)."""
    return str(spec).startswith(FOLDER_PREFIXES)


def parse_folder_spec(spec: str) -> tuple[str, Path, FolderOptions]:
    """``(kind, folder, options)`` of ``imagefolder:DIR[?key=value&...]`` or ``imagenet:DIR[?...]``."""
    kind, _, rest = str(spec).partition(":")
    if kind not in ("imagefolder", "imagenet"):
        raise UserError(f"{spec!r} is not an image folder; write imagefolder:DIR or imagenet:DIR")
    path, sep, query = rest.rpartition("?") if "?" in rest else (rest, "", "")
    if not path:
        raise UserError(f"{spec!r} names no folder; write {kind}:DIR")
    values: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in _OPTION_TYPES:
            close = difflib.get_close_matches(key, list(_OPTION_TYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown image folder option {key!r}{hint}; options: {', '.join(_OPTION_TYPES)}")
        if not eq:
            raise UserError(f"image folder option {item!r} must be key=value, e.g. {kind}:DIR?size=224")
        values[key] = _option_value(key, value)
    return kind, Path(os.path.expanduser(path)), FolderOptions(**values)


def _option_value(key: str, value: str) -> Any:
    kind = _OPTION_TYPES[key]
    if kind is bool:
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"image folder option {key} must be true or false, got {value!r}")
    try:
        number = kind(value)
    except ValueError:
        raise UserError(f"image folder option {key} needs {'an integer' if kind is int else 'a number'}, "
                        f"got {value!r}") from None
    if key == "size" and not 1 <= number <= 8192:
        raise UserError(f"image folder option size must be an integer in [1, 8192], got {value}")
    if key == "crop_pct" and not 0.05 <= number <= 1:
        raise UserError(f"image folder option crop_pct must be a number in [0.05, 1], got {value}")
    if key == "workers" and number < 0:
        raise UserError(f"image folder option workers must be 0 (decode in this process) or more, got {value}")
    return number


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def decode_image(path: str | os.PathLike, size: int, crop_pct: float) -> np.ndarray:
    """One image in the shared pixel space: uint8 (size, size, 3).

    RGB, shorter side resized (PIL bilinear, antialiased) to ``round(size / crop_pct)``, the other
    in proportion (never below it), then the centre ``size x size`` crop.
    """
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    short = round(size / crop_pct)
    w, h = im.size
    new = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
    im = im.resize(new, Image.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


class _Decoder(torch.utils.data.Dataset):
    """Files -> (uint8 HWC array or None, error text); a worker never raises, so the refusal names
    the file in one line in the main process."""

    def __init__(self, files: Sequence[Path], size: int, crop_pct: float) -> None:
        self.files, self.size, self.crop_pct = files, size, crop_pct

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, str]:
        try:
            return decode_image(self.files[i], self.size, self.crop_pct), ""
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds for a bad file
            return None, f"{type(err).__name__}: {err}"


def _collate(items: list[tuple[np.ndarray | None, str]]) -> tuple[torch.Tensor | None, list[str]]:
    errors = [e for _, e in items]
    if any(errors):
        return None, errors
    return torch.from_numpy(np.stack([a for a, _ in items])).permute(0, 3, 1, 2).contiguous(), errors


def _decoded_batches(files: Sequence[Path], batch_size: int, options: FolderOptions,
                     ) -> Iterator[tuple[torch.Tensor | None, list[str]]]:
    """uint8 (B, 3, size, size) batches of ``files`` in order (``None`` and the errors for a batch with
    an unreadable file), decoded by ``options.workers`` processes."""
    if not files:
        return
    n_batches = -(-len(files) // batch_size)
    workers = min(options.num_workers(), n_batches)
    # its own generator: a DataLoader draws its workers' base seed from the generator it is given, else
    # from the global RNG, which would move every later random start of an attack (decoding is not random)
    loader = torch.utils.data.DataLoader(_Decoder(files, options.size, options.crop_pct), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, collate_fn=_collate,
                                         prefetch_factor=2 if workers else None, generator=torch.Generator())
    yield from loader


def _checked_batches(files: Sequence[Path], batch_size: int, options: FolderOptions) -> Iterator[torch.Tensor]:
    """:func:`_decoded_batches` that refuses the first unreadable file in one line naming it."""
    for b, (xb, errors) in enumerate(_decoded_batches(files, batch_size, options)):
        if xb is None:
            bad = next(i for i, e in enumerate(errors) if e)
            raise UserError(f"{files[b * batch_size + bad]} is not a readable image ({errors[bad]}); remove it, or "
                            "open the folder with skip_bad=true to leave unreadable files out")
        yield xb


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------
@dataclass
class FolderDataset(SplitAccess):
    """An image folder: file lists and labels in memory, images decoded when used.

    The interface is :class:`~transfer_analysis.data.ImageDataset`'s (``images``, ``labels``,
    ``batches``, ``with_train_subset``, ``channel_stats``), so every command takes either.
    """

    name: str
    root: Path
    options: FolderOptions
    class_names: tuple[str, ...]
    train_files: tuple[Path, ...]
    y_train: torch.Tensor
    test_files: tuple[Path, ...]
    y_test: torch.Tensor
    augment: Augment = field(default_factory=Augment)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_train(self) -> bool:
        """Whether the folder has a training split (``train/`` beside ``val/``)."""
        return len(self.train_files) > 0

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        return self.options.size

    def _split(self, split: str) -> tuple[tuple[Path, ...], torch.Tensor]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        files, y = (self.train_files, self.y_train) if split == "train" else (self.test_files, self.y_test)
        if split == "train" and not files:
            raise UserError(f"dataset {self.name} has no training split (an image folder without train/ and val/ "
                            "sub-folders is a test-only set)")
        return files, y

    def _decode(self, files: Sequence[Path], desc: str) -> torch.Tensor:
        from ..console import progress

        out = torch.empty(len(files), 3, self.options.size, self.options.size, dtype=torch.uint8)
        start = 0
        batches = _checked_batches(files, _DECODE_CHUNK, self.options)
        for xb in progress(batches, total=-(-len(files) // _DECODE_CHUNK), desc=desc):
            out[start:start + len(xb)] = xb
            start += len(xb)
        return out

    def images(self, split: str = "test", indices: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Float images in [0, 1] of a split (optionally a subset), decoded now, on ``device``."""
        files, _ = self._split(split)
        chosen = files if indices is None else [files[int(i)] for i in indices]
        return self._decode(chosen, f"decoding {split}").to(device=device).float().div_(255)

    def batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None, shuffle: bool = False,
                generator: torch.Generator | None = None, augment: Augment | None = None,
                device: torch.device | str | None = None, drop_last: bool = False,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches (float in [0, 1]), streamed: decoded by worker processes while the
        previous batch is used; the order rule is the in-memory dataset's."""
        files, y_all = self._split(split)
        order = shuffled_order(len(y_all), indices, shuffle, generator)
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        order = order[:stop]
        ordered = [files[int(i)] for i in order]
        for b, xb in enumerate(_checked_batches(ordered, batch_size, self.options)):
            yield float_batch(xb, y_all[order[b * batch_size:(b + 1) * batch_size]], augment, generator, device)

    def with_train_subset(self, n: int | None, seed: int = 0) -> FolderDataset:
        """The same folder with a seeded class-balanced subset of ``n`` training files (``None``, or
        ``n`` at least the training-set size, returns ``self``)."""
        from .sampling import balanced_subset

        if n is None or n >= len(self.y_train):
            return self
        return self.select_train(balanced_subset(self.y_train, n, seed))

    def select_train(self, indices: torch.Tensor) -> FolderDataset:
        """The same folder with only the training files at ``indices`` (in that order)."""
        return dataclasses.replace(self, train_files=tuple(self.train_files[int(i)] for i in indices),
                                   y_train=self.y_train[indices])

    def holdout(self, n: int, seed: int = 0) -> tuple[FolderDataset, FolderDataset]:
        """``(rest, validation)`` as :meth:`ImageDataset.holdout`: the validation dataset's test split
        is the ``n`` held-out training files."""
        from .sampling import holdout_indices

        kept, held = holdout_indices(self.y_train, n, seed)
        rest = self.select_train(kept)
        return rest, dataclasses.replace(rest, test_files=tuple(self.train_files[int(i)] for i in held),
                                         y_test=self.y_train[held])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in the pixel space, estimated from a
        seeded class-balanced subset of at most ``STATS_IMAGES`` of them."""
        from .sampling import balanced_subset

        files, y = self._split("train")
        idx = balanced_subset(y, STATS_IMAGES, seed=0)
        logger.info("channel statistics of %s from %d of its %d training images", self.name, len(idx), len(files))
        chosen = [files[int(i)] for i in idx]
        return channel_stats(_checked_batches(chosen, _DECODE_CHUNK, self.options))


# --------------------------------------------------------------------------------------------
# listing
# --------------------------------------------------------------------------------------------
def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_files(folder: Path, skip_bad: bool) -> list[Path]:
    """A class folder's image files, recursively, in torchvision's sorted order; another file is
    refused (or, with ``skip_bad``, left out with a warning). Hidden files are ignored."""
    found: list[Path] = []
    for root, dirs, names in sorted(os.walk(folder, followlinks=True)):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            elif skip_bad:
                logger.warning("%s is not an image file; left out (skip_bad=true)", path)
            else:
                raise UserError(f"{path} is not an image file (extensions: {' '.join(IMAGE_EXTENSIONS)}); move it "
                                "out of the class folder, or open the folder with skip_bad=true")
    return found


def _imagenet_synsets() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


def _list_split(folder: Path, classes: Sequence[str], kind: str,
                skip_bad: bool) -> tuple[list[Path], torch.Tensor]:
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    names = _subdirs(folder)
    if not names:
        raise UserError(f"{folder} holds no class sub-folders; an image folder has one sub-folder per class "
                        "(torchvision ImageFolder's layout)")
    for name in names:
        if name not in index:
            if kind == "imagenet":
                raise UserError(f"{folder / name} is not an ImageNet-1k synset (class folders are named like "
                                "n01440764); use imagefolder: for other classes")
            raise UserError(f"{folder / name} is a class with no folder in the training split; every class of "
                            "the test split must be in train/")
        found = _class_files(folder / name, skip_bad)
        files += found
        labels += [index[name]] * len(found)
    return files, torch.tensor(labels, dtype=torch.long)


def _drop_unreadable(files: list[Path], labels: torch.Tensor,
                     options: FolderOptions) -> tuple[list[Path], torch.Tensor]:
    """With ``skip_bad``: decode every file once and leave the unreadable ones out, each with a warning."""
    keep: list[int] = []
    for b, (_, errors) in enumerate(_decoded_batches(files, _DECODE_CHUNK, options)):
        start = b * _DECODE_CHUNK
        for i, err in enumerate(errors):
            if err:
                logger.warning("%s is not a readable image (%s); left out (skip_bad=true)", files[start + i], err)
            else:
                keep.append(start + i)
    return [files[i] for i in keep], labels[torch.tensor(keep, dtype=torch.long)]


def open_image_folder(spec: str | os.PathLike) -> FolderDataset:
    """Open ``imagefolder:DIR[?options]`` or ``imagenet:DIR[?options]`` (a bare path is an
    ``imagefolder:``); only the file list is read.

    Example:
        >>> ds = open_image_folder("imagefolder:/data/pets?size=160")  # doctest: +SKIP
        >>> ds.images("test", balanced_subset(ds.y_test, 100)).shape  # doctest: +SKIP
        torch.Size([100, 3, 160, 160])
    """
    from .dataset import check_dataset

    spec = str(spec)
    kind, root, options = parse_folder_spec(spec if is_folder_spec(spec) else f"imagefolder:{spec}")
    if not root.is_dir():
        raise UserError(f"{kind}: folder not found: {root}")
    subdirs = _subdirs(root)
    test_name = next((s for s in _TEST_SPLITS if s in subdirs), None)
    split_layout = test_name is not None and set(subdirs) <= {"train", *_TEST_SPLITS}
    if split_layout and all(s in subdirs for s in _TEST_SPLITS):
        raise UserError(f"{root} holds both val/ and validation/; keep one as the test split")
    if not split_layout and subdirs == ["train"]:
        raise UserError(f"{root} holds train/ but no val/ or validation/ for the test split")
    train_dir = root / "train" if split_layout and "train" in subdirs else None
    test_dir = root / test_name if split_layout else root
    if kind == "imagenet":
        classes = _imagenet_synsets()
    else:
        classes = tuple(_subdirs(train_dir if train_dir is not None else test_dir))
    train_files, y_train = _list_split(train_dir, classes, kind, options.skip_bad) if train_dir is not None else \
        ([], torch.zeros(0, dtype=torch.long))
    test_files, y_test = _list_split(test_dir, classes, kind, options.skip_bad)
    if options.skip_bad:
        train_files, y_train = _drop_unreadable(train_files, y_train, options)
        test_files, y_test = _drop_unreadable(test_files, y_test, options)
    logger.debug("%s: %d classes, %d training and %d test files (pixel space %dx%d, crop_pct %g)", spec,
                len(classes), len(train_files), len(test_files), options.size, options.size, options.crop_pct)
    ds = FolderDataset(f"{kind}:{root}", root, options, classes, tuple(train_files), y_train, tuple(test_files),
                       y_test)
    return check_dataset(ds, spec)

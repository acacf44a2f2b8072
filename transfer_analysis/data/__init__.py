"""Datasets: named ones, ``.npz`` files, synthetic sets and image folders, behind one interface.

- :mod:`.specs`: what a ``--dataset`` string opens (:func:`load_dataset`, :func:`dataset_shape`)
- :mod:`.files`: the file readers (``.npz``, Fashion-MNIST IDX, CIFAR, Tiny ImageNet)
- :mod:`.folders`: image folders (``imagefolder:``, ``imagenet:``), decoded when used
- :mod:`.synthetic`: the seeded, learnable test set
- :mod:`.dataset`: :class:`ImageDataset` (in memory), augmentation, :func:`check_dataset`
- :mod:`.sampling`: class-balanced subsets and their index files

Every dataset serves float images in [0, 1], shape (N, C, H, W), through ``images``, ``labels``
and ``batches``.

Example:
    >>> ds = load_dataset("synthetic:num_classes=3,in_chans=1,image_size=8,n_train=60,n_test=30")
    >>> idx = balanced_subset(ds.y_test, 9, seed=0)
    >>> torch.bincount(ds.y_test[idx]).tolist()
    [3, 3, 3]
"""

from __future__ import annotations

import torch  # noqa: F401 - for the example

from .dataset import Augment, ImageDataset, augment_batch, channel_stats, check_dataset, default_augment
from .files import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES
from .folders import FolderDataset, FolderOptions, decode_image, is_folder_spec, open_image_folder
from .sampling import balanced_subset, holdout_indices, load_indices, save_indices
from .specs import DATASET_NAMES, dataset_shape, default_data_root, load_dataset
from .synthetic import SYNTHETIC_OPTIONS, make_synthetic

__all__ = [
    "DATASET_NAMES", "DEBIAN_FASHION_MNIST", "FASHION_MNIST_CLASSES", "SYNTHETIC_OPTIONS",
    "Augment", "ImageDataset", "FolderDataset", "FolderOptions",
    "augment_batch", "balanced_subset", "channel_stats", "check_dataset", "dataset_shape", "decode_image",
    "default_augment", "default_data_root", "holdout_indices", "is_folder_spec", "load_dataset", "load_indices", "make_synthetic",
    "open_image_folder", "save_indices",
]

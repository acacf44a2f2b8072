"""Data layer: every source, subsets, augmentation, and clear failures."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transfer_analysis.data import (
    DEBIAN_FASHION_MNIST,
    Augment,
    augment_batch,
    balanced_subset,
    load_dataset,
    load_indices,
    make_synthetic,
    save_indices,
)
from transfer_analysis.errors import UserError


def test_synthetic_shapes_range_and_seed():
    ds = load_dataset("synthetic:num_classes=5,in_chans=2,image_size=9,n_train=50,n_test=20,seed=3")
    x = ds.images("train")
    assert x.shape == (50, 2, 9, 9) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert ds.num_classes == 5 and ds.in_chans == 2 and ds.image_size == 9
    again = make_synthetic(num_classes=5, in_chans=2, image_size=9, n_train=50, n_test=20, seed=3)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    other = make_synthetic(num_classes=5, in_chans=2, image_size=9, n_train=50, n_test=20, seed=4)
    assert not torch.equal(ds.x_train, other.x_train)


def test_synthetic_is_learnable_in_seconds():
    torch.manual_seed(0)
    ds = load_dataset("synthetic:num_classes=6,in_chans=1,image_size=10,n_train=600,n_test=300")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = ds.images("train"), ds.labels("train")
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    acc = (model(ds.images("test")).argmax(1) == ds.labels("test")).float().mean().item()
    assert acc > 0.9


@pytest.mark.parametrize("n", [1, 7, 10, 33, 59])
def test_balanced_subset_matches_brute_force_counts(n):
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    idx = balanced_subset(y, n, seed=5)
    assert len(idx) == n and len(set(idx.tolist())) == n
    assert torch.equal(idx, torch.sort(idx).values)
    counts = torch.bincount(y[idx], minlength=3).tolist()
    caps = [10, 20, 30]
    # brute force over every feasible split: ours has the smallest possible largest class ...
    feasible = [(a, b, n - a - b) for a in range(11) for b in range(21) if 0 <= n - a - b <= 30]
    assert max(counts) == min(max(v) for v in feasible)
    # ... and every class that is not exhausted is within one of the largest
    assert all(c >= max(counts) - 1 for c, cap in zip(counts, caps) if c < cap)
    assert all(c <= cap for c, cap in zip(counts, caps))
    assert balanced_subset(y, n, seed=5).tolist() == idx.tolist()


def test_balanced_subset_even_when_possible_and_whole_set_in_order():
    y = torch.arange(100) % 10
    idx = balanced_subset(y, 50, seed=0)
    assert torch.bincount(y[idx]).tolist() == [5] * 10
    assert not torch.equal(idx, balanced_subset(y, 50, seed=1))
    assert torch.equal(balanced_subset(y, 100, seed=3), torch.arange(100))
    assert torch.equal(balanced_subset(y, 500, seed=3), torch.arange(100))
    with pytest.raises(UserError, match="`n` .*must be a positive integer"):
        balanced_subset(y, 0)


def test_indices_round_trip(tmp_path):
    idx = torch.tensor([3, 1, 4, 1, 5])
    save_indices(tmp_path / "i.json", idx, dataset="synthetic", split="test", seed=0)
    assert torch.equal(load_indices(tmp_path / "i.json"), idx)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError):
        load_indices(tmp_path / "bad.json")


def test_augment_crop_equals_manual_shift_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, Augment(crop_padding=1), g)
    g = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 3, (2,), generator=g), torch.randint(0, 3, (2,), generator=g)
    padded = F.pad(x, (1, 1, 1, 1))
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, oy[i]:oy[i] + 4, ox[i]:ox[i] + 4])
    flipped = augment_batch(x, Augment(flip=True), torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    assert augment_batch(x, Augment(), None) is x


def _write_npz(path: Path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8), "y_train": np.arange(12) % 3,
        "x_test": rng.integers(0, 256, (6, 6, 6, 3), dtype=np.uint8), "y_test": np.arange(6) % 3,
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_loads_channels_last_and_grayscale(tmp_path):
    arrays = _write_npz(tmp_path / "d.npz")
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.x_train.shape == (12, 3, 6, 6) and ds.num_classes == 3
    assert torch.equal(ds.x_train[2, 1], torch.from_numpy(arrays["x_train"][2, :, :, 1]))
    _write_npz(tmp_path / "g.npz", x_train=np.zeros((12, 5, 5), np.uint8), x_test=np.zeros((6, 5, 5), np.uint8))
    assert load_dataset(tmp_path / "g.npz").x_test.shape == (6, 1, 5, 5)


@pytest.mark.parametrize("overrides,match", [
    ({"x_train": np.zeros((12, 6, 6, 3), np.float32)}, "uint8"),
    ({"y_train": np.arange(11)}, "12 images"),
    ({"y_test": None}, "lacks y_test"),
    ({"x_test": np.zeros((6, 7, 7, 3), np.uint8)}, "differ in shape"),
    ({"y_train": np.linspace(0, 1, 12)}, "integer"),
])
def test_npz_errors(tmp_path, overrides, match):
    _write_npz(tmp_path / "d.npz", **overrides)
    with pytest.raises(UserError, match=match):
        load_dataset(tmp_path / "d.npz")


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_data_root_first(tmp_path):
    rng = np.random.default_rng(1)
    xtr, xte = rng.integers(0, 256, (8, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(8) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", xte)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    ds = load_dataset("fashion-mnist", data_root=tmp_path, download=False)
    assert ds.x_train.shape == (8, 1, 28, 28) and ds.num_classes == 10
    assert torch.equal(ds.x_test[:, 0], torch.from_numpy(xte.astype(np.uint8)))
    assert ds.augment == Augment(crop_padding=2, flip=True)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package(tmp_path):
    ds = load_dataset("fashion-mnist", data_root=tmp_path / "empty", download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10


def test_missing_datasets_say_where_to_put_files(tmp_path, monkeypatch):
    import transfer_analysis.data.files as files  # where the Fashion-MNIST reader looks

    monkeypatch.setattr(files, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_root=tmp_path, download=False)
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_root=tmp_path, download=False)
    with pytest.raises(UserError, match="cifar-100-python"):
        load_dataset("cifar100", data_root=tmp_path, download=False)
    with pytest.raises(UserError, match="tiny-imagenet-200"):
        load_dataset("tiny-imagenet", data_root=tmp_path, download=False)
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        load_dataset("cifar1O")
    with pytest.raises(UserError, match="not found"):
        load_dataset(str(tmp_path / "missing.npz"))


def test_tiny_imagenet_from_local_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids))
    for i, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((64, 64, 3), 40 * i + j, np.uint8)).save(d / f"{w}_{j}.JPEG", quality=100)
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for j, w in enumerate(["n02", "n01"]):
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(root / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines))
    ds = load_dataset("tiny-imagenet", data_root=tmp_path, download=False)
    assert ds.x_train.shape == (6, 3, 64, 64) and ds.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.y_test.tolist() == [1, 0] and ds.num_classes == 2
    cached = load_dataset("tiny-imagenet", data_root=tmp_path, download=False)  # from the uint8 cache
    assert torch.equal(cached.x_train, ds.x_train)


def test_batches_cover_split_and_shuffle_is_seeded(tiny_data):
    seen = torch.cat([y for _, y in tiny_data.batches("test", 50)])
    assert torch.equal(seen, tiny_data.y_test)
    a = [y for _, y in tiny_data.batches("train", 64, shuffle=True, generator=torch.Generator().manual_seed(0))]
    b = [y for _, y in tiny_data.batches("train", 64, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert sorted(torch.cat(a).tolist()) == sorted(tiny_data.y_train.tolist())

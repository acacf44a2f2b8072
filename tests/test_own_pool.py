"""A researcher's own timm models over an image folder, end to end, offline.

Tiny timm models (``test_resnet``, ``test_vit``: timm's own test architectures) are trained for a
few steps here, saved with ``timm.models.save_for_hf`` into a ``local-dir:`` folder and into a
Hugging Face cache layout (``hf-hub:``, read with ``HF_HUB_OFFLINE=1``), and attacked over a
temporary folder of PNG and JPEG files with the README's commands.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from transfer_analysis.attacks import AttackConfig
from transfer_analysis.data import balanced_subset, load_dataset, open_image_folder
from transfer_analysis.errors import UserError
from transfer_analysis.matrix import transfer_matrix
from transfer_analysis.models import PixelSpaceModel, load_pool

CLASSES = ("apple", "boat", "cloud")
RES_MEAN, RES_STD = (0.8, 0.2, 0.5), (0.1, 0.15, 0.2)  # far from ImageNet's: applied or not, it shows
HUB_ID = "acme/tiny-vit"
REV = "0123456789abcdef0123456789abcdef01234567"


def _write_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """Class-coloured images of varying size, alternately PNG and JPEG."""
    rng = np.random.default_rng(seed)
    colours = [(138, 118, 118), (118, 138, 118), (118, 118, 138)]  # learnable, yet within reach of an attack
    for c, (name, colour) in enumerate(zip(CLASSES, colours)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 36 + 2 * i, 40
            img = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(img).save(root / name / f"{i}.{ext}")
    return root


def _train(model: torch.nn.Module, wrap, x: torch.Tensor, y: torch.Tensor, steps: int = 30) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(wrap(x), y).backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The folder, a local-dir: ResNet with its own mean/std and input size, an hf-hub: ViT in a cache."""
    root = tmp_path_factory.mktemp("own")
    folder = _write_folder(root / "images")
    ds = open_image_folder(f"imagefolder:{folder}?size=32&workers=0")
    x, y = ds.images("test"), ds.labels("test")
    torch.manual_seed(0)
    res = timm.create_model("test_resnet", num_classes=3)
    res.pretrained_cfg = {**res.pretrained_cfg, "mean": RES_MEAN, "std": RES_STD, "input_size": (3, 48, 48),
                          "interpolation": "bilinear", "crop_pct": 0.8, "num_classes": 3}
    res_ref = PixelSpaceModel(res, (48, 48), RES_MEAN, RES_STD, interpolation="bilinear", crop_pct=0.8 / 0.875)
    _train(res, res_ref, x, y)
    timm.models.save_for_hf(res, str(root / "res"), safe_serialization=True)
    vit = timm.create_model("test_vit", num_classes=3, img_size=32)
    vit.pretrained_cfg = {**vit.pretrained_cfg, "input_size": (3, 32, 32), "num_classes": 3}
    vit_ref = PixelSpaceModel(vit, None, vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"],
                              interpolation=vit.pretrained_cfg["interpolation"])
    _train(vit, vit_ref, x, y)
    hub = root / "hf"
    snap = hub / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / REV
    timm.models.save_for_hf(vit, str(snap), safe_serialization=True, model_args={"img_size": 32})
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(REV)
    pool = root / "pool.yaml"
    pool.write_text(yaml.safe_dump({"models": [
        {"name": "res", "arch": "local-dir:res", "pretrained": True, "family": "cnn"},
        {"name": "vit", "arch": f"hf-hub:{HUB_ID}", "pretrained": True, "family": "transformer"},
    ]}))
    return {"root": root, "folder": folder, "pool": pool, "hub": hub, "x": x, "y": y, "res_ref": res_ref,
            "vit_ref": vit_ref}


def _darht(args: list[str], world, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HOME": str(world["hub"]), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=600)


def test_readme_matrix_and_recommend_over_own_models_equal_timm_loaded_ones(world, tmp_path):
    spec = f"imagefolder:{world['folder']}?size=32&workers=2"
    run = _darht(["matrix", "--pool", str(world["pool"]), "--dataset", spec, "--n-samples", "18", "--eps", "16/255",
                  "--steps", "3", "--out", str(tmp_path / "m"), "--device", "cpu"], world, tmp_path)
    assert run.returncode == 0, run.stderr
    got = pd.read_csv(tmp_path / "m" / "transfer_matrix.csv", index_col=0)
    models = pd.read_csv(tmp_path / "m" / "models.csv")
    assert list(models["weights"]) == ["pretrained", "pretrained"] and not models["new_head"].any()
    env = json.loads((tmp_path / "m" / "env.json").read_text())
    assert env["memory"]["peak_memory_mb"] > 0 and env["memory"]["model_builds"] >= 2
    # the same matrix from the models as timm loads them, wrapped by hand with their own configs
    torch.manual_seed(0)
    ref_pool = {"res": world["res_ref"], "vit": world["vit_ref"]}
    for m in ref_pool.values():
        m.eval().requires_grad_(False)
    ref = transfer_matrix(ref_pool, world["x"], world["y"], AttackConfig("pgd", eps=16 / 255, steps=3), seed=0)
    assert not np.isnan(got.to_numpy(float)).any(), got  # every source fools itself on some images
    np.testing.assert_allclose(got.to_numpy(float), ref.matrix.to_numpy(float), atol=1 / 18 + 1e-9)
    np.testing.assert_allclose(models["clean_acc"], ref.models["clean_acc"], atol=1e-9)
    rec = _darht(["recommend", "--matrix", str(tmp_path / "m"), "--k", "2", "--out", str(tmp_path / "rec.json")],
                 world, tmp_path)
    assert rec.returncode == 0, rec.stderr
    assert sorted(json.loads((tmp_path / "rec.json").read_text())["sets"][0]["teachers"]) == ["res", "vit"]


def test_each_models_own_pretrained_config_is_applied(world):
    ds = load_dataset(f"imagefolder:{world['folder']}?size=32&workers=0")
    pool = load_pool(world["pool"], ds.num_classes, ds.in_chans, ds.image_size, names=["res"],
                     data_crop_pct=ds.options.crop_pct)
    res = pool["res"]
    assert res.input_size == (48, 48) and res.interpolation == "bilinear"
    assert res.crop_pct == pytest.approx(0.8 / 0.875)
    torch.testing.assert_close(res.mean.flatten(), torch.tensor(RES_MEAN))
    x, y = world["x"], world["y"]
    with torch.no_grad():
        own = (res(x).argmax(1) == y).float().mean().item()
        ref = (world["res_ref"](x).argmax(1) == y).float().mean().item()
    assert own == ref == 1.0
    # the same weights with the default normalization do not give that accuracy
    plain = PixelSpaceModel(res.model, (48, 48), None, None, crop_pct=0.8 / 0.875).eval()
    with torch.no_grad():
        assert (plain(x).argmax(1) == y).float().mean().item() < own


def test_a_head_that_does_not_fit_is_refused_or_replaced_when_asked(world, tmp_path):
    two = _write_folder(tmp_path / "two")
    import shutil

    shutil.rmtree(two / "cloud")
    run = _darht(["matrix", "--pool", str(world["pool"]), "--models", "res", "--dataset",
                  f"imagefolder:{two}?size=32&workers=0", "--n-samples", "4", "--steps", "1", "--out",
                  str(tmp_path / "m"), "--device", "cpu"], world, tmp_path)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "pretrained head has 3 classes but the data has 2; set num_classes: 2" in lines[0]
    assert not (tmp_path / "m").exists()
    asked = tmp_path / "asked.yaml"
    asked.write_text(yaml.safe_dump({"models": [{"name": "res", "arch": f"local-dir:{world['root'] / 'res'}",
                                                 "pretrained": True, "num_classes": 2}]}))
    pool = load_pool(asked, 2, 3, 32)
    assert pool["res"].new_head and pool["res"](torch.rand(1, 3, 32, 32)).shape == (1, 2)


def test_missing_hub_files_offline_are_one_line_at_once(world, tmp_path):
    pool = tmp_path / "p.yaml"
    pool.write_text(yaml.safe_dump({"models": [{"name": "gone", "arch": "hf-hub:acme/absent", "pretrained": True}]}))
    t0 = time.perf_counter()
    run = _darht(["matrix", "--pool", str(pool), "--dataset", f"imagefolder:{world['folder']}?size=32",
                  "--out", str(tmp_path / "m"), "--device", "cpu"], world, tmp_path)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "acme/absent" in lines[0] and str(world["hub"] / "hub") in lines[0] and "pretrained_file:" in lines[0]
    # a registry name whose weights are not cached, with no route to the Hub and HF_HUB_OFFLINE unset:
    # refused without huggingface_hub's retries
    pool.write_text(yaml.safe_dump({"models": [{"name": "r", "arch": "test_resnet.r160_in1k", "pretrained": True,
                                                "num_classes": 3}]}))
    run = _darht(["matrix", "--pool", str(pool), "--dataset", f"imagefolder:{world['folder']}?size=32",
                  "--out", str(tmp_path / "m2"), "--device", "cpu"], world, tmp_path, HF_HUB_OFFLINE="0",
                 HF_ENDPOINT="https://hub.invalid")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "timm/test_resnet.r160_in1k" in lines[0] and "pretrained_file:" in lines[0]
    assert time.perf_counter() - t0 < 60  # two refusals, no five-retry back-off


def test_registry_pretrained_weights_from_the_offline_cache(world, tmp_path, monkeypatch):
    """``test_resnet.r160_in1k`` with pretrained: true reads timm/test_resnet.r160_in1k from the cache."""
    torch.manual_seed(1)
    m = timm.create_model("test_resnet.r160_in1k")
    snap = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / REV
    timm.models.save_for_hf(m, str(snap), safe_serialization=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(REV)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pool = tmp_path / "p.yaml"
    pool.write_text(yaml.safe_dump({"models": [{"name": "r", "arch": "test_resnet.r160_in1k", "pretrained": True,
                                                "input_size": 32}]}))
    loaded = load_pool(pool, 1000, 3, 32)["r"]
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(m.pretrained_cfg["mean"]).view(1, 3, 1, 1), torch.tensor(m.pretrained_cfg["std"]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m.eval()((x - mean) / std))


def test_gray_data_meets_an_rgb_pretrained_model_replicated(world, tmp_path):
    entry_pool = tmp_path / "p.yaml"
    entry_pool.write_text(yaml.safe_dump({"models": [{"name": "res", "arch": f"local-dir:{world['root'] / 'res'}",
                                                      "pretrained": True}]}))
    gray = load_pool(entry_pool, 3, 1, 32)["res"]
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        # no crop here: an in-memory dataset has no crop of its own for the pretrained one to be relative to
        rgb = PixelSpaceModel(world["res_ref"].model, (48, 48), RES_MEAN, RES_STD, interpolation="bilinear").eval()
        torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": [{"name": "res", "arch": f"local-dir:{world['root'] / 'res'}",
                                               "pretrained": True, "mean": [0.1, 0.2], "std": [1, 1]}]}))
    with pytest.raises(UserError, match="model 'res': mean has 2 values but the model takes 3-channel images"):
        load_pool(bad, 3, 1, 32)


# ------------------------------------------------------------------------------------------ image folders
def test_folder_splits_labels_and_balanced_subsets_without_decoding(tmp_path):
    root = tmp_path / "ds"
    _write_folder(root / "train", per_class=4)
    _write_folder(root / "val", per_class=3, seed=1)
    ds = load_dataset(f"imagefolder:{root}?size=24&workers=0")
    assert ds.has_train and ds.class_names == CLASSES and ds.num_classes == 3
    assert torch.bincount(ds.y_train).tolist() == [4, 4, 4] and torch.bincount(ds.y_test).tolist() == [3, 3, 3]
    idx = balanced_subset(ds.y_test, 6, seed=0)
    x = ds.images("test", idx)
    assert x.shape == (6, 3, 24, 24) and 0 <= float(x.min()) and float(x.max()) <= 1
    # the pixel space: shorter side to round(24 / 0.875) = 27, centre crop 24
    f = ds.test_files[int(idx[0])]
    with Image.open(f) as im:
        im = im.convert("RGB")
        w, h = im.size
        im = im.resize((27, max(27, round(h * 27 / w))) if w <= h else (max(27, round(w * 27 / h)), 27),
                       Image.BILINEAR)
        left, top = (im.size[0] - 24) // 2, (im.size[1] - 24) // 2
        ref = np.asarray(im.crop((left, top, left + 24, top + 24)), dtype=np.float32) / 255
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    # training batches stream in the order a generator gives, with labels that match
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([yb for _, yb in ds.batches("train", 5, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == sorted(ds.y_train.tolist())
    small = ds.with_train_subset(6, seed=0)
    assert torch.bincount(small.y_train).tolist() == [2, 2, 2]


def test_imagenet_folders_use_timms_label_order(tmp_path):
    for syn in ("n15075141", "n01440764"):
        (tmp_path / "val" / syn).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / syn / "a.JPEG")
    ds = load_dataset(f"imagenet:{tmp_path / 'val'}?size=8&workers=0")
    assert ds.num_classes == 1000 and sorted(ds.y_test.tolist()) == [0, 999] and not ds.has_train
    (tmp_path / "val" / "not_a_synset").mkdir()
    with pytest.raises(UserError, match="not_a_synset is not an ImageNet-1k synset"):
        load_dataset(f"imagenet:{tmp_path / 'val'}")


def test_bad_files_are_one_line_or_skipped_when_asked(tmp_path, caplog):
    root = _write_folder(tmp_path / "f", per_class=2)
    (root / "boat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = load_dataset(f"imagefolder:{root}?size=16&workers=2")
    with pytest.raises(UserError, match=r"broken\.jpg is not a readable image .*skip_bad=true"):
        ds.images("test")
    skipped = load_dataset(f"imagefolder:{root}?size=16&workers=0&skip_bad=true")
    assert len(skipped.test_files) == 6 and "broken.jpg" in caplog.text
    (root / "boat" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes\.txt is not an image file"):
        load_dataset(f"imagefolder:{root}")
    with pytest.raises(UserError, match="unknown image folder option 'sise'"):
        load_dataset(f"imagefolder:{root}?sise=3")
    with pytest.raises(UserError, match="folder not found"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")


def test_a_test_only_folder_cannot_train(tmp_path):
    from distill.trainer import TrainConfig, train

    root = _write_folder(tmp_path / "f", per_class=2)
    cfg = TrainConfig(method="standard", student="resnet18_cifar", dataset=f"imagefolder:{root}?size=16",
                      student_kwargs={"width": 2}, epochs=1, device="cpu")
    with pytest.raises(UserError, match="no training split"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_training_streams_a_split_folder_and_workers_change_nothing(tmp_path):
    """A train/ + val/ folder trains through the streamed batches; decoding in worker processes gives
    the very same student as decoding in this one, and as the same images held in memory (same order,
    same pixels, and the decoding leaves the global RNG of the attacks' random starts alone)."""
    from safetensors.torch import load_file

    from distill.trainer import TrainConfig, train

    root = tmp_path / "ds"
    _write_folder(root / "train", per_class=6)
    _write_folder(root / "val", per_class=2, seed=1)
    weights = []
    for workers in (0, 2):
        cfg = TrainConfig(method="pgd-at", student="resnet18_cifar", dataset=f"imagefolder:{root}?size=16&workers={workers}",
                          student_kwargs={"width": 2}, epochs=2, batch_size=6, eps=8 / 255, device="cpu",
                          method_kwargs={"steps": 1}, eval_samples=6, final_attacks=["clean"], seed=0)
        res = train(cfg, tmp_path / f"run{workers}")
        assert json.loads((tmp_path / f"run{workers}" / "metrics.json").read_text())["n_per_attack"]["clean"] == 6
        weights.append(load_file(str(res.run_dir / "student.safetensors")))
    # the same images held in memory train the same student: one batching rule for both kinds
    from transfer_analysis.data import ImageDataset

    folder = load_dataset(f"imagefolder:{root}?size=16&workers=0")
    as_uint8 = {s: (folder.images(s) * 255).round().to(torch.uint8) for s in ("train", "test")}
    memory = ImageDataset(folder.name, as_uint8["train"], folder.y_train, as_uint8["test"], folder.y_test,
                          folder.num_classes)
    res = train(cfg, tmp_path / "memory", dataset=memory)
    weights.append(load_file(str(res.run_dir / "student.safetensors")))
    assert weights[0].keys() == weights[1].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])


def test_train_teacher_fine_tunes_a_pretrained_model_at_its_own_size(world, tmp_path):
    """train-teacher --pretrained: pretrained weights, a new head, the pretrained mean/std and input size."""
    run = _darht(["train-teacher", "--arch", f"local-dir:{world['root'] / 'res'}", "--pretrained", "--dataset",
                  "synthetic:num_classes=2,in_chans=3,image_size=16,n_train=32,n_test=16", "--method", "standard",
                  "--epochs", "1", "--batch-size", "16", "--eval-samples", "0", "--final-eval-samples", "8",
                  "--final-attacks", "clean", "--out", str(tmp_path / "ft.safetensors"), "--device", "cpu"],
                 world, tmp_path)
    assert run.returncode == 0, run.stderr
    entry = yaml.safe_load((tmp_path / "ft.yaml").read_text())["models"][0]
    assert entry["input_size"] == 48 and entry["mean"] == pytest.approx(list(RES_MEAN))
    assert "pretrained" not in entry.get("kwargs", {})  # the checkpoint holds every weight
    model = load_pool(tmp_path / "ft.yaml", 2, 3, 16)["ft"]
    assert model.weights == "checkpoint" and model(torch.rand(1, 3, 16, 16)).shape == (1, 2)
    # the backbone started from the pretrained weights: one epoch at a small LR leaves them close
    from safetensors.torch import load_file

    start = load_file(str(world["root"] / "res" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "ft.safetensors"))
    key = next(k for k, v in start.items() if v.ndim == 4)  # the first convolution
    assert torch.corrcoef(torch.stack([start[key].flatten(), tuned[key].flatten()]))[0, 1] > 0.9


def test_the_imagenet_pool_config_is_valid_and_keeps_every_head():
    from transfer_analysis.models import pretrained_config, read_pool_config

    entries = read_pool_config(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "imagenet-timm.yaml")
    assert len(entries) >= 6 and len({e.family for e in entries}) >= 4
    for e in entries:  # offline: timm's registry knows each pretrained config without downloading
        cfg = pretrained_config(e.arch)
        assert e.pretrained and cfg["num_classes"] == 1000 and cfg["input_size"] == (3, 224, 224), e.name

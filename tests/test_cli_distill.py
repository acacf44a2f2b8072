"""`darht train-teacher` and `darht distill` end to end on tiny synthetic data, and their user errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_CNN, TINY_VIT
from distill.cli import main
from distill.student import load_student
from transfer_analysis.models import load_pool

DATA = "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=64,n_test=32"
FAST = ["--device", "cpu", "--batch-size", "32", "--eval-samples", "8", "--final-eval-samples", "8"]

pytestmark = pytest.mark.slow


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_train_teacher_writes_weights_and_a_loadable_pool_entry(tmp_path: Path) -> None:
    out = tmp_path / "teachers" / "r18.safetensors"
    code = main(["train-teacher", "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}', "--dataset", DATA,
                 "--method", "fast-at", "--epochs", "2", "--eps", "0.1", "--out", str(out), "--final-attacks",
                 "clean,pgd5", *FAST])
    assert code == 0
    entry_file = out.with_suffix(".yaml")
    assert out.is_file() and entry_file.is_file() and (tmp_path / "teachers" / "r18.run" / "summary.csv").is_file()
    entry = yaml.safe_load(entry_file.read_text())["models"][0]
    assert entry["name"] == "r18" and entry["arch"] == "resnet18_cifar" and entry["kwargs"] == {"width": 4}
    assert entry["checkpoint"] == "r18.safetensors" and entry["input_size"] == 8
    assert entry["family"] == "cnn" and entry["training"] == "fast-at" and entry["eps"] == pytest.approx(0.1)
    assert len(entry["mean"]) == 1 and len(entry["std"]) == 1 and entry["std"][0] > 0
    # The entry loads as a pool (and pastes into one) and gives the trained model's logits.
    pool = load_pool(entry_file, num_classes=4, in_chans=1, image_size=8)
    trained = load_student(tmp_path / "teachers" / "r18.run")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(pool["r18"](x), trained(x), atol=1e-6)
    # A pool file made of pasted entries works the same.
    pasted = tmp_path / "teachers" / "pool.yaml"
    pasted.write_text(yaml.safe_dump({"models": [entry, {**entry, "name": "copy"}]}))
    assert sorted(load_pool(pasted, 4, 1, 8)) == ["copy", "r18"]


def test_train_teacher_ema_writes_the_moving_average(tmp_path: Path) -> None:
    """`train-teacher --ema D`: the pool entry's weights are the EMA of the checkpoint (not the
    last weights), and the decay is recorded in W.run/config.yaml."""
    from safetensors.torch import load_file

    from transfer_analysis.utils import safe_torch_load

    out = tmp_path / "t.safetensors"
    assert main(["train-teacher", "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}', "--dataset", DATA,
                 "--epochs", "2", "--ema", "0.5", "--out", str(out), "--final-attacks", "clean", *FAST]) == 0
    assert yaml.safe_load((tmp_path / "t.run" / "config.yaml").read_text())["ema"] == 0.5
    ckpt = safe_torch_load(tmp_path / "t.run" / "checkpoint.pt")
    avg = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    written = load_file(out)
    assert written and any(not torch.equal(ckpt["student"][f"backbone.model.{k}"], v) for k, v in written.items()
                           if f"backbone.model.{k}" in ckpt["student"])
    for key, value in written.items():
        assert torch.equal(value, avg[f"backbone.model.{key}"]), key


def test_train_teacher_input_size_resizes_inside_the_model(tmp_path: Path) -> None:
    # a model built for 16x16 inputs, trained on 8x8 images: the pool entry records input_size 16
    out = tmp_path / "big.safetensors"
    assert main(["train-teacher", "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}', "--dataset", DATA,
                 "--epochs", "1", "--input-size", "16", "--out", str(out), "--final-attacks", "clean", *FAST]) == 0
    entry = yaml.safe_load(out.with_suffix(".yaml").read_text())["models"][0]
    assert entry["input_size"] == 16 and entry["kwargs"] == {"width": 4}
    trained = load_student(tmp_path / "big.run")
    assert trained.spec["input_size"] == [16, 16]
    pool = load_pool(out.with_suffix(".yaml"), num_classes=4, in_chans=1, image_size=8)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(pool["big"](x), trained(x), atol=1e-6)


def test_train_teacher_user_errors(tmp_path: Path, capsys) -> None:
    base = ["train-teacher", "--arch", "resnet18_cifar", "--dataset", DATA, "--device", "cpu"]
    assert main([*base, "--method", "darht", "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "teacher method must be one of standard, fast-at, pgd-at, trades" in _err_line(capsys)
    assert main([*base, "--out", str(tmp_path / "t.pt")]) == 2
    assert ".safetensors" in _err_line(capsys)
    assert main([*base, "--model-kwargs", "[1]", "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "--model-kwargs must be a JSON object" in _err_line(capsys)
    assert not any(tmp_path.iterdir())


def test_distill_end_to_end(tmp_path: Path, write_pool) -> None:
    pool = write_pool([{"name": "cnn", **TINY_CNN}, {"name": "vit", **TINY_VIT}])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"epochs": 3, "lr": 0.05, "method_kwargs": {"steps": 2, "p_adv": 0.5},
                                      "eval_pgd_steps": 2, "final_check_eps_sweep": False}))
    run = tmp_path / "run"
    code = main(["distill", "--method", "darht", "--student", "resnet18_cifar", "--student-kwargs", '{"width": 4}',
                 "--pool", str(pool), "--teachers", "cnn,vit", "--dataset", DATA, "--epochs", "2", "--eps", "8/255",
                 "--config", str(config), "--final-attacks", "clean,fgsm,pgd5,transfer:cnn", "--out", str(run),
                 *FAST])
    assert code == 0
    for name in ("config.yaml", "env.json", "summary.csv", "metrics.json", "student.safetensors", "checkpoint.pt"):
        assert (run / name).is_file(), name
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["lr"] == 0.05  # the flag beats --config, which beats the defaults
    assert cfg["teachers"] == ["cnn", "vit"] and cfg["eps"] == pytest.approx(8 / 255)
    assert cfg["resolved"]["method"]["p_adv"] == 0.5 and cfg["resolved"]["student"]["num_teachers"] == 2
    with open(run / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert {"epoch", "lr", "loss", "ce", "kd", "w_cnn", "w_vit", "train_acc", "test_clean_acc",
            "test_pgd_acc"} <= set(rows[0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"clean", "fgsm", "pgd5", "transfer:cnn"}
    assert isinstance(metrics["worst_case"], float) and metrics["n"] == 8
    assert metrics["training"]["method"] == "darht"
    env = json.loads((run / "env.json").read_text())
    assert env["device"] == "cpu"
    student = load_student(run)
    assert student.forward_with_map(torch.rand(2, 1, 8, 8))[1].shape == (2, 2, 4)
    # --resume of a finished run with no other option: config.yaml supplies everything, nothing retrains
    before = (run / "summary.csv").read_text()
    assert main(["distill", "--out", str(run), "--resume", "--device", "cpu"]) == 0
    assert (run / "summary.csv").read_text() == before


def test_distill_user_errors(tmp_path: Path, write_pool, capsys) -> None:
    pool = write_pool([{"name": "cnn", **TINY_CNN}])
    run = tmp_path / "run"
    base = ["distill", "--student", "resnet18_cifar", "--dataset", DATA, "--out", str(run), "--device", "cpu"]
    cases = [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "darht"], "needs teachers"),
        (["--method", "darht", "--pool", str(pool), "--teachers", "cnn,ghost"], "ghost not in"),
        (["--method", "darht", "--teachers", "cnn"], "--teachers needs --pool"),
        (["--method", "mtard", "--pool", str(pool), "--teachers", "cnn"], "exactly 2 teacher(s) (ROBUST,CLEAN)"),
        (["--method", "pgd-at", "--student-kwargs", "{width: 4}"], "--student-kwargs is not valid JSON"),
        (["--method", "pgd-at", "--method-kwargs", '{"betta": 1}'], "has no option 'betta'"),
        (["--method", "pgd-at", "--eps", "8/0"], "divides by zero"),
        (["--method", "pgd-at", "--config", str(tmp_path / "missing.yaml")], "config file not found"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        line = _err_line(capsys)
        assert line.startswith("darht distill: error:") and message in line, line
    assert not run.exists()  # no half-written output

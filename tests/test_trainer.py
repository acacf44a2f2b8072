"""The trainer: config resolution, LR schedules, run directory, bit-identical resume, numerical faults."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from distill.methods import get_method_class
from distill.methods.darht import DARHT
from distill.student import load_student
from distill.trainer import NumericalFault, TrainConfig, lr_factor, resolve_config, train
from transfer_analysis.data import Augment, make_synthetic
from transfer_analysis.errors import UserError
from transfer_analysis.models import PixelSpaceModel, create_timm_model
from transfer_analysis.utils import safe_torch_load


@pytest.fixture(scope="module")
def data():
    """96 training images of 1x8x8 (3 batches of 32) with augmentation on, so its RNG is exercised."""
    ds = make_synthetic(num_classes=4, in_chans=1, image_size=8, n_train=96, n_test=32, seed=1)
    return dataclasses.replace(ds, augment=Augment(crop_padding=1, flip=True))


def _teachers() -> dict[str, nn.Module]:
    out = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(100 + i)
        out[name] = PixelSpaceModel(create_timm_model("resnet18_cifar", num_classes=4, in_chans=1, width=4))
    return out


def _config(**overrides) -> dict:
    cfg = {"method": "darht", "student": "resnet18_cifar", "student_kwargs": {"width": 4}, "dataset": "synthetic",
           "method_kwargs": {"steps": 2}, "epochs": 3, "batch_size": 32, "eps": 0.1, "eval_samples": 8,
           "eval_pgd_steps": 2, "final_attacks": ["clean", "pgd5"], "final_eval_samples": 8,
           "final_check_eps_sweep": False, "device": "cpu", "seed": 3}
    cfg.update(overrides)
    return cfg


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_resolve_config_uses_the_method_protocol_and_validates() -> None:
    cfg = resolve_config({"method": "darht", "student": "resnet18_cifar", "dataset": "cifar10"})
    assert (cfg.epochs, cfg.batch_size, cfg.weight_decay, cfg.lr) == (200, 256, 5e-4, 0.1)
    assert cfg.milestones == pytest.approx([0.575, 0.8, 0.925])
    cfg = resolve_config({"method": "fast-at", "student": "s", "dataset": "d", "eps": "4/255", "lr": 0.05})
    assert (cfg.lr_schedule, cfg.lr, cfg.eps) == ("cyclic", 0.05, pytest.approx(4 / 255))
    with pytest.raises(UserError, match="unknown option 'epoch'.*did you mean 'epochs'"):
        resolve_config({"method": "darht", "student": "s", "dataset": "d", "epoch": 3})
    with pytest.raises(UserError, match="epochs must be a positive integer"):
        resolve_config({"method": "darht", "student": "s", "dataset": "d", "epochs": 0})
    with pytest.raises(UserError, match="milestones"):
        resolve_config({"method": "darht", "student": "s", "dataset": "d", "milestones": [0.8, 0.5]})
    with pytest.raises(UserError, match="unknown attack"):
        resolve_config({"method": "darht", "student": "s", "dataset": "d", "final_attacks": "pgd,nope"})
    with pytest.raises(UserError, match="not inside `method_kwargs`"):
        resolve_config({"method": "darht", "student": "s", "dataset": "d", "method_kwargs": {"eps": 0.1}})
    base = {"method": "darht", "student": "s", "dataset": "d", "final_attacks": "clean,pgd20,autoattack"}
    assert resolve_config({**base, "final_attack_samples": {"AutoAttack": 200}}).final_attack_samples == \
        {"autoattack": 200}
    for bad, match in [({"cw": 5}, "final_attack_samples: .*'cw', which is not among the attacks run"),
                       ({"clean": 5}, "final_attack_samples: clean accuracy is always measured"),
                       ({"pgd20": 0}, "final_attack_samples: .*'pgd20' must be a positive integer"),
                       ([5], "final_attack_samples: .*maps attack names to sample counts")]:
        with pytest.raises(UserError, match=match):
            resolve_config({**base, "final_attack_samples": bad})


def test_lr_schedules() -> None:
    base = {"method": "standard", "student": "s", "dataset": "d", "epochs": 10}
    step = TrainConfig(**base, lr_schedule="step", milestones=[0.5, 0.8], gamma=0.1)
    assert [round(lr_factor(e * 4, 4, step), 6) for e in (0, 4, 5, 7, 8, 9)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    cos = TrainConfig(**base, lr_schedule="cosine")
    assert lr_factor(0, 4, cos) == 1.0 and lr_factor(20, 4, cos) == pytest.approx(0.5)
    cyc = TrainConfig(**base, lr_schedule="cyclic")
    assert lr_factor(15, 4, cyc) == pytest.approx(1.0) and lr_factor(39, 4, cyc) == pytest.approx(0.0)
    warm = TrainConfig(**base, lr_schedule="constant", warmup_epochs=1)
    assert [lr_factor(i, 4, warm) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_run_directory_and_summary(data, tmp_path: Path) -> None:
    teachers = _teachers()
    before = {n: {k: v.clone() for k, v in t.state_dict().items()} for n, t in teachers.items()}
    result = train(_config(epochs=2), tmp_path / "run", dataset=data, teachers=teachers)
    run = result.run_dir
    assert result.completed
    for name in ("config.yaml", "env.json", "summary.csv", "metrics.json", "student.safetensors", "checkpoint.pt",
                 "eval_indices.json", "final_eval_indices.json"):
        assert (run / name).is_file(), name
    rows = _read_csv(run / "summary.csv")
    assert list(rows[0]) == ["epoch", "lr", "loss", "ce", "kd", "adv_batch", "w_a", "w_b", "train_acc",
                             "test_clean_acc", "test_pgd_acc", "epoch_time_s"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "train_acc", "test_clean_acc", "test_pgd_acc"):
            assert 0 <= float(row[key]) < 100
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"n", "eps", "accuracy", "worst_case", "flags", "settings", "training"} <= set(metrics)
    assert metrics["n"] == 8 and set(metrics["accuracy"]) == {"clean", "pgd5"}
    assert metrics["training"]["epochs"] == 2 and metrics["training"]["teachers"] == ["a", "b"]
    # on CPU the process peak RSS: at least the 200+ MB torch itself takes
    assert metrics["training"]["peak_memory_kind"] == "process peak RSS" and metrics["training"]["peak_memory_mb"] > 100
    assert json.loads((run / "eval_indices.json").read_text())["n"] == 8
    # the reported model is the last one: student.safetensors == the last checkpoint's student
    ckpt = safe_torch_load(run / "checkpoint.pt")
    assert ckpt["epoch"] == 2
    saved = load_student(run)
    for key, value in saved.state_dict().items():
        assert torch.equal(value, ckpt["student"][key]), key
    # teachers frozen throughout: no BatchNorm statistic or weight moved
    for name, t in teachers.items():
        for key, value in t.state_dict().items():
            assert torch.equal(value, before[name][key])
    # an existing run is never clobbered by accident
    with pytest.raises(UserError, match="already holds a run"):
        train(_config(epochs=2), run, dataset=data, teachers=_teachers())


@pytest.mark.parametrize("method", ["darht", "mtard"])
def test_resume_is_bit_identical(data, tmp_path: Path, monkeypatch, method: str) -> None:
    cfg = _config(method=method)
    full = train(cfg, tmp_path / "full", dataset=data, teachers=_teachers())

    # 1) stop after the first epoch (a time-sliced job), 2) crash in the middle of the second epoch
    part = train(cfg, tmp_path / "part", dataset=data, teachers=_teachers(), stop_after_epochs=1)
    assert not part.completed and len(part.history) == 1
    cls = get_method_class(method)
    original = cls.step
    calls = {"n": 0}

    def crashing(self, student, x, y):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, student, x, y)

    monkeypatch.setattr(cls, "step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "part", dataset=data, teachers=_teachers(), resume=True)
    monkeypatch.setattr(cls, "step", original)
    assert safe_torch_load(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1  # the last good one
    resumed = train(cfg, tmp_path / "part", dataset=data, teachers=_teachers(), resume=True)

    assert resumed.completed
    a, b = full.student.state_dict(), resumed.student.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    def strip(history):  # NaN (teacher weights not computed in the CE phase) compares equal to NaN here
        return [{k: "nan" if v != v else v for k, v in row.items() if k != "epoch_time_s"} for row in history]

    assert strip(full.history) == strip(resumed.history)
    assert full.metrics["accuracy"] == resumed.metrics["accuracy"]
    rows = _read_csv(tmp_path / "part" / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_resume_refuses_a_changed_config(data, tmp_path: Path) -> None:
    train(_config(epochs=1), tmp_path / "run", dataset=data, teachers=_teachers(), stop_after_epochs=0)
    with pytest.raises(UserError, match="cannot resume.*lr was 0.1, now 0.2"):
        train(_config(epochs=1, lr=0.2), tmp_path / "run", dataset=data, teachers=_teachers(), resume=True)


def test_nonfinite_loss_stops_with_epoch_and_batch(data, tmp_path: Path, monkeypatch) -> None:
    original = DARHT.step
    calls = {"n": 0}

    def poisoned(self, student, x, y):
        calls["n"] += 1
        parts = original(self, student, x, y)
        if calls["n"] == 5:  # epoch 2, batch 2 (3 batches per epoch)
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(DARHT, "step", poisoned)
    with pytest.raises(NumericalFault, match="non-finite loss.*epoch 2, batch 2.*checkpoint of epoch 1"):
        train(_config(), tmp_path / "run", dataset=data, teachers=_teachers())
    assert isinstance(NumericalFault("x"), UserError)
    assert safe_torch_load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_plain_method_refuses_teachers_and_builds_a_plain_student(data, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="method 'pgd-at' uses no teachers, got"):  # an option that would be ignored
        train(_config(method="pgd-at", epochs=1, method_kwargs={"steps": 1}), tmp_path / "refused", dataset=data,
              teachers=_teachers())
    assert not (tmp_path / "refused").exists()
    result = train(_config(method="pgd-at", epochs=1, method_kwargs={"steps": 1}), tmp_path / "run", dataset=data)
    assert not result.student.has_map
    assert result.metrics["training"]["teachers"] == []
    assert list(_read_csv(tmp_path / "run" / "summary.csv")[0])[:4] == ["epoch", "lr", "loss", "ce_adv"]


def test_eval_seed_fixes_the_evaluation_images_across_training_seeds(data, tmp_path: Path) -> None:
    runs = [train(_config(method="pgd-at", epochs=1, method_kwargs={"steps": 1}, seed=s, eval_seed=7,
                          final_eval_samples=12), tmp_path / f"run{s}", dataset=data) for s in (0, 1)]
    per_epoch = [json.loads((r.run_dir / "eval_indices.json").read_text())["indices"] for r in runs]
    final = [json.loads((r.run_dir / "final_eval_indices.json").read_text())["indices"] for r in runs]
    assert per_epoch[0] == per_epoch[1] and final[0] == final[1] and len(final[0]) == 12
    assert not torch.equal(runs[0].student.state_dict()["backbone.model.head.weight"],
                           runs[1].student.state_dict()["backbone.model.head.weight"])


def test_adamw_optimizer_trains_resumes_and_unknown_is_refused(data, tmp_path: Path) -> None:
    cfg = _config(method="standard", method_kwargs={}, epochs=2, optimizer="adamw", lr=1e-3, weight_decay=0.05)
    full = train(cfg, tmp_path / "full", dataset=data)
    train(cfg, tmp_path / "cut", dataset=data, stop_after_epochs=1)
    resumed = train(cfg, tmp_path / "cut", dataset=data, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    state = safe_torch_load(tmp_path / "full" / "checkpoint.pt")["optimizer"]["state"]
    assert all("exp_avg_sq" in s for s in state.values())  # Adam moments, not SGD momentum
    with pytest.raises(UserError, match="unknown optimizer 'adam'; choose one of sgd, adamw"):
        resolve_config(_config(optimizer="adam"))


def test_compile_compiles_the_student_and_every_teacher(data, tmp_path: Path, monkeypatch) -> None:
    # inductor cannot run on every CPU box, so record the calls instead of compiling
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    teachers = _teachers()
    result = train(_config(epochs=1, compile=True), tmp_path / "run", dataset=data, teachers=teachers)
    assert result.completed
    assert [id(m) for m in compiled] == [id(result.student.backbone), *(id(t) for t in teachers.values())]
    compiled.clear()
    train(_config(epochs=1), tmp_path / "plain", dataset=data, teachers=_teachers())
    assert compiled == []


def test_ema_is_the_reported_model_recorded_and_resumable(data, tmp_path: Path) -> None:
    """--ema keeps an exponential moving average (weights and buffers), evaluated each epoch
    and saved as the student; recorded in config.yaml; a resume ends bit-identical."""
    from distill.student import load_student

    decay = 0.8
    cfg = _config(method="pgd-at", method_kwargs={"steps": 1}, epochs=2, ema=decay)
    full = train(cfg, tmp_path / "full", dataset=data)
    assert yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["ema"] == decay
    ckpt = safe_torch_load(tmp_path / "full" / "checkpoint.pt")
    raw, avg = ckpt["student"], {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert raw.keys() == avg.keys() and int(ckpt["ema"]["n_averaged"]) == 2 * 3  # 2 epochs x 3 steps
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)  # the average is not the last weights
    saved = load_student(tmp_path / "full").state_dict()
    for key, value in saved.items():  # the reported (saved) model is the average
        assert torch.equal(value, avg[key]), key
    assert "moving average" in full.metrics["training"]["model_selection"]
    train(cfg, tmp_path / "cut", dataset=data, stop_after_epochs=1)
    resumed = train(cfg, tmp_path / "cut", dataset=data, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    with pytest.raises(UserError, match="ema is the decay"):
        resolve_config(_config(ema=1.5))


def test_ema_update_rule_by_hand() -> None:
    from distill.trainer import _make_ema

    net = nn.Linear(1, 1, bias=False)
    ema = _make_ema(net, 0.9)
    seen = []
    for w in (1.0, 2.0, 4.0):
        with torch.no_grad():
            net.weight.fill_(w)
        ema.update_parameters(net)
        seen.append(float(ema.module.weight.detach()))
    assert seen == pytest.approx([1.0, 0.9 * 1.0 + 0.1 * 2.0, 0.9 * 1.1 + 0.1 * 4.0])


def test_run_killed_in_its_final_evaluation_resumes_there(data, tmp_path: Path, monkeypatch) -> None:
    """The final evaluation keeps a state; a resume finishes it without retraining."""
    import distill.evaluation.evaluate as ev  # where evaluate_robustness looks _attack_correct up

    cfg = _config(method="standard", method_kwargs={}, epochs=1, final_attacks=["clean", "fgsm", "pgd5"])
    full = train(cfg, tmp_path / "full", dataset=data)
    real = ev._attack_correct

    def killed(model, x, y, clean, name, *a, **k):
        if name == "pgd5":
            raise KeyboardInterrupt
        return real(model, x, y, clean, name, *a, **k)

    monkeypatch.setattr(ev, "_attack_correct", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", dataset=data)
    assert (tmp_path / "cut" / "final_eval.state.pt").is_file() and not (tmp_path / "cut" / "metrics.json").exists()
    monkeypatch.setattr(ev, "_attack_correct", real)
    resumed = train(cfg, tmp_path / "cut", dataset=data, resume=True)
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]
    assert not (tmp_path / "cut" / "final_eval.state.pt").exists()

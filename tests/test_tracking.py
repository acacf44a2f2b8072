"""TensorBoard and W&B (offline), each an optional extra, from darht distill and train-teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.cli import main

DATA = "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=64,n_test=32"
_DISTILL = ["distill", "--method", "pgd-at", "--student", "resnet18_cifar", "--student-kwargs", '{"width": 4}',
            "--method-kwargs", '{"steps": 1}', "--dataset", DATA, "--epochs", "2", "--batch-size", "32",
            "--eval-samples", "8", "--final-attacks", "clean,fgsm", "--final-eval-samples", "8", "--device", "cpu"]


def test_tensorboard_event_files_hold_the_epoch_and_final_tags(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main([*_DISTILL, "--tensorboard", "--out", str(run)]) == 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/ce_adv", "train/lr", "train/acc", "test/clean_acc", "test/pgd_acc",
            "time/epoch_s", "final/clean_acc", "final/fgsm_acc", "final/worst_case_acc"} <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    import csv

    with open(run / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [e.value for e in acc.Scalars("test/pgd_acc")] == pytest.approx([float(r["test_pgd_acc"]) for r in rows])


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main([*_DISTILL, "--log-wandb", "--wandb-project", "darht-test", "--out", str(run)]) == 0
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), sorted(p.name for p in (run / "wandb").iterdir())


def test_tracking_flags_do_not_block_a_resume(tmp_path):
    """Tracking is not part of what defines a run: resuming with or without it is allowed."""
    pytest.importorskip("tensorboard")
    from distill.trainer import train

    cfg = {"method": "standard", "student": "resnet18_cifar", "student_kwargs": {"width": 4}, "dataset": DATA,
           "epochs": 2, "batch_size": 32, "eval_samples": 4, "final_attacks": ["clean"], "device": "cpu"}
    train(cfg, tmp_path / "r", stop_after_epochs=1)
    result = train({**cfg, "tensorboard": True}, tmp_path / "r", resume=True)
    assert result.completed and Path(tmp_path / "r" / "tensorboard").is_dir()

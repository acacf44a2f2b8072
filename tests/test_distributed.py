"""Data-parallel runs under ``torchrun`` on CPU (gloo): distillation and the matrix with 2 processes.

Two processes on a loaded 2-core machine: every run is tiny. The equivalence with one process is
checked on a ViT student (LayerNorm only): batch norm computes its statistics per rank (DDP
without SyncBatchNorm), which changes a tiny 8x8 ResNet's first gradient by ~100%, so a BN
student is checked for everything else (files written by rank 0 only, all-reduced logs,
bit-identical resume with 2 processes).
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_CNN, TINY_VIT
from distill.cli import main

pytestmark = pytest.mark.slow  # end-to-end runs of a subcommand under torchrun

REPO = Path(__file__).resolve().parents[1]
DATASET = "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=128,n_test=32"
VIT_KWARGS = '{"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}'


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m distill.cli ARGS``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "distill.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_distill_with_two_processes_matches_one(tmp_path: Path) -> None:
    from distill.student import load_student

    args = ["distill", "--method", "pgd-at", "--method-kwargs", '{"start": "zero", "steps": 2}',
            "--student", "vit_tiny_patch16_224", "--student-kwargs", VIT_KWARGS, "--dataset", DATASET,
            "--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--eval-samples", "8", "--eval-pgd-steps", "1",
            "--final-attacks", "clean", "--final-eval-samples", "8", "--device", "cpu", "--seed", "0"]
    assert main([*args, "--out", str(tmp_path / "one"), "--log-level", "WARNING"]) == 0
    proc = _torchrun([*args, "--out", str(tmp_path / "two")], cwd=tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    # the same files, no temporaries, and one set of INFO logs (rank 1 reports warnings only)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert proc.stderr.count("epoch 2/2:") == 1
    # the same global batch of 32 (16 per process): the same weights up to floating point
    w1, w2 = load_student(one).state_dict(), load_student(two).state_dict()
    for key, value in w1.items():
        assert torch.allclose(w2[key], value, rtol=1e-4, atol=1e-6), key
    # the logged sums are all-reduced: the summary is what one process logs
    r1, r2 = _rows(one / "summary.csv"), _rows(two / "summary.csv")
    assert len(r1) == len(r2) == 2
    for a, b in zip(r1, r2):
        assert a["train_acc"] == b["train_acc"] and a["lr"] == b["lr"]
        for key in ("loss", "ce_adv", "test_clean_acc", "test_pgd_acc"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5), key


def test_darht_with_two_processes_matches_one(tmp_path: Path, write_pool) -> None:
    """DDP with the feature map: its slices get no gradient in the CE phase (unused parameters),
    and the map goes through DDP in the CE+KD and KD phases; teachers stay plain on each rank."""
    from distill.student import load_student

    pool = write_pool([{"name": "cnn", **TINY_CNN}, {"name": "vit", **TINY_VIT}])
    args = ["distill", "--method", "darht", "--pool", str(pool), "--teachers", "cnn,vit",
            "--method-kwargs", '{"start": "zero", "steps": 1, "p_adv": 1.0, "phase_epochs": [1, 2]}',
            "--student", "vit_tiny_patch16_224", "--student-kwargs", VIT_KWARGS, "--dataset", DATASET,
            "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--eval-samples", "8", "--eval-pgd-steps", "1",
            "--final-attacks", "clean", "--final-eval-samples", "8", "--device", "cpu", "--seed", "0"]
    assert main([*args, "--out", str(tmp_path / "one"), "--log-level", "WARNING"]) == 0
    _torchrun([*args, "--out", str(tmp_path / "two")], cwd=tmp_path)
    one, two = load_student(tmp_path / "one"), load_student(tmp_path / "two")
    assert one.has_map and one.num_teachers == 2
    w1, w2 = one.state_dict(), two.state_dict()
    for key, value in w1.items():
        assert torch.allclose(w2[key], value, rtol=1e-4, atol=1e-6), key
    r1, r2 = _rows(tmp_path / "one" / "summary.csv"), _rows(tmp_path / "two" / "summary.csv")
    assert [float(r["kd"]) > 0 for r in r1] == [False, True, True]  # the three phases ran
    # DARHT's teacher weights exp(-CE_k) use the batch-mean CE, so each rank weighs its half of the
    # batch with its own weights: the KD term (and so the loss) differs slightly from one process
    for a, b in zip(r1, r2):
        assert float(b["ce"]) == pytest.approx(float(a["ce"]), rel=1e-5)
        for key in ("loss", "kd"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-3, abs=1e-7), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resume_config() -> dict:
    return {"method": "pgd-at", "student": "resnet18_cifar", "student_kwargs": {"width": 4}, "dataset": "synthetic",
            "method_kwargs": {"steps": 2}, "epochs": 2, "batch_size": 32, "eps": 0.1, "eval_samples": 8,
            "eval_pgd_steps": 1, "final_attacks": ["clean"], "final_eval_samples": 8,
            "final_check_eps_sweep": False, "device": "cpu", "seed": 3}


def _resume_worker(rank: int, port: int, root: str) -> None:
    """One rank: an uninterrupted 2-process run and a stopped-then-resumed one (same process group)."""
    import torch.distributed as dist

    import distill.trainer as trainer
    from transfer_analysis.data import make_synthetic

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    writes: list[str] = []
    if rank != 0:  # record any file this rank would write
        for name in ("atomic_torch_save", "atomic_write_json", "write_run_config", "write_env_json",
                     "save_student", "save_indices", "_write_summary", "prepare_out_dir"):
            for module in (trainer.loop, trainer.checkpoint, trainer.config):  # wherever the trainer calls it
                if hasattr(module, name):
                    setattr(module, name, lambda *a, _n=name, **k: writes.append(_n))
    data = make_synthetic(num_classes=4, in_chans=1, image_size=8, n_train=128, n_test=32, seed=1)
    base = Path(root)
    try:
        full = trainer.train(_resume_config(), base / "full", dataset=data)
        part = trainer.train(_resume_config(), base / "part", dataset=data, stop_after_epochs=1)
        assert not part.completed and len(part.history) == 1
        if rank == 0:
            shutil.copytree(base / "part", base / "part_copy")
        dist.barrier()
        resumed = trainer.train(_resume_config(), base / "part", dataset=data, resume=True)
        assert resumed.completed and writes == []
        for key, value in full.student.state_dict().items():
            assert torch.equal(resumed.student.state_dict()[key], value), key
        if rank == 0:  # the other ranks do not evaluate (NaN test accuracies)
            for a, b in zip(full.history, resumed.history):
                assert {k: v for k, v in a.items() if k != "epoch_time_s"} == \
                    {k: v for k, v in b.items() if k != "epoch_time_s"}
    finally:
        dist.destroy_process_group()


def test_distill_two_processes_resume_is_bit_identical(tmp_path: Path, caplog) -> None:
    import torch.multiprocessing as mp

    from distill.trainer import train
    from transfer_analysis.data import make_synthetic
    from transfer_analysis.utils import safe_torch_load

    mp.spawn(_resume_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    full = tmp_path / "full"
    assert sorted(p.name for p in full.iterdir()) == sorted(
        ["checkpoint.pt", "config.yaml", "env.json", "eval_indices.json", "final_eval_indices.json",
         "metrics.json", "student.safetensors", "summary.csv"])
    ckpt = safe_torch_load(full / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    rows = _rows(full / "summary.csv")
    assert [float(r["train_acc"]) * 128 % 1 for r in rows] == [0.0, 0.0]  # counted over all 128 images
    # a different number of processes: resumes, with a warning that the random streams are re-seeded
    data = make_synthetic(num_classes=4, in_chans=1, image_size=8, n_train=128, n_test=32, seed=1)
    with caplog.at_level(logging.WARNING, logger="distill.trainer"):
        result = train(_resume_config(), tmp_path / "part_copy", dataset=data, resume=True)
    assert result.completed and len(result.history) == 2
    assert "resuming a run of 2 process(es) with 1" in caplog.text


def test_matrix_with_two_processes_matches_one(tmp_path: Path, write_pool) -> None:
    pool = write_pool([{"name": "cnn_a", **TINY_CNN}, {"name": "vit", **TINY_VIT}, {"name": "cnn_b", **TINY_CNN}])
    args = ["matrix", "--pool", str(pool), "--dataset", DATASET, "--n-samples", "16", "--eps", "0.1", "--steps", "2",
            "--batch-size", "8", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "one"), "--log-level", "WARNING"]) == 0
    _torchrun([*args, "--out", str(tmp_path / "two")], cwd=tmp_path)
    for name in ("transfer_matrix.csv", "transfer_long.csv", "models.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    # each source was attacked once, by one rank, into the shared cache
    assert len(list((tmp_path / "two" / "cache" / "adv").iterdir())) == 3


def test_evaluate_with_two_processes_matches_one(tmp_path: Path) -> None:
    """Darht evaluate under torchrun shards the samples (fixed, seeded groups) and rank 0
    writes the same metrics as one process, AutoAttack included."""
    import json

    from safetensors.torch import save_file

    from transfer_analysis.models import create_timm_model

    torch.manual_seed(0)
    net = create_timm_model("resnet18_cifar", num_classes=4, in_chans=1, width=4)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    args = ["evaluate", "--model", str(tmp_path / "w.safetensors"), "--arch", "resnet18_cifar", "--model-kwargs",
            '{"width": 4}', "--dataset", DATASET, "--n-samples", "24", "--batch-size", "8", "--eps", "0.1",
            "--attacks", "clean,fgsm,pgd5,cw5,autoattack", "--device", "cpu", "--seed", "1"]
    assert main([*args, "--out", str(tmp_path / "one.json"), "--log-level", "WARNING"]) == 0
    _torchrun([*args, "--out", str(tmp_path / "two.json")], cwd=tmp_path)
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert two["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    # 24 samples in groups of 8: one process attacked all 3 groups, the two processes 2 and 1
    assert one["diagnostics"]["groups_per_process"] == [3] and two["diagnostics"]["groups_per_process"] == [2, 1]
    assert one["accuracy"] == two["accuracy"] and one["worst_case"] == two["worst_case"]
    assert one["flags"] == two["flags"]
    assert one["diagnostics"]["autoattack"] == two["diagnostics"]["autoattack"]
    assert not list(tmp_path.glob("*.state.pt"))

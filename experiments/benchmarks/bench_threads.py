"""Thread policy and parallel students: the ratios of one epoch under load, and study throughput.

Part 1, one ``darht distill --method pgd-at`` epoch (ResNet-18 width 4, 3000 synthetic
Fashion-MNIST-sized images, PGD-10), each in a fresh process:

- idle, default threads (the CPUs this process may use);
- beside one other CPU-bound process (a one-thread matrix-multiply loop), default threads;
- the same, ``--threads 1``;
- the same, default threads with ``OMP_WAIT_POLICY=PASSIVE``; and idle with ``--threads 1``.

Part 2, study throughput: a tiny study's students (``darht pipeline``) with ``--jobs 1`` (all
threads) and ``--jobs 2`` (half each), in students per hour.

Run on an otherwise idle machine (the figures are ratios between runs of this script):

    python experiments/benchmarks/bench_threads.py

Ends with one line of figures. On a 16-core machine the expected shape (an estimate, not a
measurement) is: the loaded/idle ratio grows with the threads a run spins, one thread per job
stays near its idle time, and ``--jobs J`` raises students per hour until J one-thread students
fill the cores (small convolutions do not use 16 threads well).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DATA = "synthetic:num_classes=10,in_chans=1,image_size=28,n_train=3000,n_test=200"
BURN = ("import torch, time\ntorch.set_num_threads(1)\na = torch.rand(512, 512)\nt = time.time()\n"
        "while time.time() - t < 3600:\n    a = (a @ a).clamp_(-1, 1)\n")


def _epoch(tmp: Path, tag: str, threads: int | None, env_extra: dict[str, str] | None = None) -> float:
    out = tmp / tag
    argv = [sys.executable, "-m", "distill.cli", "distill", "--method", "pgd-at", "--student", "resnet18_cifar",
            "--student-kwargs", '{"width": 4}', "--dataset", DATA, "--epochs", "1", "--batch-size", "128",
            "--eval-samples", "0", "--final-eval-samples", "10", "--final-attacks", "clean", "--device", "cpu",
            "--out", str(out), *(["--threads", str(threads)] if threads else [])]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DARHT_THREADS", "MKL_NUM_THREADS")}
    env.update(env_extra or {})
    subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True)
    with open(out / "summary.csv") as fh:
        header, row = fh.readline().strip().split(","), fh.readline().strip().split(",")
    return float(row[header.index("epoch_time_s")])


def _study(tmp: Path, jobs: int, epochs: int = 2) -> float:
    cfg = {"study": "bench", "dataset": "synthetic:num_classes=4,in_chans=1,image_size=16,n_train=512,n_test=64",
           "seed": 0, "eps": 0.1, "batch_size": 64,
           "pool": [{"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 2}, "train": {"method": "standard",
                                                                                           "epochs": 1}}
                    for n in ("a", "b")],
           "matrix": {"n_samples": 32, "steps": 2}, "recommend": {"k": 2},
           "training": {"epochs": epochs, "lr": 0.1, "milestones": [0.5], "weight_decay": 5e-4},
           "students": {"arch": "resnet18_cifar", "kwargs": {"width": 4}, "seeds": [0, 1, 2, 3], "eval_samples": 32,
                        "runs": [{"method": "pgd-at", "teacher_set": "none"}, {"method": "rslad", "teacher_set": "single"}]},
           "evaluation": {"n_samples": 64, "attacks": ["clean", "pgd20"]}}
    config = tmp / f"study{jobs}-{epochs}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp / f"study{jobs}-{epochs}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DARHT_THREADS")}
    base = [sys.executable, "-m", "distill.cli", "pipeline", "--config", str(config), "--out", str(out),
            "--device", "cpu"]
    subprocess.run([*base], cwd=ROOT, env=env, check=True, capture_output=True)  # teachers, matrix, ...
    import shutil

    shutil.rmtree(out / "students")
    t0 = time.perf_counter()
    subprocess.run([*base, "--resume", "--jobs", str(jobs)], cwd=ROOT, env=env, check=True, capture_output=True)
    n = len(cfg["students"]["seeds"]) * len(cfg["students"]["runs"])
    return n / ((time.perf_counter() - t0) / 3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-only", action="store_true", help="part 2 only (students per hour)")
    parser.add_argument("--student-epochs", type=int, nargs="+", default=[2], metavar="E",
                        help="epochs per student of part 2, one measurement each (default 2: start-up dominates)")
    args = parser.parse_args()
    from transfer_analysis.threads import available_cpus

    cpus = available_cpus()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.study_only:
            _print_study(tmp, cpus, args.student_epochs)
            return
        idle = _epoch(tmp, "idle", None)
        idle1 = _epoch(tmp, "idle1", 1)
        burner = subprocess.Popen([sys.executable, "-c", BURN])
        try:
            time.sleep(2)
            loaded = _epoch(tmp, "loaded", None)
            loaded1 = _epoch(tmp, "loaded1", 1)
            passive = _epoch(tmp, "passive", None, {"OMP_WAIT_POLICY": "PASSIVE"})
        finally:
            burner.kill()
            burner.wait()
        figures = _print_study(tmp, cpus, args.student_epochs, quiet=True)
    rate1, rate2 = figures[0]
    print(f"{cpus} CPUs available; one pgd-at epoch:")
    print(f"  idle, default ({cpus} threads): {idle:.1f} s; idle, 1 thread: {idle1:.1f} s")
    print(f"  beside one CPU-bound process, default: {loaded:.1f} s ({loaded / idle:.2f}x idle)")
    print(f"  same, --threads 1: {loaded1:.1f} s (its idle time: {idle1:.1f} s)")
    print(f"  same, OMP_WAIT_POLICY=PASSIVE: {passive:.1f} s")
    for epochs, (r1, r2) in zip(args.student_epochs, figures):
        print(f"study throughput, {epochs}-epoch students: --jobs 1 {r1:.0f} students/h, --jobs 2 {r2:.0f} "
              f"students/h ({r2 / r1:.2f}x)")
    print("figures: " + json.dumps({"cpus": cpus, "idle_s": round(idle, 2), "loaded_ratio": round(loaded / idle, 2),
                                    "loaded_1thread_ratio": round(loaded1 / idle, 2),
                                    "passive_ratio": round(passive / idle, 2), "jobs1_per_h": round(rate1),
                                    "jobs2_per_h": round(rate2), "jobs_ratio": round(rate2 / rate1, 2)}))


def _print_study(tmp: Path, cpus: int, epochs_list: list[int], quiet: bool = False) -> list[tuple[float, float]]:
    """Students per hour with --jobs 1 and --jobs 2 for each student length; printed unless ``quiet``."""
    figures = [(_study(tmp, 1, e), _study(tmp, 2, e)) for e in epochs_list]
    if not quiet:
        for epochs, (r1, r2) in zip(epochs_list, figures):
            print(f"{cpus} CPUs; study throughput, {epochs}-epoch students: --jobs 1 {r1:.0f} students/h, --jobs 2 "
                  f"{r2:.0f} students/h ({r2 / r1:.2f}x)")
        print("figures: " + json.dumps({"cpus": cpus, **{f"jobs_ratio_{e}ep": round(r2 / r1, 2)
                                                         for e, (r1, r2) in zip(epochs_list, figures)}}))
    return figures


if __name__ == "__main__":
    main()

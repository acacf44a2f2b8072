"""Benchmark: ``darht distill`` throughput with 1 and with N data-parallel processes (torchrun).

Each run is ``python -m torch.distributed.run --standalone --nproc_per_node P -m distill.cli distill``
on synthetic data (PGD-AT, ResNet-18-CIFAR, the same global batch for every P) with
``OMP_NUM_THREADS=--threads`` per process; the throughput is training images per second over the
epochs after the first (warm-up), from ``summary.csv``'s ``epoch_time_s`` (rank 0's clock, which
includes the gradient all-reduce). Defaults run in about a minute on 2 CPU cores (gloo); on a
machine with N GPUs pass ``--device cuda --procs N --width 64 --n-train 20000``. Not a test.

Run:
    python experiments/benchmarks/bench_ddp.py [--procs 2] [--device cpu] [--threads 1]

The last line holds every figure: images/s with 1 and with N processes and the speedup.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(procs: int, out: Path, args: argparse.Namespace) -> float:
    """Train once with ``procs`` processes; images per second after the first epoch."""
    dataset = f"synthetic:num_classes=10,in_chans=3,image_size=32,n_train={args.n_train},n_test=64"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "distill.cli", "distill", "--method", "pgd-at", "--method-kwargs", json.dumps({"steps": args.steps}),
           "--student", "resnet18_cifar", "--student-kwargs", json.dumps({"width": args.width}),
           "--dataset", dataset, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--eval-samples", "0", "--final-attacks", "clean", "--final-eval-samples", "16",
           "--device", args.device, "--out", str(out), "--log-level", "WARNING"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, env=env, check=True)
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    iters = args.n_train // args.batch_size
    times = [float(r["epoch_time_s"]) for r in rows[1:]] or [float(rows[0]["epoch_time_s"])]
    return iters * args.batch_size * len(times) / sum(times)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2, help="processes of the data-parallel run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="PGD steps of the inner attack")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        one = _run(1, Path(tmp) / "one", args)
        many = _run(args.procs, Path(tmp) / "many", args)
    line = (f"bench_ddp device={args.device} threads/proc={args.threads} batch={args.batch_size}: 1 proc {one:.1f} img/s, "
            f"{args.procs} procs {many:.1f} img/s, speedup {many / one:.2f}x")
    print(line)
    return line


if __name__ == "__main__":
    main()

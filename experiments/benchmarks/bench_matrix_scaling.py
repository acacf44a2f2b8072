"""Benchmark: how the transferability-matrix engine's time grows with the pool size N (not a test).

For each N (default 2, 4, 8) it times a fresh :func:`transfer_analysis.transfer_matrix` run (cache
wiped before each) on N small models (the same models as ``bench_matrix.py``: slim CIFAR ResNet-18s
and two-block ViTs, alternating) and fits

- ``time = a N + b N²`` by least squares: ``a`` is the per-model cost (one clean pass and one
  attack per source), ``b`` the per-pair cost (one evaluation pass of each target on each source's
  adversarial images). Their ratio says from which N the evaluations dominate: ``N* = a / b``.
- the log-log slope ``p`` of ``time ∝ N^p`` between the smallest and the largest N: 1 while
  attacks dominate, tending to 2 as the pool grows.

Usage:
    python experiments/benchmarks/bench_matrix_scaling.py               # ~1-2 min on 2 CPU cores
    python experiments/benchmarks/bench_matrix_scaling.py --sizes 2,4,8,16 --n-samples 1024 --device cuda

The last line holds every figure (``key=value``).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench_matrix import build_models, timed  # the same models and timer (this directory is on sys.path)
from transfer_analysis.attacks import AttackConfig
from transfer_analysis.data import make_synthetic
from transfer_analysis.matrix import transfer_matrix
from transfer_analysis.utils import parse_eps, resolve_device


def fit_linear_quadratic(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``seconds ≈ a N + b N²`` (no intercept).

    Example:
        >>> a, b = fit_linear_quadratic([2, 4, 8], [2 * 1 + 4 * 0.5, 4 + 16 * 0.5, 8 + 64 * 0.5])
        >>> round(a, 6), round(b, 6)
        (1.0, 0.5)
    """
    s11 = sum(n * n for n in sizes)
    s12 = sum(n ** 3 for n in sizes)
    s22 = sum(n ** 4 for n in sizes)
    r1 = sum(n * t for n, t in zip(sizes, seconds))
    r2 = sum(n * n * t for n, t in zip(sizes, seconds))
    det = s11 * s22 - s12 * s12
    return (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2,4,8", help="pool sizes N, comma-separated (default 2,4,8)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's choice)")
    p.add_argument("--repeats", type=int, default=2, help="runs per N; the fastest is kept")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if len(sizes) < 2 or sizes[0] < 2:
        p.error("--sizes needs at least two pool sizes, each at least 2")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = AttackConfig("pgd", eps=parse_eps(args.eps), steps=args.steps)
    ds = make_synthetic(num_classes=args.num_classes, in_chans=args.in_chans, image_size=args.image_size,
                        n_train=args.num_classes, n_test=args.n_samples)
    x, y = ds.images("test"), ds.labels("test")
    models = build_models(sizes[-1], args.in_chans, args.num_classes, args.image_size, args.width)
    names = list(models)
    fig: dict[str, Any] = {"sizes": ",".join(map(str, sizes)), "n_samples": len(y), "steps": args.steps,
                           "threads": torch.get_num_threads(), "device": str(device)}
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        # warm-up at the timed shapes (first-call allocations), not timed
        transfer_matrix({k: models[k] for k in names[:2]}, x, y, AttackConfig("pgd", eps=cfg.eps, steps=1),
                        batch_size=args.batch_size, device=device)
        for n in sizes:
            pool = {k: models[k] for k in names[:n]}
            wall, cpu = timed(lambda: transfer_matrix(pool, x, y, cfg, batch_size=args.batch_size, device=device,
                                                      cache_dir=cache),
                              device, args.repeats, before=lambda: shutil.rmtree(cache, ignore_errors=True))
            fig[f"n{n}_s"], fig[f"n{n}_cpu_s"] = wall, cpu
            seconds.append(cpu if device.type == "cpu" else wall)
            print(f"N = {n}: {wall:.3f} s wall, {cpu:.3f} s CPU")  # noqa: T201 - a script's progress
    a, b = fit_linear_quadratic(sizes, seconds)
    fit = [a * n + b * n * n for n in sizes]
    fig["per_model_s"], fig["per_pair_s"] = a, b
    fig["crossover_n"] = a / b if b > 0 else math.inf
    fig["fit_max_rel_err"] = max(abs(f - t) / t for f, t in zip(fit, seconds))
    fig["loglog_slope"] = math.log(seconds[-1] / seconds[0]) / math.log(sizes[-1] / sizes[0])
    kind = "CPU" if device.type == "cpu" else "wall"
    print(f"[{kind} time] time ≈ {a:.4f} N + {b:.4f} N² s (largest misfit {fig['fit_max_rel_err']:.1%}): "  # noqa: T201
          f"per-pair evaluations dominate from N ≈ {fig['crossover_n']:.1f}; growth N^{fig['loglog_slope']:.2f} "
          f"from N = {sizes[0]} to {sizes[-1]}")
    print(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in fig.items()))  # noqa: T201
    return fig


if __name__ == "__main__":
    main()

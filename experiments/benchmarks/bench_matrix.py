"""Benchmark of the transferability-matrix engine (not a test).

On N small models it times

- ``engine``: :func:`transfer_analysis.transfer_matrix` from scratch (with its on-disk cache);
- ``per_pair``: what one writes without the toolkit: one torchattacks attack per ordered pair
  (N² attacks), each followed by the target's evaluation, plus one clean pass per model;
- ``floor``: the unavoidable work alone: the N single-source attacks, the N² evaluation passes
  and the N clean passes, with bare torchattacks and forward loops;
- ``add_one``: the engine adding one model to the cached pool of N, against ``fresh_n1``, a fresh
  engine run of the N + 1 models.

It prints the ratios against the aims (engine >= 0.8 N times faster than the per-pair loop,
within 1.15 of the floor, adding a model <= 0.4 of a fresh run), then every figure in one last
line (``key=value``).

Usage:
    python experiments/benchmarks/bench_matrix.py                 # ~1-2 min on 2 CPU cores
    python experiments/benchmarks/bench_matrix.py --n-models 8 --n-samples 512 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchattacks

from transfer_analysis.attacks import AttackConfig
from transfer_analysis.data import make_synthetic
from transfer_analysis.matrix import source_seed, transfer_matrix
from transfer_analysis.models import PoolEntry, build_pool_model
from transfer_analysis.utils import parse_eps, resolve_device


def build_models(n: int, in_chans: int, num_classes: int, image_size: int, width: int) -> dict[str, torch.nn.Module]:
    """n small models on the CPU, alternating a slim CIFAR ResNet-18 and a two-block ViT (seeded inits)."""
    models = {}
    for i in range(n):
        torch.manual_seed(1000 + i)
        if i % 2 == 0:
            entry = PoolEntry(name=f"cnn{i}", arch="resnet18_cifar", kwargs={"width": width}, family="cnn")
        else:
            entry = PoolEntry(name=f"vit{i}", arch="vit_tiny_patch16_224", family="vit",
                              kwargs={"patch_size": 4, "depth": 2, "embed_dim": 4 * width, "num_heads": 2})
        models[entry.name] = build_pool_model(entry, num_classes, in_chans, image_size, device="cpu")
    return models


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1,
          before: Callable[[], object] | None = None) -> tuple[float, float]:
    """Fastest wall time and fastest process CPU time of ``repeats`` calls of ``fn``.

    ``before`` runs untimed ahead of each call. CPU time counts only this process's work, so on a
    shared machine it is the steadier figure for CPU runs (on CUDA only wall time means anything).
    """
    wall, cpu = float("inf"), float("inf")
    for _ in range(max(1, repeats)):
        if before is not None:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def predict(model: torch.nn.Module, x: torch.Tensor, bs: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])


def attack(model: torch.nn.Module, cfg: AttackConfig, x: torch.Tensor, y: torch.Tensor, bs: int,
           seed: int) -> torch.Tensor:
    r = cfg.resolved()
    torch.manual_seed(seed)
    atk = torchattacks.PGD(model, eps=r.eps, alpha=r.step_size, steps=r.steps, random_start=True)
    return torch.cat([atk(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)])


def per_pair_loop(models, cfg, x, y, bs) -> torch.Tensor:
    """One attack per ordered pair, as a user would write it without a cache of x_adv."""
    names = list(models)
    clean = {n: predict(models[n], x, bs) for n in names}
    rates = torch.full((len(names), len(names)), float("nan"))
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            x_adv = attack(models[s], cfg, x, y, bs, seed=0)
            fs = predict(models[s], x_adv, bs) != y
            ft = predict(models[t], x_adv, bs) != y
            den = (clean[s] == y) & (clean[t] == y) & fs
            if den.any():
                rates[i, j] = (den & ft).sum() / den.sum()
    return rates


def floor_work(models, cfg, x, y, bs) -> None:
    """The N attacks, N² evaluation passes and N clean passes, nothing else."""
    names = list(models)
    for n in names:
        predict(models[n], x, bs)
    for s in names:
        x_adv = attack(models[s], cfg, x, y, bs, seed=source_seed(0, models[s].fingerprint))
        for t in names:
            predict(models[t], x_adv, bs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-models", type=int, default=4, help="N, the pool size (default 4)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--width", type=int, default=8, help="base width of the ResNets (ViT embed dim = 4x)")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small models gain nothing from more, and OpenMP spinning "
                        "makes timings erratic on shared cores; 0 = torch's choice)")
    p.add_argument("--repeats", type=int, default=2,
                   help="time the engine, the floor and adding a model this many times, keep the fastest (default 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    n = args.n_models
    cfg = AttackConfig("pgd", eps=parse_eps(args.eps), steps=args.steps)
    ds = make_synthetic(num_classes=args.num_classes, in_chans=args.in_chans, image_size=args.image_size,
                        n_train=args.num_classes, n_test=args.n_samples)
    x, y = ds.images("test"), ds.labels("test")
    models = build_models(n + 1, args.in_chans, args.num_classes, args.image_size, args.width)
    names = list(models)
    pool_n = {k: models[k] for k in names[:n]}
    bs = args.batch_size
    xd, yd = x.to(device), y.to(device)

    def on(dev: torch.device | str) -> None:
        for m in models.values():
            m.to(dev)

    # warm-up of every model's forward and backward at the timed shapes, not timed
    on(device)
    floor_work(models, AttackConfig("pgd", eps=cfg.eps, steps=1), xd, yd, bs)
    on("cpu")

    rep = max(1, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        fig: dict[str, Any] = {"n_models": n, "n_samples": len(y), "steps": args.steps,
                               "threads": torch.get_num_threads(), "device": str(device)}
        cache = Path(tmp) / "cache"
        fresh = Path(tmp) / "fresh"

        def wipe(*dirs: Path) -> Callable[[], None]:
            return lambda: [shutil.rmtree(d, ignore_errors=True) for d in dirs]

        def run(pool, cache_dir):
            return transfer_matrix(pool, x, y, cfg, batch_size=bs, device=device, cache_dir=cache_dir)

        t: dict[str, tuple[float, float]] = {}

        def keep(name: str, value: tuple[float, float]) -> None:
            old = t.get(name, (float("inf"), float("inf")))
            t[name] = (min(old[0], value[0]), min(old[1], value[1]))

        # engine and floor alternate, so load changes on a shared machine hit both alike
        for _ in range(rep):
            keep("engine", timed(lambda: run(pool_n, cache), device, 1, before=wipe(cache)))
            on(device)  # the floor gets its models on the device for free
            keep("floor", timed(lambda: floor_work(pool_n, cfg, xd, yd, bs), device, 1))
            on("cpu")
        on(device)
        keep("per_pair", timed(lambda: per_pair_loop(pool_n, cfg, xd, yd, bs), device, 1))
        on("cpu")
        res: dict[str, object] = {}

        def add_one() -> None:
            res["add"] = run(models, cache)

        def reset_to_n() -> None:  # the cache of the N-model run, without the added model's entries
            shutil.rmtree(cache, ignore_errors=True)
            run(pool_n, cache)

        keep("add_one", timed(add_one, device, rep, before=reset_to_n if rep > 1 else None))
        keep("fresh_n1", timed(lambda: run(models, fresh), device, rep, before=wipe(fresh)))
        keep("rerun", timed(lambda: run(models, cache), device, rep))
        fig["add_one_attacks"] = res["add"].stats["attacks_run"]  # type: ignore[attr-defined]
        fig["add_one_evaluations"] = res["add"].stats["target_evaluations"]  # type: ignore[attr-defined]
        for name, (wall, cpu) in t.items():
            fig[f"{name}_s"] = wall
            fig[f"{name}_cpu_s"] = cpu

    aim = 0.8 * n
    for kind, suffix in (("wall", "_s"), ("cpu", "_cpu_s")):
        if kind == "cpu" and device.type != "cpu":
            continue
        speedup = fig[f"per_pair{suffix}"] / fig[f"engine{suffix}"]
        over_floor = fig[f"engine{suffix}"] / fig[f"floor{suffix}"]
        add_ratio = fig[f"add_one{suffix}"] / fig[f"fresh_n1{suffix}"]
        fig[f"speedup_vs_per_pair_{kind}"] = speedup
        fig[f"engine_over_floor_{kind}"] = over_floor
        fig[f"add_over_fresh_{kind}"] = add_ratio
        print(f"[{kind} time] engine vs per-pair loop: {speedup:.2f}x faster (aim >= {aim:.1f}x = 0.8 N) "
              f"[{'ok' if speedup >= aim else 'MISSED'}]; engine / floor: {over_floor:.3f} (aim <= 1.15) "
              f"[{'ok' if over_floor <= 1.15 else 'MISSED'}]; add one / fresh N+1: {add_ratio:.3f} (aim <= 0.4) "
              f"[{'ok' if add_ratio <= 0.4 else 'MISSED'}]")
    print(f"adding one model ran {fig['add_one_attacks']} attack(s) and {fig['add_one_evaluations']} evaluation "
          f"pass(es) (2N+1 = {2 * n + 1}); a re-run took {fig['rerun_s']:.3f}s")
    print(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in fig.items()))
    # the last line holds every figure
    return fig


if __name__ == "__main__":
    main()

"""`darht matrix`: measure pairwise adversarial transferability across a pool of models.

Writes ``transfer_long.csv``, ``transfer_matrix.csv``, ``models.csv``, ``transfer_heatmap.png``,
``indices.json``, ``config.yaml`` and ``env.json`` into ``--out``. Per-source results are cached
(``<out>/cache`` or ``--cache DIR``), so re-running reuses them and a model added to the pool costs
one attack plus the missing evaluations.
"""

from __future__ import annotations

import argparse

from distill.cli import common

HELP = "Measure pairwise adversarial transferability across a pool of models"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``darht matrix`` (docs/cli.md)."""
    p.add_argument("--pool", required=True, help="pool YAML file (the schema: README, Data and the model pool)")
    common.add_data_arguments(p, n_samples=1000)
    p.add_argument("--attack", default="pgd",
                   help="pgd (default), fgsm, mifgsm, apgd, or any torchattacks L-inf attack name (e.g. bim)")
    p.add_argument("--eps", default="8/255", help="L-inf radius, a number or a fraction (default 8/255)")
    p.add_argument("--steps", type=int, default=None, help="attack iterations (default 10 where they apply)")
    p.add_argument("--step-size", default=None, help="step size, a number or a fraction (default eps/4)")
    p.add_argument("--no-random-start", action="store_true", help="PGD from the clean image (default: random start)")
    p.add_argument("--attack-kwargs", default=None,
                   help="extra arguments of the torchattacks class as JSON, e.g. '{\"decay\": 0.9}'")
    p.add_argument("--batch-size", type=int, default=256, help="images per attack/evaluation batch (default 256)")
    p.add_argument("--cache", default=None, help="cache directory, shareable between runs (default OUT/cache)")
    p.add_argument("--models", default=None, help="comma-separated subset of the pool's model names")
    p.add_argument("--out", required=True, help="output directory (re-running the same matrix into it updates the "
                                                "outputs; another matrix there is refused)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="an array task: attack only the sources with index %% N == I into --cache (or OUT/cache); "
                        "a run without --shard over the same cache assembles the matrix with no new attack")
    p.add_argument("--max-model-memory", default=None, metavar="SIZE",
                   help="most model weights held in memory at once, e.g. 4G: models are built when used and the "
                        "least recently used let go, so a pool larger than memory runs (default: a quarter of the "
                        "available memory; the peak is recorded in OUT/env.json)")
    p.add_argument("--force", action="store_true",
                   help="replace the tables of another matrix (other models, data, seed or attack) in --out")


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``; anything else is a one-line refusal.

    Example:
        >>> parse_shard("0/4")
        (0, 4)
    """
    from transfer_analysis.errors import UserError

    i, sep, n = str(text).partition("/")
    try:
        shard = (int(i), int(n))
    except ValueError:
        shard = None
    if not sep or shard is None or not 0 <= shard[0] < shard[1]:
        raise UserError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 for the first of 4 tasks), got {text!r}")
    return shard


def io_paths(args: argparse.Namespace) -> tuple[list, list]:
    """What ``darht matrix`` reads and writes (no output may be an input)."""
    return ([("--pool", args.pool), ("--dataset", common.dataset_file(args.dataset))],
            [("--out", args.out, True), ("--cache", args.cache, True)])


def run(args: argparse.Namespace) -> int:
    """Run ``darht matrix``: parse the flags and call :func:`transfer_analysis.matrix.run_matrix`."""
    common.require_files((args.pool, "pool file"), (common.dataset_file(args.dataset), "dataset file"))
    shard = parse_shard(args.shard) if args.shard is not None else None
    from transfer_analysis.attacks import AttackConfig
    from transfer_analysis.matrix import run_matrix
    from transfer_analysis.utils import parse_eps, resolve_device

    device = resolve_device(args.device)
    eps = parse_eps(args.eps, "eps")
    step_size = None if args.step_size is None else parse_eps(args.step_size, "step-size")
    attack = AttackConfig(name=args.attack, eps=eps, steps=args.steps, step_size=step_size,
                          random_start=not args.no_random_start,
                          kwargs=common.parse_json_kwargs(args.attack_kwargs, "--attack-kwargs"))
    names = None if args.models is None else [n.strip() for n in args.models.split(",") if n.strip()]
    max_bytes = None if args.max_model_memory is None else int(common.parse_amount(args.max_model_memory,
                                                                                   "--max-model-memory", binary=True))
    run_matrix(args.pool, args.dataset, args.out, attack=attack, n_samples=args.n_samples,
               batch_size=args.batch_size, seed=args.seed, device=device, cache_dir=args.cache, names=names,
               data_root=args.data_root, download=not args.no_download, force=args.force, shard=shard,
               max_model_bytes=max_bytes)
    return 0

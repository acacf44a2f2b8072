"""`darht matrix`: measure pairwise adversarial transferability across a pool of models.

Writes ``transfer_long.csv``, ``transfer_matrix.csv``, ``models.csv``, ``transfer_heatmap.png``,
``indices.json``, ``config.yaml`` and ``env.json`` into ``--out``. Per-source results are cached
(``<out>/cache`` or ``--cache DIR``), so re-running reuses them and a model added to the pool costs
one attack plus the missing evaluations.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

from distill.cli import common
from transfer_analysis.errors import UserError

HELP = "Measure pairwise adversarial transferability across a pool of models"

logger = logging.getLogger("darht.matrix")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``darht matrix`` (see CLI.md)."""
    p.add_argument("--pool", required=True, help="pool YAML file (see DESIGN.md, The model pool)")
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
    p.add_argument("--out", required=True, help="output directory (re-running into it updates the outputs)")


def _check_out_dir(out: Path) -> None:
    """Refuse an output directory that holds another command's run."""
    import yaml

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    config = out / "config.yaml"
    if config.is_file():
        try:
            data = yaml.safe_load(config.read_text())
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict) or data.get("command") != "matrix":
            raise UserError(f"{out} holds another run (its config.yaml is not from 'darht matrix'); "
                            "choose another --out")


def _model_seed(seed: int, name: str) -> int:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def run(args: argparse.Namespace) -> int:
    """Run ``darht matrix``: validate everything, then compute, then write the outputs."""
    from transfer_analysis.attacks import AttackConfig
    from transfer_analysis.data import balanced_subset, load_dataset, save_indices
    from transfer_analysis.matrix import save_matrix_outputs, transfer_matrix
    from transfer_analysis.pool import build_pool_model, read_pool_config
    from transfer_analysis.utils import (format_eps, parse_eps, prepare_out_dir, resolve_device, seed_everything,
                                         write_env_json, write_run_config)

    # 1. validate every input before anything is written
    device = resolve_device(args.device)
    eps = parse_eps(args.eps, "eps")
    step_size = None if args.step_size is None else parse_eps(args.step_size, "step-size")
    attack = AttackConfig(name=args.attack, eps=eps, steps=args.steps, step_size=step_size,
                          random_start=not args.no_random_start,
                          kwargs=common.parse_json_kwargs(args.attack_kwargs, "--attack-kwargs")).resolved()
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    names = None
    if args.models is not None:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        if not names:
            raise UserError("--models is empty; give comma-separated model names, e.g. --models a,b")
        if len(set(names)) != len(names):
            raise UserError(f"--models names a model twice: {args.models}")
    out = Path(args.out)
    _check_out_dir(out)

    ds = load_dataset(args.dataset, args.data_root, download=not args.no_download)
    indices = balanced_subset(ds.y_test, args.n_samples, seed=args.seed)
    entries = read_pool_config(args.pool)
    known = [e.name for e in entries]
    if names is not None and set(names) - set(known):
        unknown = [n for n in names if n not in known]
        raise UserError(f"model(s) {', '.join(unknown)} not in {args.pool}; the pool has {', '.join(known)}")
    pool = {}
    for entry in entries:  # rows/columns in pool order
        if names is None or entry.name in names:
            # a model without checkpoint or pretrained weights gets the same random init in every run,
            # whatever the subset or order, so its cached results stay valid
            seed_everything(_model_seed(args.seed, entry.name))
            pool[entry.name] = build_pool_model(entry, ds.num_classes, ds.in_chans, ds.image_size, device="cpu")

    # 2. the run directory
    prepare_out_dir(out, resume=True)
    cache_dir = Path(args.cache) if args.cache is not None else out / "cache"
    save_indices(out / "indices.json", indices, dataset=args.dataset, split="test", seed=args.seed)
    indices_sha = hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()
    write_run_config(out, {
        "command": "matrix",
        "pool": str(Path(args.pool).resolve()),
        "models": [{"name": n, "arch": m.entry.arch, "family": m.entry.family, "fingerprint": m.fingerprint}
                   for n, m in pool.items()],
        "dataset": args.dataset, "data_root": args.data_root, "n_samples": args.n_samples,
        "n": int(len(indices)), "indices_sha256": indices_sha, "seed": args.seed,
        "attack": attack.to_dict(), "eps_readable": format_eps(attack.eps),
        "batch_size": args.batch_size, "device": str(device), "cache": str(cache_dir.resolve()),
        "metrics": ["transfer_rate", "target_error"],
    })
    write_env_json(out, device)

    # 3. compute and write
    logger.info("%d models, %d test images of %s, attack %s", len(pool), len(indices), ds.name, attack.describe())
    result = transfer_matrix(
        pool, ds.images("test", indices), ds.labels("test", indices), attack, batch_size=args.batch_size,
        device=device, cache_dir=cache_dir, seed=args.seed, dataset=ds.name, indices=indices)
    paths = save_matrix_outputs(result, out)
    logger.info("wrote %s (attacks run: %d, target evaluations: %d, sources fully cached: %d)",
                ", ".join(p.name for p in paths.values()), result.stats["attacks_run"],
                result.stats["target_evaluations"], result.stats["sources_from_cache"])
    return 0

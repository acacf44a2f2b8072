"""`darht recommend`: recommend the k teachers whose adversarial examples transfer least among one another.

Thin wrapper around :func:`transfer_analysis.selection.select_teachers`: reads the matrix (and
``models.csv`` beside it), searches, writes ``--out`` (JSON) and the graph plot beside it (PNG).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from distill.cli import common
from transfer_analysis.errors import UserError

HELP = "Recommend the k teachers whose adversarial examples transfer least among one another"

logger = logging.getLogger("darht.recommend")

#: recommending is exact search over a table: no device, no randomness
COMMON_FLAGS: tuple[str, ...] = ()


def parse_params(text: str) -> float:
    """``25000000``, ``2.5e7``, ``25M``, ``1.5G`` -> a parameter count."""
    return common.parse_amount(text, "--max-params", binary=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``darht recommend`` (docs/cli.md)."""
    p.add_argument("--matrix", required=True,
                   help="directory holding transfer_matrix.csv (and models.csv), or the CSV itself")
    p.add_argument("--k", type=int, required=True, help="number of teachers in a set (>= 2)")
    p.add_argument("--objective", choices=["minimax", "mean"], default="minimax",
                   help="minimax: smallest worst pair (exact; default); mean: smallest average pair")
    p.add_argument("--pair", choices=["max", "mean"], default="max",
                   help="pair score from the two directions: max(T[a,b], T[b,a]) (default) or their mean")
    p.add_argument("--min-clean-acc", type=float, default=None, metavar="X",
                   help="only models with clean accuracy >= X (a fraction; needs models.csv)")
    p.add_argument("--min-robust-acc", type=float, default=None, metavar="X",
                   help="only models with white-box robust accuracy >= X (a fraction; needs models.csv)")
    p.add_argument("--require", action="append", default=[], metavar="A,B",
                   help="models every set must contain (comma-separated; repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="C",
                   help="models no set may contain (comma-separated; repeatable)")
    p.add_argument("--max-params", default=None, metavar="N",
                   help="parameter budget for the whole set, e.g. 25000000 or 25M (needs params in models.csv)")
    p.add_argument("--top", type=int, default=5, help="how many sets to rank (default 5)")
    p.add_argument("--worst", action="store_true",
                   help="rank the highest-transfer sets first (maximize the objective)")
    p.add_argument("--family-only", action="store_true",
                   help="only sets whose members share one family (family column of models.csv)")
    p.add_argument("--enumeration-limit", type=int, default=None, metavar="N",
                   help="enumerate every subset while C(N, k) <= N (default 2000000); above it, mean is approximate")
    p.add_argument("--no-plot", action="store_true", help="do not write the graph PNG")
    p.add_argument("--out", required=True, help="the JSON to write (rec.json); the PNG goes beside it")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def io_paths(args: argparse.Namespace) -> tuple[list, list]:
    """What ``darht recommend`` reads and writes (no output may be an input)."""
    out = Path(args.out)
    return ([("--matrix", p) for p in common.dir_files(args.matrix, ("transfer_matrix.csv", "models.csv"))],
            [("--out", out, False), ("--out", out.with_suffix(".png"), False)])


def run(args: argparse.Namespace) -> int:
    if not Path(args.matrix).exists():  # before pandas and networkx load: a refusal comes at once
        raise UserError(f"transfer matrix not found: {args.matrix}; pass --matrix as the directory (holding "
                        "transfer_matrix.csv) or the CSV itself, as written by 'darht matrix'")
    from transfer_analysis.selection import (
        DEFAULT_ENUMERATION_LIMIT,
        read_matrix,
        select_teachers,
        transfer_graph,
        write_recommendation,
    )

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'rec.json'}")
    if out.suffix.lower() == ".png":
        raise UserError(f"--out {out} must not end in .png (the graph plot is written beside the JSON)")
    from transfer_analysis.rundir import claim_output_files

    claim_output_files([out] + ([] if args.no_plot else [out.with_suffix(".png")]), force=args.force)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    limit = DEFAULT_ENUMERATION_LIMIT if args.enumeration_limit is None else args.enumeration_limit
    if limit < 0:
        raise UserError(f"--enumeration-limit must be >= 0, got {limit}")
    max_params = None if args.max_params is None else parse_params(args.max_params)

    matrix, models = read_matrix(args.matrix)
    rec = select_teachers(
        matrix, k=args.k, objective=args.objective, pair=args.pair, top=args.top, worst=args.worst,
        min_clean_acc=args.min_clean_acc, min_robust_acc=args.min_robust_acc, require=args.require,
        exclude=args.exclude, max_params=max_params, family_only=args.family_only, models=models,
        enumeration_limit=limit,
    )
    graph = None if args.no_plot else transfer_graph(matrix, models, pair=args.pair)
    written = write_recommendation(rec, out, graph=graph, plot=not args.no_plot,
                                   extra={"matrix": str(Path(args.matrix))})
    for path in written:
        logger.info("wrote %s", path)
    print(out)
    return 0

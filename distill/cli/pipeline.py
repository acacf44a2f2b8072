"""``darht pipeline``: run a whole study from a config: pool, matrix, recommendation, students, report."""

from __future__ import annotations

import argparse
import logging

HELP = "Run a whole study from a config: pool, matrix, recommendation, students, evaluation, report"

logger = logging.getLogger("darht.pipeline")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="study config, e.g. experiments/configs/quickstart.yaml")
    p.add_argument("--out", default=None, help="run directory (default runs/<study name>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    g.add_argument("--force", action="store_true", help="replace the run in --out")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the plan, write nothing")
    j = p.add_argument_group("array jobs on a cluster (see distill.pipeline.jobs)")
    j.add_argument("--emit-commands", action="store_true",
                   help="initialize --out and write one self-contained command per stage item to OUT/commands/ "
                        "(teachers, matrix shards, recommend, students, report), with a Slurm recipe")
    j.add_argument("--shards", type=int, default=4, metavar="N", help="array tasks of the matrix stage (default 4)")
    j.add_argument("--only", default=None, metavar="ITEM",
                   help="run one item of an initialized run: teacher:NAME, matrix:I/N, recommend or student:ID")


def run(args: argparse.Namespace) -> int:
    import sys

    from distill.cli.common import require_files

    require_files((args.config, "config"))

    from distill.pipeline import run_pipeline
    from distill.pipeline.config import describe_plan

    from distill.pipeline.config import load_study_config

    out = args.out if args.out is not None else f"runs/{load_study_config(args.config)['study']}"
    if sum(map(bool, (args.emit_commands, args.only, args.dry_run))) > 1:
        from transfer_analysis.errors import UserError

        raise UserError("--emit-commands, --only and --dry-run are different modes; give one of them")
    if args.emit_commands:
        from distill.pipeline.jobs import describe_stages, emit_commands

        stages = emit_commands(args.config, out, shards=args.shards, device=args.device, resume=args.resume,
                               force=args.force)
        sys.stdout.write(describe_stages(stages) + "\n")
        return 0
    if args.only is not None:
        from distill.pipeline.jobs import parse_item, run_item

        parse_item(args.only)  # a bad item is refused before the config is read
        run_item(args.config, out, args.only, device=args.device)
        return 0
    # the command that reproduces this run (add --resume to continue it after an interruption)
    command = ["darht", "pipeline", "--config", args.config, "--out", str(out)]
    if args.device != "auto":
        command += ["--device", args.device]
    result = run_pipeline(args.config, out, resume=args.resume, force=args.force, device=args.device,
                          dry_run=args.dry_run, command=command)
    if args.dry_run:
        sys.stdout.write("\n".join(describe_plan(result.config)) + "\n")
        return 0
    sys.stdout.write(f"{result.report}\n")
    return 0

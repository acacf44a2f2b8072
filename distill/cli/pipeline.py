"""``darht pipeline``: run a whole study from a config: pool, matrix, recommendation, students, report."""

from __future__ import annotations

import argparse
import logging

HELP = "Run a whole study from a config: pool, matrix, recommendation, students, evaluation, report"

logger = logging.getLogger("darht.pipeline")


#: the study's own `seed:` seeds every stage (a --seed beside it would be ignored, so none is offered)
COMMON_FLAGS = ("device",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="study config, e.g. experiments/configs/quickstart.yaml")
    p.add_argument("--out", default=None, help="run directory (default runs/<study name>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    g.add_argument("--force", action="store_true", help="replace the run in --out")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the plan, write nothing")
    p.add_argument("--jobs", type=int, default=1, metavar="J",
                   help="train the tuning settings, then train and evaluate the students, with J worker processes "
                        "of --threads / J threads each (the same results as one at a time with that many threads; "
                        "default 1)")
    t = p.add_argument_group("every training run of the study")
    t.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="evaluate and report an exponential moving average of every student (weights and buffers, "
                        "e.g. 0.999); overrides students.ema, recorded in OUT/config.yaml (teachers: "
                        "teacher_training.ema)")
    t.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard event files in each run directory (pip install -e \".[tensorboard]\")")
    t.add_argument("--log-wandb", action="store_true",
                   help="log every run to Weights & Biases (pip install -e \".[wandb]\"; WANDB_MODE=offline works)")
    t.add_argument("--wandb-project", default=None, metavar="P", help="the W&B project (default darht)")
    j = p.add_argument_group("array jobs on a cluster (see distill.pipeline.jobs)")
    j.add_argument("--emit-commands", action="store_true",
                   help="initialize --out and write one self-contained command per stage item to OUT/commands/ "
                        "(teachers, matrix shards, recommend, students, report), with a Slurm recipe")
    j.add_argument("--shards", type=int, default=4, metavar="N", help="array tasks of the matrix stage (default 4)")
    j.add_argument("--only", default=None, metavar="ITEM",
                   help="run one item of an initialized run: teacher:NAME, matrix:I/N, recommend, tune, student:ID, "
                        "tune-runs and students (workers of --jobs: every unfinished tuning run, or student, no "
                        "other worker claimed), or "
                        "report (an interim report over the students finished so far; trains nothing)")
    j.add_argument("--launcher", default=None, choices=["submitit"],
                   help="submit the stages with submitit (pip install -e \".[submitit]\"), each stage an array "
                        "after the previous one, and wait for them")
    j.add_argument("--submitit-cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit's executor (default: slurm where sbatch exists, else local)")
    j.add_argument("--submitit-folder", default=None, metavar="DIR",
                   help="submitit's job files and logs (default OUT/submitit)")
    j.add_argument("--slurm-partition", default=None, metavar="P", help="Slurm partition of the jobs")
    j.add_argument("--timeout-min", type=int, default=None, metavar="M", help="time limit of each job in minutes")
    j.add_argument("--gpus-per-node", type=int, default=None, metavar="G", help="GPUs of each job")
    j.add_argument("--cpus-per-task", type=int, default=None, metavar="C", help="CPU cores of each job")


def io_paths(args: argparse.Namespace) -> tuple[list, list]:
    """What ``darht pipeline`` reads and writes (no output may be an input)."""
    return [("--config", args.config)], [("--out", args.out, True)]


def run(args: argparse.Namespace) -> int:
    import sys

    from distill.cli.common import require_files
    from transfer_analysis.errors import UserError

    require_files((args.config, "config"))

    from distill.pipeline import run_pipeline
    from distill.pipeline.config import describe_plan, load_study_config

    out = args.out if args.out is not None else f"runs/{load_study_config(args.config)['study']}"
    if sum(map(bool, (args.emit_commands, args.only, args.dry_run, args.launcher))) > 1:
        raise UserError("--emit-commands, --launcher, --only and --dry-run are different modes; give one of them")
    tracking = {"tensorboard": args.tensorboard, "log_wandb": args.log_wandb, "wandb_project": args.wandb_project}
    if args.emit_commands or args.launcher:
        from distill.pipeline.jobs import describe_stages, emit_commands

        if args.launcher:
            from distill.pipeline.launch import _import_submitit

            _import_submitit()  # a missing extra is refused before the run directory is written
        stages = emit_commands(args.config, out, shards=args.shards, device=args.device, resume=args.resume,
                               force=args.force, ema=args.ema, tracking=tracking)
        if not args.launcher:
            sys.stdout.write(describe_stages(stages) + "\n")
            return 0
        from pathlib import Path

        from distill.pipeline.launch import executor_parameters, submit_stages
        from transfer_analysis.rundir import release_run_dirs

        release_run_dirs()  # the submitted jobs write the run directory now, not this waiting process

        submit_stages(stages, args.submitit_folder or Path(out) / "submitit", cluster=args.submitit_cluster,
                      parameters=executor_parameters(timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_node,
                                                     cpus_per_task=args.cpus_per_task,
                                                     slurm_partition=args.slurm_partition))
        sys.stdout.write(f"{Path(out) / 'report.md'}\n")
        return 0
    if args.only is not None:
        from distill.pipeline.jobs import parse_item, run_item

        parse_item(args.only)  # a bad item is refused before the config is read
        run_item(args.config, out, args.only, device=args.device, ema=args.ema, tracking=tracking)
        return 0
    # the command that reproduces this run (add --resume to continue it after an interruption)
    command = ["darht", "pipeline", "--config", args.config, "--out", str(out)]
    if args.device != "auto":
        command += ["--device", args.device]
    if args.ema is not None:
        command += ["--ema", repr(args.ema)]
    if args.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {args.jobs}")
    if args.jobs > 1:
        command += ["--jobs", str(args.jobs)]
    result = run_pipeline(args.config, out, resume=args.resume, force=args.force, device=args.device,
                          dry_run=args.dry_run, command=command, ema=args.ema, tracking=tracking, jobs=args.jobs)
    if args.dry_run:
        sys.stdout.write("\n".join(describe_plan(result.config)) + "\n")
        return 0
    sys.stdout.write(f"{result.report}\n")
    return 0

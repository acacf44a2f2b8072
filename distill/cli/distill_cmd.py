"""`darht distill`: distill a robust student (DARHT or a baseline) from a teacher set.

Options come from three layers, later ones winning: the run's own ``config.yaml`` (with
``--resume``), ``--config RUN.yaml``, and the flags given on the command line. Everything the
flags do not cover (momentum, gamma, warm-up, ...) can be set in the YAML; its keys are the fields
of :class:`distill.trainer.TrainConfig`.

Under ``torchrun --nproc_per_node N --no-python darht distill ...`` the run is data-parallel
(:func:`distill.trainer.train`); ``--batch-size`` stays the global batch.

Example:
    darht distill --method darht --student resnet18_cifar --pool pool.yaml --teachers vit_a,r18,mix \\
        --dataset cifar10 --epochs 200 --out runs/darht_r18
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from distill.cli import common

HELP = "Distill a robust student (DARHT or a baseline) from a teacher set"

# flag dest -> TrainConfig key, for the flags that map one to one (None = not given)
_DIRECT = ("method", "student", "dataset", "data_root", "pool", "epochs", "batch_size", "lr", "optimizer", "momentum",
           "weight_decay", "lr_schedule", "eps", "eval_samples", "eval_pgd_steps", "eval_batch_size",
           "final_eval_samples", "ema", "tensorboard", "log_wandb", "wandb_project", "amp", "channels_last", "compile",
           "seed", "device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``darht distill`` (defaults come from the method's reference protocol)."""
    g = p.add_argument_group("what to train")
    g.add_argument("--method", default=None, metavar="NAME",
                   help="darht, ard, rslad, mtard, kd, pgd-at, trades or fast-at")
    g.add_argument("--method-kwargs", default=None, metavar="JSON",
                   help="the method's options, e.g. '{\"p_adv\": 0.5, \"weighting\": \"exp_ce\"}'")
    g.add_argument("--student", default=None, metavar="ARCH", help="timm architecture of the student")
    g.add_argument("--student-kwargs", default=None, metavar="JSON",
                   help="kwargs for timm.create_model, e.g. '{\"width\": 32}'")
    g.add_argument("--pool", default=None, metavar="POOL.yaml", help="pool file defining the teachers")
    g.add_argument("--teachers", default=None, metavar="a,b,c",
                   help="teacher names from --pool (mtard: ROBUST,CLEAN)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None,
                   help="cifar10, cifar100, tiny-imagenet, fashion-mnist, synthetic[:k=v,...] or a .npz path")
    d.add_argument("--data-root", default=None, help="where named datasets live (default ~/.cache/darht/data)")
    d.add_argument("--no-download", action="store_true", default=None,
                   help="never download; fail if the files are missing")
    t = p.add_argument_group("training (defaults: the method's reference protocol)")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None,
                   help="global batch: under torchrun each of the N processes trains on batch/N images")
    t.add_argument("--lr", type=float, default=None, help="initial learning rate (SGD)")
    t.add_argument("--momentum", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--lr-schedule", default=None, choices=["step", "cosine", "cyclic", "constant"])
    t.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="default sgd")
    t.add_argument("--milestones", default=None, metavar="F,F,...",
                   help="LR x gamma at these fractions of training, e.g. 0.5,0.75")
    t.add_argument("--eps", default=None, help="L-inf radius, a number or a fraction (default 8/255)")
    t.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the student (weights and buffers, e.g. 0.999): "
                        "it is evaluated each epoch and is the reported model")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA; attack gradients stay fp32 (default on)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the student's backbone")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-samples", type=int, default=None,
                   help="balanced test subset for the per-epoch clean/PGD accuracy (default 500; 0: none)")
    e.add_argument("--eval-pgd-steps", type=int, default=None, help="PGD steps of the per-epoch check (default 10)")
    e.add_argument("--eval-batch-size", type=int, default=None)
    e.add_argument("--final-attacks", default=None, metavar="A,B,...",
                   help="final evaluation (default clean,fgsm,pgd20,cw,autoattack; transfer:NAME from --pool)")
    e.add_argument("--final-eval-samples", type=int, default=None,
                   help="test images for the final evaluation (default: the whole test set)")
    k = p.add_argument_group("tracking (optional extras, imported only when asked for)")
    k.add_argument("--tensorboard", action="store_true", default=None,
                   help="write TensorBoard event files to RUNDIR/tensorboard (pip install -e \".[tensorboard]\")")
    k.add_argument("--log-wandb", action="store_true", default=None,
                   help="log to Weights & Biases (pip install -e \".[wandb]\"; WANDB_MODE=offline needs no network)")
    k.add_argument("--wandb-project", default=None, metavar="P", help="the W&B project (default darht)")
    r = p.add_argument_group("run directory")
    r.add_argument("--config", default=None, metavar="RUN.yaml", help="defaults for every option (flags override)")
    r.add_argument("--out", required=True, metavar="RUNDIR", help="the run directory")
    r.add_argument("--resume", action="store_true", help="continue the interrupted run in RUNDIR")
    r.add_argument("--force", action="store_true", help="replace the run in RUNDIR")
    # --seed and --device come from the common group; None lets --config set them.
    p.set_defaults(seed=None, device=None)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the run's config.yaml (with --resume), --config and the flags into one mapping."""
    from distill.trainer import read_config_file

    cfg: dict[str, Any] = {}
    saved = Path(args.out) / "config.yaml"
    if args.resume and saved.is_file():
        cfg.update(read_config_file(saved))
    if args.config:
        cfg.update(read_config_file(args.config))
    for key in _DIRECT:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if args.no_download:
        cfg["download"] = False
    if args.teachers is not None:
        cfg["teachers"] = [t.strip() for t in args.teachers.split(",") if t.strip()]
    if args.milestones is not None:
        cfg["milestones"] = args.milestones
    if args.final_attacks is not None:
        cfg["final_attacks"] = args.final_attacks
    for flag, key in (("--student-kwargs", "student_kwargs"), ("--method-kwargs", "method_kwargs")):
        given = common.parse_json_kwargs(getattr(args, key), flag)
        if given:
            base = cfg.get(key) or {}
            cfg[key] = {**(base if isinstance(base, dict) else {}), **given}
    return cfg


def io_paths(args: argparse.Namespace) -> tuple[list, list]:
    """What ``darht distill`` reads and writes (no output may be an input)."""
    return ([("--pool", args.pool), ("--config", args.config), ("--dataset", common.dataset_file(args.dataset))],
            [("--out", args.out, True)])


def run(args: argparse.Namespace) -> int:
    common.require_files((args.pool, "pool file"), (args.config, "config file"),
                         (common.dataset_file(args.dataset), "dataset file"))
    from distill.trainer import train

    result = train(build_config(args), args.out, resume=args.resume, force=args.force)
    import logging

    logging.getLogger("darht").info("run written to %s", result.run_dir)
    return 0

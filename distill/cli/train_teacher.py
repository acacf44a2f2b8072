"""`darht train-teacher`: train a teacher (standard, fast-at, pgd-at or trades) and write a pool entry.

Writes ``W.safetensors`` (the timm model's weights), ``W.yaml`` beside it (a one-model pool file:
name, arch, kwargs, checkpoint, input_size, mean, std, family, training, eps) and the training run
in ``W.run/`` (config.yaml, summary.csv, checkpoint, metrics.json).

Example:
    darht train-teacher --arch resnet18_cifar --dataset cifar10 --method pgd-at --epochs 100 \\
        --out teachers/r18_at.safetensors
"""

from __future__ import annotations

import argparse

from distill.cli import common

HELP = "Train a teacher (standard, fast-at, pgd-at or trades) and write a pool entry"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``darht train-teacher``."""
    p.add_argument("--arch", required=True,
                   help="any timm name: a registry name (or resnet18_cifar, wideresnet34_10, ...), hf-hub:ORG/NAME or "
                        "local-dir:PATH")
    p.add_argument("--pretrained", action="store_true",
                   help="fine-tune from timm's pretrained weights (a new head for the data's classes) with the "
                        "pretrained mean/std and, unless --input-size, its input size (images resized inside)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="kwargs for timm.create_model, e.g. '{\"width\": 32}'")
    common.add_data_arguments(p)
    p.add_argument("--method", default="standard", metavar="NAME",
                   help="standard (default), fast-at, pgd-at or trades")
    p.add_argument("--method-kwargs", default=None, metavar="JSON",
                   help="the method's options, e.g. '{\"beta\": 6.0, \"steps\": 10}'")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the method's reference protocol)")
    p.add_argument("--eps", default="8/255", help="L-inf radius of the inner attack and evaluation (default 8/255)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=None, help="initial (peak, for cyclic) learning rate")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"],
                   help="sgd (default) or adamw (small ViTs and MLP-Mixers train poorly with SGD)")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    p.add_argument("--lr-schedule", default=None, choices=["step", "cosine", "cyclic", "constant"],
                   help="LR schedule (default: step; cyclic for fast-at)")
    p.add_argument("--eval-samples", type=int, default=500,
                   help="balanced test subset for the per-epoch clean/PGD accuracy (0: none; default 500)")
    p.add_argument("--final-eval-samples", type=int, default=1000,
                   help="test images for the final evaluation (default 1000)")
    p.add_argument("--final-attacks", default="clean,pgd20", help="final evaluation attacks (default clean,pgd20)")
    p.add_argument("--input-size", type=int, default=None, metavar="PX",
                   help="build the model for PX x PX inputs and resize images to it inside the model (the pool "
                        "entry's input_size), e.g. 32 for a ConvNeXt on 28x28 Fashion-MNIST (default: the data's size)")
    p.add_argument("--name", default=None, help="name of the pool entry (default: the file's stem)")
    p.add_argument("--family", default=None, help="family label of the pool entry (default: guessed from --arch)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (attack gradients stay fp32; default on)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels_last memory format")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights and buffers (e.g. 0.999): it is "
                        "evaluated each epoch and is the model written to W.safetensors")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard event files in W.run/tensorboard")
    p.add_argument("--log-wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    p.add_argument("--wandb-project", default=None, metavar="P", help="the W&B project (default darht)")
    p.add_argument("--out", required=True, metavar="W.safetensors", help="where to write the weights")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run (W.run/)")
    p.add_argument("--force", action="store_true", help="replace existing outputs")


def io_paths(args: argparse.Namespace) -> tuple[list, list]:
    """What ``darht train-teacher`` reads and writes (no output may be an input)."""
    from pathlib import Path

    out = Path(args.out)
    arch = args.arch[len("local-dir:"):] if args.arch.startswith("local-dir:") else None
    return ([("--dataset", common.dataset_file(args.dataset)), ("--arch", arch)],
            [("--out", out, False), ("--out", out.with_suffix(".yaml"), False),
             ("--out", out.with_suffix(".run"), True)])


def run(args: argparse.Namespace) -> int:
    from distill.teachers import train_teacher

    entry = train_teacher(
        args.arch, args.dataset, args.out, method=args.method,
        model_kwargs={**common.parse_json_kwargs(args.model_kwargs, "--model-kwargs"),
                      **({"pretrained": True} if args.pretrained else {})},
        method_kwargs=common.parse_json_kwargs(args.method_kwargs, "--method-kwargs"),
        epochs=args.epochs, eps=args.eps, batch_size=args.batch_size, lr=args.lr, name=args.name,
        family=args.family, final_attacks=args.final_attacks.split(","),
        final_eval_samples=args.final_eval_samples, input_size=args.input_size, resume=args.resume, force=args.force,
        data_root=args.data_root, download=not args.no_download, weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule, optimizer=args.optimizer, eval_samples=args.eval_samples, amp=args.amp,
        channels_last=args.channels_last, compile=args.compile, seed=args.seed, device=args.device,
        tensorboard=args.tensorboard, log_wandb=args.log_wandb, wandb_project=args.wandb_project, ema=args.ema,
    )
    import logging

    logging.getLogger("darht").info("wrote %s and its pool entry (%s)", args.out, entry.name)
    return 0

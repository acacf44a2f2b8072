"""`darht train-teacher`: Train a teacher (standard, fast-at, pgd-at or trades) and write a pool entry."""

from __future__ import annotations

import argparse

from distill.cli.common import not_landed

HELP = "Train a teacher (standard, fast-at, pgd-at or trades) and write a pool entry (not available yet)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options until the distillation issue lands."""


def run(args: argparse.Namespace) -> int:
    return not_landed("train-teacher", "the distillation issue")

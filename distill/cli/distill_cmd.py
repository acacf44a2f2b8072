"""`darht distill`: Distill a robust student (DARHT or a baseline) from a teacher set."""

from __future__ import annotations

import argparse

from distill.cli.common import not_landed

HELP = "Distill a robust student (DARHT or a baseline) from a teacher set (not available yet)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options until the distillation issue lands."""


def run(args: argparse.Namespace) -> int:
    return not_landed("distill", "the distillation issue")

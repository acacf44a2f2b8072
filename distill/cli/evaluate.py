"""`darht evaluate`: Evaluate a model under white-box and black-box attacks."""

from __future__ import annotations

import argparse

from distill.cli.common import not_landed

HELP = "Evaluate a model under white-box and black-box attacks (not available yet)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options until the distillation issue lands."""


def run(args: argparse.Namespace) -> int:
    return not_landed("evaluate", "the distillation issue")

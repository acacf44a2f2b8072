"""`darht matrix`: Measure pairwise adversarial transferability across a pool of models."""

from __future__ import annotations

import argparse

from distill.cli.common import not_landed

HELP = "Measure pairwise adversarial transferability across a pool of models (not available yet)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options until the transferability-matrix issue lands."""


def run(args: argparse.Namespace) -> int:
    return not_landed("matrix", "the transferability-matrix issue")

"""`darht recommend`: Recommend the k teachers whose adversarial examples transfer least among one another."""

from __future__ import annotations

import argparse

from distill.cli.common import not_landed

HELP = "Recommend the k teachers whose adversarial examples transfer least among one another (not available yet)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options until the recommendation issue lands."""


def run(args: argparse.Namespace) -> int:
    return not_landed("recommend", "the recommendation issue")

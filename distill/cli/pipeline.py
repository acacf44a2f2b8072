"""`darht pipeline`: Run a whole study from a config."""

from __future__ import annotations

import argparse

from distill.cli.common import not_landed

HELP = "Run a whole study from a config (not available yet)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options until  pool, matrix, recommendation, students, report:the pipeline issue lands."""


def run(args: argparse.Namespace) -> int:
    return not_landed("pipeline", " pool, matrix, recommendation, students, report:the pipeline issue")

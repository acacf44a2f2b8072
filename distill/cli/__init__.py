"""The ``darht`` command line: thin wrappers around the public functions of both packages.

Each subcommand lives in its own module of this package and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. A :class:`~transfer_analysis.errors.UserError`
raised anywhere becomes exit code 2 and one line on stderr; nothing else is printed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from transfer_analysis.errors import UserError

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

# subcommand name -> module (inside distill.cli)
SUBCOMMANDS: dict[str, str] = {
    "matrix": "matrix",
    "recommend": "recommend",
    "train-teacher": "train_teacher",
    "distill": "distill_cmd",
    "evaluate": "evaluate",
    "pipeline": "pipeline",
}


class _Parser(argparse.ArgumentParser):
    """argparse with the toolkit's error convention: one line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``darht`` parser with its six subcommands."""
    from distill.cli import common

    parser = _Parser(
        prog="darht",
        description="Choose teacher sets by adversarial transferability and distill robustness from them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"distill.cli.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        common.add_common_arguments(p)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("darht-toolkit")
    except md.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``darht`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from transfer_analysis.utils import setup_logging

    setup_logging(args.log_level)
    try:
        code = args._run(args)
    except UserError as err:
        sys.stderr.write(f"darht {args.command}: error: {err}\n")
        return UserError.exit_code
    except KeyboardInterrupt:
        logging.getLogger("darht").warning("interrupted")
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

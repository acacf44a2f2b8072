"""The ``darht`` command line: thin wrappers around the public functions of both packages.

Each subcommand lives in its own module of this package and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. A :class:`~transfer_analysis.errors.UserError`
raised anywhere becomes exit code 2 and one line on stderr; nothing else is printed. SIGTERM and
SIGINT (:func:`transfer_analysis.utils.handle_signals`) stop the command cleanly: one line, exit
code 143 or 130, finished work (checkpoints, cache entries) kept for ``--resume``.
"""

from __future__ import annotations

import argparse
import importlib
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
        common.add_common_arguments(p, getattr(module, "COMMON_FLAGS", ("device", "seed")))
        module.add_arguments(p)
        # argparse dest -> flag: library errors name parameters, the command line shows its flags
        flags = {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
                 for a in p._actions if a.option_strings and a.dest != "help"}
        flags.update({param: flag for param, flag in _PARAM_ALIASES.items() if flag in p._option_string_actions})
        p.set_defaults(_run=module.run, _flags=flags)
    return parser


# library parameters whose name differs from the flag that sets them
_PARAM_ALIASES = {"cache_dir": "--cache", "trust": "--trust-checkpoint", "n": "--n-samples"}


def _version() -> str:
    from distill import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``darht`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from transfer_analysis.console import Interrupted, handle_signals, setup_logging

    setup_logging(args.log_level)
    saved = None
    try:
        from transfer_analysis.threads import apply_threads, choose_threads

        saved = apply_threads(*choose_threads(getattr(args, "threads", None)))  # before torch loads
        io_paths = getattr(importlib.import_module(f"distill.cli.{SUBCOMMANDS[args.command]}"), "io_paths", None)
        if io_paths is not None:  # an output is never one of the inputs
            from transfer_analysis.rundir import refuse_outputs_as_inputs

            refuse_outputs_as_inputs(*io_paths(args))
        with handle_signals():
            code = args._run(args)
    except UserError as err:
        from transfer_analysis.errors import cli_text

        sys.stderr.write(f"darht {args.command}: error: {cli_text(str(err), args._flags)}\n")
        return UserError.exit_code
    except KeyboardInterrupt as err:
        name, code = (err.signal_name, err.exit_code) if isinstance(err, Interrupted) else ("SIGINT", 130)
        sys.stderr.write(f"darht {args.command}: interrupted by {name}; finished work is saved, "
                         f"{_RESUME_HINT.get(args.command, 'run the same command again')}\n")
        return code
    finally:
        from transfer_analysis.rundir import release_run_dirs

        release_run_dirs()  # the run directories this command held
        if saved is not None:
            from transfer_analysis.threads import restore_threads

            restore_threads(saved)
    return int(code or 0)


# how each subcommand continues after an interruption
_RESUME_HINT = {
    "matrix": "run the same command again to continue from the cache",
    "distill": "add --resume to continue",
    "train-teacher": "add --resume to continue",
    "pipeline": "add --resume to continue",
}


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The one error type for user mistakes.

Library code raises :class:`UserError` for anything the user can fix (an unknown architecture, a
missing file, a bad ε, k larger than the pool). The ``darht`` command turns it into exit code 2
and a single line on stderr, with no traceback.

Library messages name *parameters*, never command-line flags: a parameter is written in
backquotes (```max_params` must be a positive number``). Called from Python, that is the message;
the command line renders each backquoted name that is one of the subcommand's options as its flag
(:func:`cli_text`: ``--max-params must be a positive number``), and leaves other names (keys of a
study config, say) as they are.

Example:
    >>> from transfer_analysis.errors import UserError
    >>> try:
    ...     raise UserError("unknown dataset 'cifar11'; choose one of cifar10, cifar100")
    ... except UserError as err:
    ...     str(err)
    "unknown dataset 'cifar11'; choose one of cifar10, cifar100"
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["UserError", "cli_text"]

_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


class UserError(Exception):
    """A mistake in the user's input, reported as one line (problem and fix) and exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would read as a traceback.
        super().__init__(" ".join(str(message).split()))


def cli_text(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with each backquoted parameter that ``flags`` maps (argparse dest -> option
    string) replaced by its flag; other backquoted names are kept as they are.

    Example:
        >>> cli_text("`max_params` must be positive; `teachers` in the config", {"max_params": "--max-params"})
        '--max-params must be positive; `teachers` in the config'
    """
    return _PARAM.sub(lambda m: flags.get(m.group(1), m.group(0)), message)

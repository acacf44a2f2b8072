"""The one error type for user mistakes.

Library code raises :class:`UserError` for anything the user can fix (an unknown architecture, a
missing file, a bad ε, k larger than the pool). The ``darht`` command turns it into exit code 2
and a single line on stderr, with no traceback.

Example:
    >>> from transfer_analysis.errors import UserError
    >>> try:
    ...     raise UserError("unknown dataset 'cifar11'; choose one of cifar10, cifar100")
    ... except UserError as err:
    ...     str(err)
    "unknown dataset 'cifar11'; choose one of cifar10, cifar100"
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the user's input, reported as one line (problem and fix) and exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would read as a traceback.
        super().__init__(" ".join(str(message).split()))

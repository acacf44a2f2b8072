"""Value checks shared by every config reader (study configs, run configs, pool files, methods).

Each takes the value and the *name* of the parameter it was given as (``"epochs"``,
``"config.yaml: matrix.steps"``) and raises :class:`~transfer_analysis.errors.UserError` naming it;
the CLI maps parameter names to flags where they differ. Fractions such as ``"8/255"`` are read by
:func:`transfer_analysis.utils.parse_eps` wherever a number is allowed.

Example:
    >>> as_int(3, "epochs", minimum=1), as_number("1/4", "lr", strict=True), ema_decay(0.999)
    (3, 0.25, 0.999)
    >>> as_int(0, "epochs", minimum=1)
    Traceback (most recent call last):
    ...
    transfer_analysis.errors.UserError: epochs must be a positive integer, got 0
"""

from __future__ import annotations

import math
from typing import Any

from transfer_analysis.errors import UserError

__all__ = ["as_int", "as_number", "as_fraction", "as_bool", "ema_decay"]


def as_int(value: Any, name: str, minimum: int = 0, *, allow_none: bool = False, exact: bool = False) -> Any:
    """``value`` as an ``int >= minimum`` (``None`` passes with ``allow_none``). Integral floats such as
    ``10.0`` (YAML's ``1e1``) are accepted unless ``exact`` (then only ``int`` is)."""
    if value is None and allow_none:
        return None
    integral = isinstance(value, int) or (not exact and isinstance(value, float) and math.isfinite(value)
                                          and int(value) == value)
    if isinstance(value, bool) or not integral or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UserError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def as_number(value: Any, name: str, minimum: float = 0.0, *, strict: bool = False, text: bool = True) -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` if ``strict``); ``"a/b"`` strings are
    read unless ``text=False`` (then only numbers pass)."""
    if isinstance(value, str) and text:
        from transfer_analysis.utils import parse_eps

        value = parse_eps(value, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value <= minimum):
        raise UserError(f"{name} must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def as_fraction(value: Any, name: str) -> float:
    """``value`` as a number in [0, 1] (a weight such as KD's α); strings are refused.

    Example:
        >>> as_fraction(0.9, "kd_weight")
        0.9
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UserError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def as_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (YAML's ``yes``/``no`` are already booleans)."""
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return value


def ema_decay(value: Any, name: str = "ema") -> float | None:
    """The decay of an exponential moving average of weights, in (0, 1); ``None``: no EMA."""
    if value is None:
        return None
    decay = as_number(value, name)
    if not 0 < decay < 1:
        raise UserError(f"{name} is the decay of the weights' moving average, in (0, 1) (e.g. 0.999), got {value!r}")
    return decay

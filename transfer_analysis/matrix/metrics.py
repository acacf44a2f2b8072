"""Pairwise transferability metrics from the four per-sample booleans, and the Wilson interval.

For source s and target t: ``cs``/``ct`` (s/t classify the clean image correctly), ``fs`` (s is
fooled by its own ``x_adv_s``) and ``ft`` (t is fooled by ``x_adv_s``). A metric maps them to
``(successes, denominator)`` masks; :func:`register_metric` adds one.

Example:
    >>> sorted(METRICS)
    ['target_error', 'transfer_rate', 'trs', 'unconditional']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["Z_95", "DEFAULT_METRICS", "METRICS", "MetricFn", "register_metric", "wilson_interval"]

Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile."""

DEFAULT_METRICS = ("transfer_rate", "target_error")


def wilson_interval(k: int | np.ndarray, n: int | np.ndarray, z: float = Z_95) -> tuple[Any, Any]:
    """Wilson score interval for ``k`` successes in ``n`` trials (scalars or arrays).

    ``n = 0`` gives ``(nan, nan)``.

    Example:
        >>> lo, hi = wilson_interval(3, 4)
        >>> round(lo, 4), round(hi, 4)
        (0.3006, 0.9544)
        >>> wilson_interval(0, 0)
        (nan, nan)
    """
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k_arr / n_arr
        z2 = z * z
        denom = 1.0 + z2 / n_arr
        center = (p + z2 / (2 * n_arr)) / denom
        half = z * np.sqrt(p * (1 - p) / n_arr + z2 / (4 * n_arr * n_arr)) / denom
        # exact ends at k = 0 and k = n (the formula gives them up to rounding), so the interval
        # always brackets the estimate
        lo = np.where(k_arr <= 0, 0.0, np.clip(center - half, 0.0, 1.0))
        hi = np.where(k_arr >= n_arr, 1.0, np.clip(center + half, 0.0, 1.0))
        lo = np.where(n_arr > 0, np.minimum(lo, p), np.nan)
        hi = np.where(n_arr > 0, np.maximum(hi, p), np.nan)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


MetricFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
METRICS: dict[str, MetricFn] = {}
"""Metric name -> ``fn(cs, ct, fs, ft) -> (successes, denominator)`` boolean masks.

Arguments broadcast: ``cs`` (S, 1, n), ``ct`` (1, T, n), ``fs`` (S, 1, n), ``ft`` (S, T, n).
"""


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator: add a pairwise metric computed from the four booleans.

    Example:
        >>> @register_metric("both_fooled_demo")
        ... def _m(cs, ct, fs, ft):
        ...     return fs & ft, torch.ones_like(fs & ft)
        >>> "both_fooled_demo" in METRICS
        True
        >>> _ = METRICS.pop("both_fooled_demo")
    """

    def decorator(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return decorator


@register_metric("transfer_rate")
def _transfer_rate(cs, ct, fs, ft):
    """Both clean-correct and the source fooled: fraction that also fools the target."""
    den = cs & ct & fs
    return den & ft, den


@register_metric("target_error")
def _target_error(cs, ct, fs, ft):
    """Target clean-correct: fraction the target gets wrong on the source's examples."""
    return ct & ft, ct.expand_as(ft)


@register_metric("unconditional")
def _unconditional(cs, ct, fs, ft):
    """All samples: fraction that fools the target (TransferAttack's success rate)."""
    return ft, torch.ones_like(ft)


@register_metric("trs")
def _trs(cs, ct, fs, ft):
    """Both clean-correct: fraction that fools both (TRS's definition)."""
    den = (cs & ct).expand_as(ft)
    return den & fs & ft, den

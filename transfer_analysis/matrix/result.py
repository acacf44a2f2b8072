"""The result of one transferability run: predictions, booleans, and the tables written from them.

Example:
    >>> import torch
    >>> from transfer_analysis.attacks import AttackConfig
    >>> r = TransferResult(names=["a"], attack=AttackConfig("fgsm").resolved(), labels=torch.tensor([0, 1]),
    ...                    clean_pred=torch.tensor([[0, 1]]), adv_pred=torch.tensor([[[1, 1]]]), params=[10],
    ...                    families=[None], archs=["mlp"], fingerprints=["f" * 64])
    >>> float(r.models.whitebox_robust_acc[0])
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..attacks import AttackConfig
from ..errors import UserError
from .metrics import DEFAULT_METRICS, METRICS, wilson_interval

__all__ = ["TransferResult"]


@dataclass
class TransferResult:
    """Predictions, booleans and tables of one transferability run.

    Attributes:
        names: model names, in pool order (rows and columns of every table).
        attack: the resolved attack configuration.
        labels: true labels, shape (n,).
        clean_pred: clean predictions, shape (N, n).
        adv_pred: ``adv_pred[s, t]`` = predictions of model t on ``x_adv_s``, shape (N, N, n).
        params: parameter count per model.
        families, archs: pool labels (``None`` for plain modules).
        weights: where each model's weights came from (``pretrained``, ``checkpoint``, ``random``;
            ``None`` for plain modules), and ``new_heads`` whether its classifier is new.
        fingerprints: content fingerprints (the cache keys' model part).
        stats: work done: ``attacks_run``, ``target_evaluations``, ``clean_evaluations``,
            ``sources_from_cache``.
        long: tidy table (source, target, attack, eps, metric, value, n, ci_low, ci_high).
        matrix: ``transfer_rate`` pivot, index ``source``, one column per target.
        models: per model: clean_acc, whitebox_robust_acc, params, family, arch, weights, new_head.
    """

    names: list[str]
    attack: AttackConfig
    labels: torch.Tensor = field(repr=False)
    clean_pred: torch.Tensor = field(repr=False)
    adv_pred: torch.Tensor = field(repr=False)
    params: list[int]
    families: list[str | None]
    archs: list[str | None]
    fingerprints: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    weights: list[str | None] | None = None
    new_heads: list[bool] | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    long: pd.DataFrame = field(init=False, repr=False)
    matrix: pd.DataFrame = field(init=False, repr=False)
    models: pd.DataFrame = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.long = self.long_table(self.metrics)
        self.matrix = self.metric_matrix("transfer_rate")
        self.models = self.models_table()

    # ------------------------------------------------------------ booleans
    @property
    def clean_correct(self) -> torch.Tensor:
        """``cs``/``ct``: (N, n) bool."""
        return self.clean_pred == self.labels[None, :]

    @property
    def fooled(self) -> torch.Tensor:
        """``fooled[s, t]``: target t wrong on ``x_adv_s``, (N, N, n) bool; ``fs`` is the diagonal."""
        return self.adv_pred != self.labels[None, None, :]

    def booleans(self, source: str, target: str) -> dict[str, torch.Tensor]:
        """The four per-sample booleans of one pair: ``cs``, ``ct``, ``fs``, ``ft`` (each (n,))."""
        s, t = self._index(source), self._index(target)
        cc, fo = self.clean_correct, self.fooled
        return {"cs": cc[s], "ct": cc[t], "fs": fo[s, s], "ft": fo[s, t]}

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UserError(f"model {name!r} is not in this result; it has {', '.join(self.names)}") from None

    # ------------------------------------------------------------ metrics
    def counts(self, metric: str = "transfer_rate") -> tuple[np.ndarray, np.ndarray]:
        """Successes and denominators of a metric, each (N, N) int64."""
        if metric not in METRICS:
            raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        cc, fo = self.clean_correct, self.fooled
        idx = torch.arange(len(self.names))
        cs, ct, fs = cc[:, None, :], cc[None, :, :], fo[idx, idx][:, None, :]
        num, den = METRICS[metric](cs, ct, fs, fo)
        return num.sum(-1).numpy().astype(np.int64), den.sum(-1).numpy().astype(np.int64)

    def values(self, metric: str = "transfer_rate") -> np.ndarray:
        """Metric values (N, N), NaN where the denominator is empty."""
        k, n = self.counts(metric)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, k / np.maximum(n, 1), np.nan)

    def metric_matrix(self, metric: str = "transfer_rate") -> pd.DataFrame:
        """Source x target pivot of a metric (index named ``source``)."""
        df = pd.DataFrame(self.values(metric), index=pd.Index(self.names, name="source"), columns=list(self.names))
        return df

    def long_table(self, metrics: Sequence[str] = DEFAULT_METRICS) -> pd.DataFrame:
        """Tidy table: one row per (metric, source, target) with value, n and the Wilson interval."""
        rows: list[dict[str, Any]] = []
        for metric in metrics:
            k, n = self.counts(metric)
            lo, hi = wilson_interval(k, n)
            vals = self.values(metric)
            for i, s in enumerate(self.names):
                for j, t in enumerate(self.names):
                    rows.append({"source": s, "target": t, "attack": self.attack.name, "eps": float(self.attack.eps),
                                 "metric": metric, "value": float(vals[i, j]), "n": int(n[i, j]),
                                 "ci_low": float(lo[i, j]), "ci_high": float(hi[i, j])})
        return pd.DataFrame(rows, columns=["source", "target", "attack", "eps", "metric", "value", "n",
                                           "ci_low", "ci_high"])

    def models_table(self) -> pd.DataFrame:
        """Per model: clean accuracy, white-box robust accuracy (accuracy on its own ``x_adv``), size."""
        idx = torch.arange(len(self.names))
        clean_acc = self.clean_correct.double().mean(-1).tolist()
        robust_acc = (~self.fooled[idx, idx]).double().mean(-1).tolist()
        n = len(self.names)
        return pd.DataFrame({"model": self.names, "clean_acc": clean_acc, "whitebox_robust_acc": robust_acc,
                             "params": [int(p) for p in self.params], "family": self.families, "arch": self.archs,
                             "weights": self.weights if self.weights is not None else [None] * n,
                             "new_head": [bool(h) for h in self.new_heads] if self.new_heads is not None
                             else [False] * n})

"""The vocabulary and the answer of a recommendation: objectives, pair rules, ranked teacher sets.

Example:
    >>> Objective("mean"), PairRule("max")
    (<Objective.MEAN: 'mean'>, <PairRule.MAX: 'max'>)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["Objective", "PairRule", "TeacherSet", "Recommendation", "write_recommendation",
           "DEFAULT_ENUMERATION_LIMIT", "DEFAULT_CLIQUE_LIMIT", "DEFAULT_CLIQUE_EFFORT"]

#: Enumerate every subset of the pool while there are at most this many.
DEFAULT_ENUMERATION_LIMIT = 2_000_000
#: Most k-cliques collected at one threshold when ranking minimax sets of a large pool.
DEFAULT_CLIQUE_LIMIT = 200_000
#: Work (vertices coloured, about a microsecond each) the minimax clique search may spend before it
#: stops proving optimality and says exact=false. Pools of hundreds with k <= 12 use a small part
#: of it; extreme requests (k=20 of 200 random models) would need minutes.
DEFAULT_CLIQUE_EFFORT = 25_000_000
_ROUND = 12  # decimals kept when comparing scores: float noise never decides a tie


class Objective(str, Enum):
    """What a teacher set minimizes: the worst pair (``minimax``) or the average pair (``mean``)."""

    MINIMAX = "minimax"
    MEAN = "mean"


class PairRule(str, Enum):
    """How the two directions of a pair combine: ``max(T[a,b], T[b,a])`` or their mean."""

    MAX = "max"
    MEAN = "mean"


def _coerce(enum_cls: type[Enum], value: Any, flag: str) -> Any:
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in enum_cls)
        raise UserError(f"`{flag}` must be one of {choices}, got {value!r}") from None


def _num(x: Any) -> float | None:
    """A finite float, or None for unknown (NaN/None): JSON never holds NaN or strings."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class TeacherSet:
    """One recommended set with its scores.

    Attributes:
        teachers: model names, alphabetical.
        score: the objective's value (``max_pair`` for minimax, ``mean_pair`` for mean).
        max_pair: the largest pair score inside the set.
        mean_pair: the average pair score inside the set.
        mean_robust_acc: mean white-box robust accuracy of the members; None when any is unknown.
        mean_clean_acc: mean clean accuracy; None when any is unknown.
        total_params: summed parameter count; None when any is unknown.
        families: each member's family (None when unknown).
        pairs: one dict per pair: ``a``, ``b``, ``score``, ``transfer_ab`` (T[a,b]), ``transfer_ba``.
    """

    teachers: tuple[str, ...]
    score: float
    max_pair: float
    mean_pair: float
    mean_robust_acc: float | None
    mean_clean_acc: float | None
    total_params: float | None
    families: tuple[str | None, ...]
    pairs: tuple[dict[str, Any], ...]

    @property
    def family(self) -> str | None:
        """The family shared by every member, or None when they differ or are unknown."""
        fams = set(self.families)
        return next(iter(fams)) if len(fams) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: numbers are numbers, unknowns are null."""
        total = _num(self.total_params)
        return {
            "teachers": list(self.teachers),
            "score": float(self.score),
            "max_pair": float(self.max_pair),
            "mean_pair": float(self.mean_pair),
            "mean_robust_acc": _num(self.mean_robust_acc),
            "mean_clean_acc": _num(self.mean_clean_acc),
            "total_params": int(total) if total is not None and float(total).is_integer() else total,
            "family": self.family,
            "families": list(self.families),
            "pairs": [dict(p) for p in self.pairs],
        }


@dataclass
class Recommendation:
    """The ranked teacher sets and how they were found.

    Attributes:
        objective, pair, k, worst, family_only: the request.
        exact: True when ``sets`` is provably the top of the ranking over every qualifying set.
        best_score_exact: True when the first set's objective value is provably optimal (always
            for minimax; for mean only by enumeration).
        method: ``enumeration``, ``threshold-clique`` or ``local-search`` (joined with ``+`` when
            families were searched differently).
        sets: best first (``worst``: highest-transfer first).
        constraints: the constraints applied.
        excluded: model -> why it did not qualify.
        candidates: the models that qualified.
    """

    objective: Objective
    pair: PairRule
    k: int
    exact: bool
    best_score_exact: bool
    method: str
    sets: list[TeacherSet]
    worst: bool = False
    family_only: bool = False
    constraints: dict[str, Any] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    n_models: int = 0

    @property
    def best(self) -> TeacherSet:
        """The first set of the ranking."""
        return self.sets[0]

    def to_dict(self) -> dict[str, Any]:
        """The ``rec.json`` content (docs/cli.md)."""
        return {
            "objective": self.objective.value,
            "pair": self.pair.value,
            "k": int(self.k),
            "exact": bool(self.exact),
            "best_score_exact": bool(self.best_score_exact),
            "method": self.method,
            "worst": bool(self.worst),
            "family_only": bool(self.family_only),
            "n_models": int(self.n_models),
            "n_candidates": len(self.candidates),
            "constraints": dict(self.constraints),
            "excluded": dict(self.excluded),
            "sets": [dict(rank=i + 1, **s.to_dict()) for i, s in enumerate(self.sets)],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def summary(self) -> str:
        """One line describing the first set."""
        b = self.best
        rob = "unknown" if b.mean_robust_acc is None else f"{b.mean_robust_acc:.4f}"
        return (f"{'worst' if self.worst else 'best'} set ({self.objective.value}, pair={self.pair.value}, "
                f"k={self.k}, {'exact' if self.exact else 'approximate'}, {self.method}): "
                f"{', '.join(b.teachers)}; max_pair {b.max_pair:.4f}, mean_pair {b.mean_pair:.4f}, "
                f"mean robust acc {rob}")


def write_recommendation(rec: Recommendation, path: str | os.PathLike, graph: Any = None,
                         plot: bool = True, extra: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``rec.json`` and, beside it, the graph PNG (same stem), both atomically.

    The PNG is rendered in memory first, so a failure leaves no output behind.

    Args:
        rec: the recommendation.
        path: the JSON path (its ``.png`` sibling receives the plot).
        graph: the :func:`transfer_graph` to draw (needed when ``plot``).
        plot: write the PNG.
        extra: more top-level JSON fields (e.g. the matrix path).

    Returns:
        The paths written.
    """
    from ..files import atomic_write, atomic_write_json

    path = Path(path)
    if path.is_dir():
        raise UserError(f"`out` {path} is a directory; give a file name such as {path / 'rec.json'}")
    png = path.with_suffix(".png")
    if png == path:
        raise UserError(f"`out` {path} must not end in .png (the graph plot is written beside it as .png)")
    data = {**(dict(extra) if extra else {}), **rec.to_dict()}
    blob = None
    if plot:
        if graph is None:
            raise ValueError("write_recommendation(plot=True) needs the transfer graph")
        from ..graph_plot import render_transfer_graph

        title = (f"{'worst' if rec.worst else 'best'} k={rec.k} set ({rec.objective.value}, pair={rec.pair.value}): "
                 f"{', '.join(rec.best.teachers)}")
        blob = render_transfer_graph(graph, highlight=rec.best.teachers, title=title)
    written = []
    if blob is not None:
        with atomic_write(png, "wb") as fh:
            fh.write(blob)
        written.append(png)
    atomic_write_json(path, data)
    written.append(path)
    return written

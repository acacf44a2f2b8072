"""Teacher-set recommendation: the transferability graph and the search for low-transfer sets.

Nodes of the graph are pool models (clean and white-box robust accuracy, parameter count, family);
the weight of edge ``{a, b}`` is the *pair score*, ``max(T[a, b], T[b, a])`` by default or the mean
of the two directions, where ``T[s, t]`` is the rate at which adversarial examples crafted on ``s``
transfer to ``t``. :func:`select_teachers` searches for the k models whose pair scores are small:

- ``minimax`` (default): the smallest possible worst pair. Exact for any pool: a binary search over
  the sorted distinct pair scores τ, each step asking whether the graph of pairs with score ≤ τ has
  a k-clique (networkx clique search on its (k-1)-core).
- ``mean``: the smallest average pair score. Exact by enumeration while C(N, k) is at most
  ``enumeration_limit`` (2 million); above that, greedy construction from every start plus swap
  local search, and the result says ``exact=False``.

Sets are ranked by ``(max_pair, mean_pair, -mean_robust_acc, names)`` for minimax and
``(mean_pair, -mean_robust_acc, names)`` for mean: ties go to the set with the higher mean robust
accuracy (unknown counts as lowest), then to the alphabetically first list of names. ``worst=True``
maximizes the objective instead (highest-transfer sets first); ties still go to higher robust
accuracy. Scores are compared after rounding to 12 decimals, so float noise never decides a tie.

Example:
    >>> import pandas as pd
    >>> names = ["a", "b", "c", "d"]
    >>> T = pd.DataFrame([[1.0, 0.9, 0.1, 0.2],
    ...                   [0.8, 1.0, 0.3, 0.1],
    ...                   [0.2, 0.2, 1.0, 0.4],
    ...                   [0.1, 0.3, 0.5, 1.0]], index=names, columns=names)
    >>> rec = select_teachers(T, k=3)
    >>> rec.best.teachers, rec.best.max_pair, round(rec.best.mean_pair, 4)
    (('a', 'c', 'd'), 0.5, 0.3)
    >>> [s.teachers for s in select_teachers(T, k=3, worst=True, top=2).sets]  # tied: alphabetical
    [('a', 'b', 'c'), ('a', 'b', 'd')]
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import chain, combinations, islice
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

from .errors import UserError

__all__ = [
    "Objective",
    "PairRule",
    "TeacherSet",
    "Recommendation",
    "read_matrix",
    "read_models_csv",
    "validate_matrix",
    "pair_scores",
    "transfer_graph",
    "select_teachers",
    "select_teachers_by_family",
    "write_recommendation",
    "DEFAULT_ENUMERATION_LIMIT",
    "DEFAULT_CLIQUE_LIMIT",
]

logger = logging.getLogger(__name__)

#: Enumerate every k-subset while C(N, k) is at most this many.
DEFAULT_ENUMERATION_LIMIT = 2_000_000
#: Most k-cliques collected at one threshold when ranking minimax sets of a large pool.
DEFAULT_CLIQUE_LIMIT = 200_000
#: Work (vertices coloured, about a microsecond each) the minimax clique search may spend before it
#: stops proving optimality and says exact=false. Pools of hundreds with k <= 12 use a small part
#: of it; extreme requests (k=20 of 200 random models) would need minutes.
DEFAULT_CLIQUE_EFFORT = 25_000_000

_MATRIX_FILE = "transfer_matrix.csv"
_MODELS_FILE = "models.csv"
_ROUND = 12  # decimals kept when comparing scores: float noise never decides a tie
_CHUNK_ROWS = 1 << 18


# --------------------------------------------------------------------------------------------
# vocabularies
# --------------------------------------------------------------------------------------------
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
        raise UserError(f"{flag} must be one of {choices}, got {value!r}") from None


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
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
        """The ``rec.json`` content (see CLI.md)."""
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


# --------------------------------------------------------------------------------------------
# reading and validating
# --------------------------------------------------------------------------------------------
_NA = {"", "nan", "na", "n/a", "none", "null"}


def _parse_cell(text: str, where: str) -> float:
    s = text.strip()
    if s.lower() in _NA:
        return math.nan
    try:
        v = float(s)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number; every cell must be a transfer rate in [0, 1]") \
            from None
    if math.isinf(v):
        raise UserError(f"{where}: {text!r} is not finite; every cell must be a transfer rate in [0, 1]")
    return v


def _resolve_matrix_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / _MATRIX_FILE
    if not p.is_file():
        raise UserError(f"transfer matrix not found: {p}; pass --matrix DIR (holding {_MATRIX_FILE}) "
                        "or the CSV itself, as written by 'darht matrix'")
    return p


def read_matrix(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read ``transfer_matrix.csv`` (a file, or a directory holding it) and ``models.csv`` beside it.

    The CSV has a first column ``source`` and one column per target; cell ``[s, t]`` is the rate
    at which adversarial examples crafted on ``s`` fool ``t``. Columns are reordered to match the
    rows. Anything malformed (non-square, row and column names differ, duplicate or missing names,
    non-numeric cells, a pair empty in both directions, values outside [0, 1]) is a
    :class:`UserError`.

    Args:
        path: the CSV, or a directory holding ``transfer_matrix.csv``.

    Returns:
        ``(matrix, models)``: the square DataFrame (index = sources, columns = targets) and the
        ``models.csv`` table (see :func:`read_models_csv`), or None when there is none.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "transfer_matrix.csv").write_text("source,a,b\\na,1.0,0.25\\nb,0.5,1.0\\n")
        >>> m, models = read_matrix(d)
        >>> float(m.loc["b", "a"]), models is None
        (0.5, True)
    """
    p = _resolve_matrix_path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read transfer matrix {p}: {err}") from err
    if not rows:
        raise UserError(f"transfer matrix {p} is empty; re-create it with 'darht matrix'")
    header = [c.strip() for c in rows[0]]
    if header[0].lower() not in ("source", ""):
        raise UserError(f"transfer matrix {p}: the first column must be 'source' (one row per source model), "
                        f"found {header[0]!r}")
    targets = header[1:]
    if not targets:
        raise UserError(f"transfer matrix {p} has no target columns")
    body = rows[1:]
    sources: list[str] = []
    values: list[list[float]] = []
    for lineno, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise UserError(f"transfer matrix {p} line {lineno}: {len(row)} cells, expected {len(header)} "
                            "(source name plus one per target)")
        sources.append(row[0].strip())
        values.append([_parse_cell(c, f"transfer matrix {p} line {lineno} column {targets[j] or j + 2}")
                       for j, c in enumerate(row[1:])])
    df = pd.DataFrame(values, index=sources, columns=targets, dtype=float)
    matrix = validate_matrix(df, where=f"transfer matrix {p}")
    models = None
    mp = p.parent / _MODELS_FILE
    if mp.is_file():
        models = read_models_csv(mp)
    return matrix, models


def validate_matrix(matrix: pd.DataFrame, where: str = "transfer matrix") -> pd.DataFrame:
    """Check a transfer matrix and return it as floats with columns in row order.

    Args:
        matrix: square DataFrame, index = sources, columns = targets, values in [0, 1].
        where: how messages name the matrix.

    Returns:
        A float copy whose columns follow the index order.

    Raises:
        UserError: non-square, names differ, duplicate or empty names, non-numeric cells, a pair
            empty (NaN) in both directions, values outside [0, 1].

    Example:
        >>> import pandas as pd
        >>> validate_matrix(pd.DataFrame([[1, 0.5], [0.2, 1]], index=["a", "b"], columns=["a", "b"])).shape
        (2, 2)
    """
    if not isinstance(matrix, pd.DataFrame):
        raise UserError(f"{where} must be a pandas DataFrame (index = sources, columns = targets)")
    rows = [str(r).strip() for r in matrix.index]
    cols = [str(c).strip() for c in matrix.columns]
    if not rows:
        raise UserError(f"{where} has no rows")
    for kind, names in (("source", rows), ("target", cols)):
        empty = [i for i, n in enumerate(names) if n == "" or n.lower() == "nan"]
        if empty:
            raise UserError(f"{where}: {kind} name missing at position {empty[0] + 1}; every row and column "
                            "needs a model name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"{where}: duplicate {kind} name(s) {', '.join(dup)}; model names must be unique")
    if len(rows) != len(cols):
        raise UserError(f"{where} is not square: {len(rows)} source rows and {len(cols)} target columns")
    if set(rows) != set(cols):
        only_r = sorted(set(rows) - set(cols))
        only_c = sorted(set(cols) - set(rows))
        raise UserError(f"{where}: row and column names differ (only as sources: {', '.join(only_r) or '-'}; "
                        f"only as targets: {', '.join(only_c) or '-'})")
    df = matrix.copy()
    df.index = rows
    df.columns = cols
    try:
        df = df.apply(pd.to_numeric, errors="raise").astype(float)
    except (ValueError, TypeError) as err:
        raise UserError(f"{where} holds a non-numeric cell ({err}); every cell must be a transfer rate in [0, 1]") \
            from None
    df = df.loc[rows, rows]
    arr = df.to_numpy()
    off = ~np.eye(len(rows), dtype=bool)
    # An empty cell is a transfer rate with no sample to count (no image both models classify correctly
    # and the source's attack fools); the pair score then uses the other direction. A pair empty both
    # ways has no score.
    bad = np.argwhere(off & np.isnan(arr) & np.isnan(arr.T))
    if len(bad):
        i, j = bad[0]
        raise UserError(f"{where}: cells [{rows[i]}, {rows[j]}] and [{rows[j]}, {rows[i]}] are both empty/NaN, so "
                        "the pair has no score; re-create the matrix with more --n-samples")
    bad = np.argwhere(np.isinf(arr) | (arr < 0) | (arr > 1))
    if len(bad):
        i, j = bad[0]
        raise UserError(f"{where}: cell [{rows[i]}, {rows[j]}] = {arr[i, j]!r} is outside [0, 1]; "
                        "cells are transfer rates (fractions)")
    df.index.name = "source"
    return df


def read_models_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``models.csv``: ``model, clean_acc, whitebox_robust_acc, params`` (+ ``family``, ``arch``).

    Missing columns or empty cells mean unknown. Accuracies must be fractions in [0, 1].

    Returns:
        A DataFrame with one row per model and at least the column ``model``.
    """
    p = Path(path)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise UserError(f"cannot read {p}: {' '.join(str(err).split())}") from err
    return _check_models(df, where=str(p))


def _check_models(models: pd.DataFrame, where: str = "models") -> pd.DataFrame:
    df = models.copy()
    df.columns = [str(c).strip() for c in df.columns]
    if "model" not in df.columns:
        if df.index.name == "model" or (len(df.index) and not isinstance(df.index, pd.RangeIndex)):
            df = df.reset_index().rename(columns={df.index.name or "index": "model"})
        else:
            raise UserError(f"{where} needs a 'model' column (model, clean_acc, whitebox_robust_acc, params)")
    if "whitebox_robust_acc" not in df.columns and "robust_acc" in df.columns:
        df = df.rename(columns={"robust_acc": "whitebox_robust_acc"})
    df["model"] = [str(m).strip() for m in df["model"]]
    if (df["model"] == "").any():
        raise UserError(f"{where}: a row has no model name")
    dup = sorted(set(df["model"][df["model"].duplicated()]))
    if dup:
        raise UserError(f"{where}: duplicate model name(s) {', '.join(dup)}")
    for col in ("clean_acc", "whitebox_robust_acc", "params"):
        if col not in df.columns:
            df[col] = np.nan
            continue
        raw = df[col]
        num = pd.to_numeric(raw.replace({s: np.nan for s in ("", "nan", "NaN", "NA", "None", "null")})
                            if raw.dtype == object else raw, errors="coerce")
        bad = num.isna() & ~raw.isna() & ~raw.astype(str).str.strip().str.lower().isin(_NA)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{where}: {col} of {df['model'].iloc[i]} is {raw.iloc[i]!r}, not a number")
        if col != "params" and ((num < 0) | (num > 1)).any():
            i = int(np.flatnonzero(((num < 0) | (num > 1)).to_numpy())[0])
            raise UserError(f"{where}: {col} of {df['model'].iloc[i]} is {num.iloc[i]}; accuracies are "
                            "fractions in [0, 1]")
        if col == "params" and (num < 0).any():
            raise UserError(f"{where}: params must be >= 0")
        df[col] = num.astype(float)
    for col in ("family", "arch"):
        if col in df.columns:
            df[col] = pd.Series([_label(v) for v in df[col]], index=df.index, dtype=object)
    return df.reset_index(drop=True)


def _label(v: Any) -> str | None:
    """A free-text label (family, arch), or None when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    text = str(v).strip()
    return None if text.lower() in _NA else text


def _attributes(names: Sequence[str], models: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """name -> {clean_acc, robust_acc, params, family, arch} (None when unknown)."""
    out: dict[str, dict[str, Any]] = {n: {"clean_acc": None, "robust_acc": None, "params": None,
                                          "family": None, "arch": None} for n in names}
    if models is None:
        return out
    df = _check_models(models)
    known = set(names)
    extra = sorted(set(df["model"]) - known)
    if extra:
        logger.debug("models.csv lists models that are not in the matrix: %s", ", ".join(extra))
    missing = sorted(known - set(df["model"]))
    if missing:
        logger.warning("models.csv has no row for %s: accuracies and size unknown", ", ".join(missing))
    for row in df.itertuples(index=False):
        if row.model not in known:
            continue
        d = row._asdict()
        out[row.model] = {
            "clean_acc": _num(d.get("clean_acc")),
            "robust_acc": _num(d.get("whitebox_robust_acc")),
            "params": _num(d.get("params")),
            "family": _label(d.get("family")),
            "arch": _label(d.get("arch")),
        }
    return out


# --------------------------------------------------------------------------------------------
# pair scores and the graph
# --------------------------------------------------------------------------------------------
def pair_scores(matrix: pd.DataFrame, pair: PairRule | str = "max") -> pd.DataFrame:
    """Symmetric pair scores from an asymmetric transfer matrix; the diagonal is NaN (no pair).

    Args:
        matrix: square transfer matrix (index = sources, columns = targets).
        pair: ``max`` (default) for ``max(T[a,b], T[b,a])`` or ``mean`` for their average.

    Example:
        >>> import pandas as pd
        >>> T = pd.DataFrame([[1.0, 0.2], [0.6, 1.0]], index=["a", "b"], columns=["a", "b"])
        >>> float(pair_scores(T).loc["a", "b"]), float(pair_scores(T, "mean").loc["b", "a"])
        (0.6, 0.4)
    """
    rule = _coerce(PairRule, pair, "pair")
    m = validate_matrix(matrix)
    a = m.to_numpy()
    # an empty direction (NaN: nothing to count) defers to the other one
    if rule is PairRule.MAX:
        s = np.fmax(a, a.T)
    else:
        s = np.where(np.isnan(a), a.T, np.where(np.isnan(a.T), a, (a + a.T) / 2.0))
    np.fill_diagonal(s, np.nan)
    return pd.DataFrame(s, index=m.index.copy(), columns=m.columns.copy())


def transfer_graph(matrix: pd.DataFrame, models: pd.DataFrame | None = None,
                   pair: PairRule | str = "max") -> nx.Graph:
    """The complete transferability graph: models as nodes, pair scores as edge weights.

    Node attributes: ``clean_acc``, ``robust_acc`` (white-box), ``params``, ``family``, ``arch``
    (None when unknown). Edge attributes: ``weight`` (the pair score), ``transfer`` (a dict
    ``{(s, t): T[s, t]}`` for both directions). Graph attribute ``pair`` names the rule.

    Example:
        >>> import pandas as pd
        >>> T = pd.DataFrame([[1.0, 0.2], [0.6, 1.0]], index=["a", "b"], columns=["a", "b"])
        >>> g = transfer_graph(T)
        >>> g.edges["a", "b"]["weight"], g.nodes["a"]["family"]
        (0.6, None)
    """
    rule = _coerce(PairRule, pair, "pair")
    m = validate_matrix(matrix)
    s = pair_scores(m, rule)
    names = list(m.index)
    attrs = _attributes(names, models)
    g = nx.Graph(pair=rule.value)
    for n in names:
        g.add_node(n, **attrs[n])
    t = m.to_numpy()
    sv = s.to_numpy()
    for i, j in combinations(range(len(names)), 2):
        g.add_edge(names[i], names[j], weight=float(sv[i, j]),
                   transfer={(names[i], names[j]): float(t[i, j]), (names[j], names[i]): float(t[j, i])})
    return g


# --------------------------------------------------------------------------------------------
# the search
# --------------------------------------------------------------------------------------------
@dataclass
class _Pool:
    """Every model of the matrix, alphabetical, as arrays (index order = name order)."""

    names: list[str]
    T: np.ndarray       # raw transfer rates
    S: np.ndarray       # pair scores, diagonal 0
    robust: np.ndarray  # nan = unknown
    clean: np.ndarray
    params: np.ndarray
    family: list[str | None]
    objective: Objective
    worst: bool

    def stats(self, C: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """max pair, mean pair, mean robust acc, total params for each row of C (m, k)."""
        k = C.shape[1]
        iu, ju = np.triu_indices(k, 1)
        P = self.S[C[:, iu], C[:, ju]]
        return (P.max(axis=1), P.sum(axis=1) / len(iu), self.robust[C].mean(axis=1),
                self.params[C].sum(axis=1))

    def primary(self, maxp: np.ndarray, meanp: np.ndarray) -> np.ndarray:
        sgn = -1.0 if self.worst else 1.0
        return sgn * (maxp if self.objective is Objective.MINIMAX else np.round(meanp, _ROUND))

    def order(self, C: np.ndarray, maxp: np.ndarray, meanp: np.ndarray, rob: np.ndarray) -> np.ndarray:
        """Row order of C, best first, under the full ranking key."""
        sgn = -1.0 if self.worst else 1.0
        rob_key = np.where(np.isnan(rob), np.inf, -np.round(np.nan_to_num(rob), _ROUND))
        keys = [C[:, j] for j in range(C.shape[1] - 1, -1, -1)]
        keys += [rob_key, sgn * np.round(meanp, _ROUND)]
        if self.objective is Objective.MINIMAX:
            keys.append(sgn * maxp)
        return np.lexsort(keys)

    def rank(self, sets: Iterable[tuple[int, ...]], top: int, budget: float | None = None) -> list[tuple[int, ...]]:
        """The ``top`` best of ``sets`` (sorted index tuples) under the ranking key."""
        uniq = sorted(set(sets))
        if not uniq:
            return []
        C = np.asarray(uniq, dtype=np.int64)
        maxp, meanp, rob, par = self.stats(C)
        if budget is not None:
            keep = par <= budget
            C, maxp, meanp, rob = C[keep], maxp[keep], meanp[keep], rob[keep]
        o = self.order(C, maxp, meanp, rob)[:top]
        return [tuple(int(v) for v in C[i]) for i in o]

    def teacher_set(self, idx: Sequence[int]) -> TeacherSet:
        idx = sorted(int(i) for i in idx)
        C = np.asarray([idx], dtype=np.int64)
        maxp, meanp, rob, par = self.stats(C)
        clean = self.clean[idx].mean()
        pairs = tuple({"a": self.names[a], "b": self.names[b], "score": float(self.S[a, b]),
                       "transfer_ab": float(self.T[a, b]), "transfer_ba": float(self.T[b, a])}
                      for a, b in combinations(idx, 2))
        score = maxp[0] if self.objective is Objective.MINIMAX else meanp[0]
        return TeacherSet(teachers=tuple(self.names[i] for i in idx), score=float(score),
                          max_pair=float(maxp[0]), mean_pair=float(meanp[0]), mean_robust_acc=_num(rob[0]),
                          mean_clean_acc=_num(clean), total_params=_num(par[0]),
                          families=tuple(self.family[i] for i in idx), pairs=pairs)


class _EffortExhausted(Exception):
    """The clique search spent its effort without deciding."""


@dataclass
class _Result:
    sets: list[tuple[int, ...]]
    exact: bool
    best_score_exact: bool
    method: str


class _Search:
    """One search over a candidate subset of the pool (indices into the pool)."""

    def __init__(self, pool: _Pool, cands: Sequence[int], required: Sequence[int], k: int, top: int,
                 budget: float | None, enumeration_limit: int, clique_limit: int,
                 clique_effort: int = 0) -> None:
        self.pool = pool
        self.cands = sorted(int(c) for c in cands)
        self.required = sorted(int(r) for r in required)
        self.others = [c for c in self.cands if c not in set(self.required)]
        self.k = k
        self.k_free = k - len(self.required)
        self.top = top
        self.budget = budget
        self.enumeration_limit = enumeration_limit
        self.clique_limit = clique_limit
        self.clique_effort = clique_effort or DEFAULT_CLIQUE_EFFORT
        self.req_params = float(pool.params[self.required].sum()) if self.required else 0.0

    # -- helpers ---------------------------------------------------------------------------
    def cheapest_completion(self, forced: Sequence[int]) -> float:
        """Smallest total params of a k-set containing ``forced`` (inf when too few models)."""
        fs = set(forced)
        rest = np.sort(self.pool.params[[c for c in self.cands if c not in fs]])
        need = self.k - len(fs)
        if need < 0 or len(rest) < need:
            return math.inf
        return float(self.pool.params[list(fs)].sum() + rest[:need].sum())

    def fits(self, forced: Sequence[int]) -> bool:
        return self.budget is None or self.cheapest_completion(forced) <= self.budget

    # -- dispatch --------------------------------------------------------------------------
    def run(self) -> _Result:
        total = math.comb(len(self.others), self.k_free)
        if self.k_free == 0 or total <= self.enumeration_limit:
            return self.enumerate()
        if self.pool.objective is Objective.MINIMAX and not self.pool.worst:
            return self.minimax_cliques()
        if self.pool.objective is Objective.MINIMAX:
            return self.worst_minimax_local()
        sets = self.local_search_pool(forced=self.required, sign=-1.0 if self.pool.worst else 1.0)
        return _Result(self.pool.rank(sets, self.top, self.budget), False, False, "local-search")

    # -- exact by enumeration -------------------------------------------------------------
    def enumerate(self) -> _Result:
        pool, top = self.pool, self.top
        req = np.asarray(self.required, dtype=np.int64)
        survivors: list[np.ndarray] = []
        if self.k_free == 0:
            chunks: Iterator[np.ndarray] = iter([req[None, :]])
        else:
            it = combinations(self.others, self.k_free)
            rows = max(1, _CHUNK_ROWS // self.k_free)

            def gen() -> Iterator[np.ndarray]:
                while True:
                    flat = np.fromiter(chain.from_iterable(islice(it, rows)), dtype=np.int64)
                    if flat.size == 0:
                        return
                    F = flat.reshape(-1, self.k_free)
                    if len(req):
                        F = np.sort(np.hstack([np.broadcast_to(req, (len(F), len(req))), F]), axis=1)
                    yield F
            chunks = gen()
        for C in chunks:
            maxp, meanp, rob, par = pool.stats(C)
            keep = np.ones(len(C), dtype=bool) if self.budget is None else par <= self.budget
            if len(C) > 4 * top:
                prim = np.where(keep, pool.primary(maxp, meanp), np.inf)
                thr = np.partition(prim, top - 1)[top - 1]
                keep &= prim <= thr
            C, maxp, meanp, rob = C[keep], maxp[keep], meanp[keep], rob[keep]
            if len(C):
                survivors.append(C[pool.order(C, maxp, meanp, rob)[:top]])
        if not survivors:
            return _Result([], True, True, "enumeration")
        C = np.concatenate(survivors)
        maxp, meanp, rob, _ = pool.stats(C)
        best = [tuple(int(v) for v in C[i]) for i in pool.order(C, maxp, meanp, rob)[:top]]
        return _Result(best, True, True, "enumeration")

    # -- exact minimax: threshold search + cliques ----------------------------------------
    def _threshold_graph(self, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """The graph of pairs with score <= tau over the non-required candidates that are compatible
        with every required model and fit the budget, reduced to its (k_free - 1)-core.

        Returns ``(nodes, adjacency)``: pool indices and a boolean adjacency matrix.
        """
        S = self.pool.S
        cand = np.asarray(self.others, dtype=np.int64)
        if self.required:
            cand = cand[(S[np.ix_(cand, self.required)] <= tau).all(axis=1)]
        if self.budget is not None:
            cand = cand[self.pool.params[cand] <= self.budget - self.req_params]
        A = S[np.ix_(cand, cand)] <= tau
        np.fill_diagonal(A, False)
        if self.k_free > 1:  # peel to the (k_free - 1)-core: no other node can be in a k_free-clique
            alive = np.ones(len(cand), dtype=bool)
            while True:
                deg = A[:, alive].sum(axis=1)
                drop = alive & (deg < self.k_free - 1)
                if not drop.any():
                    break
                alive &= ~drop
            cand, A = cand[alive], A[np.ix_(alive, alive)]
        return cand, A

    def _cliques(self, tau: float, cap: int, effort: int) -> tuple[list[tuple[int, ...]], bool, int, bool]:
        """k-sets (with the required models) whose pairs all score <= tau and that fit the budget.

        Branch and bound on bitsets with a greedy-colouring bound (Tomita's MCQ scheme): each
        clique is found once. Stops once more than ``cap`` are found (``cap=0``: existence) or
        after ``effort`` branch expansions.

        Returns:
            ``(sets, overflow, expansions, complete)``: sorted pool-index tuples, whether the cap
            was passed, the work done, and False when the effort ran out first (undecided).
        """
        nodes, A = self._threshold_graph(tau)
        out: list[tuple[int, ...]] = []
        need0 = self.k_free
        if len(nodes) < need0:
            return out, False, 0, True
        work = [0]
        # bit i = node i, nodes ordered by degree (descending) so colouring packs dense nodes first
        order = np.argsort(-A.sum(axis=1), kind="stable")
        nodes, A = nodes[order], A[np.ix_(order, order)]
        weights = 1 << np.arange(len(nodes), dtype=object)
        adj = [int(weights[row].sum()) if row.any() else 0 for row in A]
        # without a budget the parameter counts (possibly unknown) play no part
        params = self.pool.params[nodes] if self.budget is not None else np.zeros(len(nodes))
        room = math.inf if self.budget is None else self.budget - self.req_params
        min_p = float(params.min()) if len(params) else 0.0
        req = self.required

        def colour_sort(mask: int) -> tuple[list[int], list[int]]:
            verts, cols, colour = [], [], 0
            while mask:
                colour += 1
                q = mask
                while q:
                    low = q & -q
                    v = low.bit_length() - 1
                    q &= ~adj[v] & ~low
                    mask &= ~low
                    verts.append(v)
                    cols.append(colour)
            return verts, cols

        def emit(clique: list[int]) -> bool:
            out.append(tuple(sorted([*req, *(int(nodes[u]) for u in clique)])))
            return len(out) > cap

        def expand(mask: int, clique: list[int], psum: float) -> bool:
            need = need0 - len(clique)
            if need <= 2:  # leaves: plain bit scans beat the colouring bound
                while mask:
                    low = mask & -mask
                    v = low.bit_length() - 1
                    mask ^= low
                    p = psum + params[v]
                    if need == 1:
                        if p <= room and emit([*clique, v]):
                            return True
                        continue
                    if p + min_p > room:
                        continue
                    nb = mask & adj[v]
                    while nb:
                        lw = nb & -nb
                        u = lw.bit_length() - 1
                        nb ^= lw
                        if p + params[u] <= room and emit([*clique, v, u]):
                            return True
                return False
            verts, cols = colour_sort(mask)
            work[0] += 1 + len(verts)  # ~ the big-int operations spent: proportional to time
            if work[0] > effort:
                raise _EffortExhausted
            for i in range(len(verts) - 1, -1, -1):
                if cols[i] < need:
                    return False
                v = verts[i]
                mask &= ~(1 << v)
                p = psum + params[v]
                if p + (need - 1) * min_p > room:
                    continue
                if expand(mask & adj[v], [*clique, v], p):
                    return True
            return False

        try:
            overflow = expand((1 << len(nodes)) - 1, [], 0.0)
        except _EffortExhausted:
            return out, False, work[0], False
        return out, overflow, work[0], True

    def minimax_cliques(self) -> _Result:
        """Exact minimax: binary search over the distinct pair scores for the smallest threshold
        whose graph holds a k-clique, then every k-clique at growing thresholds until ``top`` sets
        are known (all sets with max pair <= τ are exactly the k-cliques of the graph at τ)."""
        S = self.pool.S
        cands = np.asarray(self.cands, dtype=np.int64)
        iu, ju = np.triu_indices(len(cands), 1)
        vals = np.unique(S[cands[iu], cands[ju]])
        if len(self.required) >= 2:
            r = np.asarray(self.required)
            ri, rj = np.triu_indices(len(r), 1)
            vals = vals[vals >= S[r[ri], r[rj]].max()]
        # the largest threshold admits every set; the budget pre-check guarantees one fits
        lo, hi = 0, len(vals) - 1
        left = self.clique_effort  # shared by the threshold search and the enumeration
        undecided = False
        witness: list[tuple[int, ...]] = []
        while lo < hi:
            mid = (lo + hi) // 2
            sets, found, used, complete = self._cliques(float(vals[mid]), 0, max(left, 0))
            left -= used
            if found:
                hi, witness = mid, sets
            else:
                undecided |= not complete
                lo = mid + 1
        if undecided:
            logger.warning("clique search reached its effort limit below max pair %.4g: that score is "
                           "not proven optimal (exact=false)", vals[lo])
        logger.debug("minimax: max pair %.6g (threshold %d of %d)", vals[lo], lo + 1, len(vals))
        level, step = lo, 1
        prev: list[tuple[int, ...]] = list(witness)
        while True:
            tau = float(vals[level])
            sets, overflow, used, complete = self._cliques(tau, self.clique_limit, max(left, 0))
            left -= used
            if overflow or not complete:
                logger.warning("%s have max pair <= %.4g; ranking a sample of them plus local-search sets "
                               "(exact=false)", f"more than {self.clique_limit} sets" if overflow
                               else "too many sets to list", tau)
                pool = prev + sets
                if level == lo:  # ties at the optimum: let local search pick good tie-breaks
                    pool += list(self.local_search_pool(self.required, 1.0, max_starts=100, cap_tau=tau))
                return _Result(self.pool.rank(pool, self.top, self.budget), False, not undecided,
                               "threshold-clique")
            if len(sets) >= self.top or level == len(vals) - 1:
                return _Result(self.pool.rank(sets, self.top, self.budget), not undecided, not undecided,
                               "threshold-clique")
            prev = sets
            level = min(level + step, len(vals) - 1)
            step *= 2

    # -- approximate: greedy + swap local search -------------------------------------------
    def _local_opt(self, X: list[int], forced: set[int], S2: np.ndarray, member: np.ndarray,
                   w: np.ndarray, psum: float) -> list[int]:
        params, budget = self.pool.params, self.budget
        for _ in range(50 * self.k + 50):
            free_m = np.asarray([x for x in X if x not in forced], dtype=np.int64)
            outside = np.asarray([c for c in self.cands if not member[c]], dtype=np.int64)
            if len(free_m) == 0 or len(outside) == 0:
                break
            D = w[outside][None, :] - S2[np.ix_(free_m, outside)] - w[free_m][:, None]
            if budget is not None:
                D = np.where(psum - params[free_m][:, None] + params[outside][None, :] <= budget, D, np.inf)
            i, j = np.unravel_index(int(np.argmin(D)), D.shape)
            if not D[i, j] < -1e-12:
                break
            u, v = int(free_m[i]), int(outside[j])
            X[X.index(u)] = v
            member[u], member[v] = False, True
            w += S2[:, v] - S2[:, u]
            psum += params[v] - params[u]
        return X

    def _greedy(self, start: list[int], S2: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray, float] | None:
        params, budget, pool = self.pool.params, self.budget, self.pool
        X = list(dict.fromkeys(start))
        member = np.zeros(len(pool.names), dtype=bool)
        member[X] = True
        w = S2[:, X].sum(axis=1)
        psum = float(params[X].sum())
        cand_arr = np.asarray(self.cands, dtype=np.int64)
        rob_key = np.where(np.isnan(pool.robust), np.inf, -np.nan_to_num(pool.robust))
        while len(X) < self.k:
            out = cand_arr[~member[cand_arr]]
            if len(out) == 0:
                return None
            need = self.k - len(X) - 1  # slots left after taking v
            if len(out) < need + 1:
                return None
            ok = np.ones(len(out), dtype=bool)
            if budget is not None:
                # after v, the remaining slots cost at least the `need` cheapest other outsiders
                rest = np.sort(params[out])
                if need == 0:
                    bound = np.zeros(len(out))
                else:
                    bound = np.where(params[out] <= rest[need - 1], rest[: need + 1].sum() - params[out],
                                     rest[:need].sum())
                ok = psum + params[out] + bound <= budget
            if not ok.any():
                return None
            o = out[ok]
            v = int(o[np.lexsort((o, rob_key[o], np.round(w[o], _ROUND)))[0]])
            X.append(v)
            member[v] = True
            w += S2[:, v]
            psum += float(params[v])
        return X, member, w, psum

    def local_search_pool(self, forced: Sequence[int], sign: float, max_starts: int = 400,
                          cap_tau: float | None = None) -> set[tuple[int, ...]]:
        """Local optima from greedy starts at every candidate, plus one-swap neighbours of the best.

        Minimizes ``sign`` times the summed pair score; with ``cap_tau``, pairs above it are
        penalized so that the search stays among sets whose max pair is at most ``cap_tau``.
        """
        S2 = sign * self.pool.S
        if cap_tau is not None:
            S2 = S2 + 1e6 * (self.pool.S > cap_tau)
        fset = set(forced)
        starts = [c for c in self.cands if c not in fset]
        if len(starts) > max_starts:
            starts = [starts[i] for i in np.linspace(0, len(starts) - 1, max_starts).round().astype(int)]
        found: set[tuple[int, ...]] = set()
        for s in starts or [None]:
            g = self._greedy(list(forced) + ([s] if s is not None and len(fset) < self.k else []), S2)
            if g is None:
                continue
            X, member, w, psum = g
            X = self._local_opt(X, fset, S2, member, w, psum)
            found.add(tuple(sorted(X)))
        # one-swap neighbours of the best few optima: alternatives for the rest of the ranking
        best = self.pool.rank(found, 5, self.budget)
        extra: set[tuple[int, ...]] = set()
        for X in best:
            for u in X:
                if u in fset:
                    continue
                for v in self.cands:
                    if v not in X:
                        extra.add(tuple(sorted([*(x for x in X if x != u), v])))
        return found | extra

    def worst_minimax_local(self) -> _Result:
        """Highest max pair (exact: the top feasible edge), the rest by mean-maximizing local search."""
        S = self.pool.S
        cands = np.asarray(self.cands, dtype=np.int64)
        iu, ju = np.triu_indices(len(cands), 1)
        a, b = cands[iu], cands[ju]
        order = np.argsort(-S[a, b], kind="stable")
        edges: list[tuple[int, int]] = []
        top_val = None
        for e in order:
            u, v = int(a[e]), int(b[e])
            forced = sorted(set(self.required) | {u, v})
            if len(forced) > self.k or not self.fits(forced):
                continue
            if top_val is None:
                top_val = S[u, v]
            if len(edges) >= 10 and S[u, v] < top_val:
                break
            edges.append((u, v))
            if len(edges) >= 40:
                break
        found: set[tuple[int, ...]] = set()
        for u, v in edges:
            forced = sorted(set(self.required) | {u, v})
            found |= self.local_search_pool(forced, sign=-1.0, max_starts=60)
        return _Result(self.pool.rank(found, self.top, self.budget), False, True, "local-search")


# --------------------------------------------------------------------------------------------
# constraints and the public entry points
# --------------------------------------------------------------------------------------------
def _names_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    return list(dict.fromkeys(s.strip() for s in items if s.strip()))


def _fmt_params(x: float) -> str:
    return f"{x:.4g}"


@dataclass
class _Prepared:
    pool: _Pool
    cands: list[int]
    required: list[int]
    excluded: dict[str, str]
    constraints: dict[str, Any]
    budget: float | None


def _prepare(matrix: pd.DataFrame | str | os.PathLike, k: int, objective: Objective, pair: PairRule,
             top: int, worst: bool, min_clean_acc: float | None, min_robust_acc: float | None,
             require: str | Iterable[str] | None, exclude: str | Iterable[str] | None,
             max_params: float | None, models: pd.DataFrame | None) -> _Prepared:
    if isinstance(matrix, (str, os.PathLike)):
        matrix, found = read_matrix(matrix)
        models = found if models is None else models
    m = validate_matrix(matrix)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise UserError(f"k must be an integer, got {k!r}")
    k = int(k)
    n_all = len(m)
    if k < 2:
        raise UserError(f"k must be at least 2 (a set needs a pair to score), got {k}")
    if k > n_all:
        raise UserError(f"k={k} is larger than the pool: the matrix has {n_all} models; choose k <= {n_all}")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise UserError(f"top must be a positive integer, got {top!r}")
    for flag, v in (("--min-clean-acc", min_clean_acc), ("--min-robust-acc", min_robust_acc)):
        if v is not None and not (0.0 <= float(v) <= 1.0):
            raise UserError(f"{flag} must be a fraction in [0, 1], got {v}")
    if max_params is not None and not (float(max_params) > 0 and math.isfinite(float(max_params))):
        raise UserError(f"--max-params must be a positive number, got {max_params}")

    names = sorted(m.index)
    m = m.loc[names, names]
    attrs = _attributes(names, models)
    T = m.to_numpy(dtype=float)
    # the one pair-score rule (an empty direction defers to the other), shared with the graph and the JSON
    S = pair_scores(m, pair).to_numpy(dtype=float, copy=True)
    np.fill_diagonal(S, 0.0)

    def col(key: str) -> np.ndarray:
        return np.asarray([math.nan if attrs[n][key] is None else attrs[n][key] for n in names], dtype=float)

    pool = _Pool(names=names, T=T, S=S, robust=col("robust_acc"), clean=col("clean_acc"), params=col("params"),
                 family=[attrs[n]["family"] for n in names], objective=objective, worst=worst)

    req_names = _names_list(require)
    exc_names = _names_list(exclude)
    known = set(names)
    for flag, lst in (("--require", req_names), ("--exclude", exc_names)):
        unknown = [x for x in lst if x not in known]
        if unknown:
            raise UserError(f"{flag}: unknown model(s) {', '.join(unknown)}; the matrix has "
                            f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    both = sorted(set(req_names) & set(exc_names))
    if both:
        raise UserError(f"{', '.join(both)} both required and excluded; drop one of --require/--exclude")
    if len(req_names) > k:
        raise UserError(f"--require names {len(req_names)} models but k={k}; raise --k or require fewer")

    excluded: dict[str, str] = {}
    budget = None if max_params is None else float(max_params)
    for i, n in enumerate(names):
        why = None
        if n in exc_names:
            why = "excluded by --exclude"
        elif min_clean_acc is not None and math.isnan(pool.clean[i]):
            why = "clean_acc unknown (--min-clean-acc needs models.csv)"
        elif min_clean_acc is not None and pool.clean[i] < min_clean_acc:
            why = f"clean_acc {pool.clean[i]:.4g} < --min-clean-acc {min_clean_acc:g}"
        elif min_robust_acc is not None and math.isnan(pool.robust[i]):
            why = "whitebox_robust_acc unknown (--min-robust-acc needs models.csv)"
        elif min_robust_acc is not None and pool.robust[i] < min_robust_acc:
            why = f"robust_acc {pool.robust[i]:.4g} < --min-robust-acc {min_robust_acc:g}"
        elif budget is not None and math.isnan(pool.params[i]):
            why = "params unknown (--max-params needs models.csv)"
        elif budget is not None and pool.params[i] > budget:
            why = f"params {_fmt_params(pool.params[i])} > --max-params {_fmt_params(budget)}"
        if why is not None:
            excluded[n] = why
    bad_req = [f"{r} ({excluded[r]})" for r in req_names if r in excluded]
    if bad_req:
        raise UserError(f"required model does not qualify: {'; '.join(bad_req)}")
    cands = [i for i, n in enumerate(names) if n not in excluded]
    required = [names.index(r) for r in req_names]
    constraints = {"min_clean_acc": None if min_clean_acc is None else float(min_clean_acc),
                   "min_robust_acc": None if min_robust_acc is None else float(min_robust_acc),
                   "require": sorted(req_names), "exclude": sorted(exc_names),
                   "max_params": None if budget is None else (int(budget) if budget.is_integer() else budget)}
    _check_enough(len(cands), k, n_all, excluded)
    return _Prepared(pool, cands, required, excluded, constraints, budget)


def _check_enough(n_ok: int, k: int, n_all: int, excluded: Mapping[str, str], what: str = "") -> None:
    if n_ok >= k:
        return
    reasons = [f"{n}: {why}" for n, why in excluded.items()]
    shown = "; ".join(reasons[:8]) + (f"; and {len(reasons) - 8} more" if len(reasons) > 8 else "")
    raise UserError(f"only {n_ok} of {n_all} models qualify{what}, fewer than k={k} (excluded {shown}); "
                    "relax the constraints or lower --k")


def _check_budget(search: _Search, pool: _Pool, budget: float | None) -> None:
    if budget is None:
        return
    cheapest = search.cheapest_completion(search.required)
    if cheapest > budget:
        raise UserError(f"no set of k={search.k} fits --max-params {_fmt_params(budget)}: the cheapest qualifying "
                        f"set{' with the required models' if search.required else ''} totals "
                        f"{_fmt_params(cheapest)} parameters; raise the budget or lower --k")


def _families(prep: _Prepared, k: int) -> tuple[dict[str, list[int]], dict[str, str]]:
    pool = prep.pool
    if all(f is None for f in pool.family):
        raise UserError("--family-only needs a 'family' column in models.csv beside the matrix")
    extra: dict[str, str] = {}
    groups: dict[str, list[int]] = {}
    for i in prep.cands:
        f = pool.family[i]
        if f is None:
            extra[pool.names[i]] = "family unknown (--family-only)"
        else:
            groups.setdefault(f, []).append(i)
    req_f = {pool.family[r] for r in prep.required}
    if None in req_f:
        raise UserError("--family-only: a required model has no family in models.csv")
    if len(req_f) > 1:
        raise UserError(f"--family-only: the required models span families {', '.join(sorted(req_f))}")
    if req_f:
        (rf,) = req_f
        for f in list(groups):
            if f != rf:
                for i in groups.pop(f):
                    extra[pool.names[i]] = f"family {f} differs from the required models' ({rf})"
    sizes = {f: len(v) for f, v in groups.items()}
    ok = {f: v for f, v in groups.items() if len(v) >= k}
    if not ok:
        counts = ", ".join(f"{f}: {c}" for f, c in sorted(sizes.items())) or "none"
        raise UserError(f"--family-only: no family has k={k} qualifying models (qualifying per family: {counts})")
    return ok, extra


def _search_for(prep: _Prepared, cands: Sequence[int], k: int, top: int, enumeration_limit: int,
                clique_limit: int, check_budget: bool = True) -> _Result | None:
    s = _Search(prep.pool, cands, prep.required, k, top, prep.budget, enumeration_limit, clique_limit)
    if check_budget:
        _check_budget(s, prep.pool, prep.budget)
    elif prep.budget is not None and s.cheapest_completion(s.required) > prep.budget:
        return None
    return s.run()


def _recommendation(prep: _Prepared, res: _Result, k: int, objective: Objective, pair: PairRule, worst: bool,
                    family_only: bool, excluded: Mapping[str, str]) -> Recommendation:
    pool = prep.pool
    if not res.sets:  # the pre-checks should make this unreachable; never return an empty ranking
        raise UserError(f"no set of k={k} satisfies the constraints; relax them or lower --k")
    excl = dict(sorted(excluded.items()))
    rec = Recommendation(objective=objective, pair=pair, k=k, exact=res.exact, best_score_exact=res.best_score_exact,
                         method=res.method, sets=[pool.teacher_set(c) for c in res.sets], worst=worst,
                         family_only=family_only, constraints=dict(prep.constraints), excluded=excl,
                         candidates=[n for n in pool.names if n not in excl], n_models=len(pool.names))
    return rec


def select_teachers(
    matrix: pd.DataFrame | str | os.PathLike,
    k: int,
    objective: Objective | str = "minimax",
    pair: PairRule | str = "max",
    top: int = 5,
    worst: bool = False,
    min_clean_acc: float | None = None,
    min_robust_acc: float | None = None,
    require: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    max_params: float | None = None,
    family_only: bool = False,
    models: pd.DataFrame | None = None,
    enumeration_limit: int = DEFAULT_ENUMERATION_LIMIT,
    clique_limit: int = DEFAULT_CLIQUE_LIMIT,
) -> Recommendation:
    """Recommend the k teachers whose adversarial examples transfer least among one another.

    Args:
        matrix: transfer matrix (index = sources, columns = targets), or a path for :func:`read_matrix`
            (then ``models.csv`` beside it is used unless ``models`` is given).
        k: set size, 2 <= k <= number of models.
        objective: ``minimax`` (smallest worst pair; exact) or ``mean`` (smallest average pair;
            exact while C(N, k) <= ``enumeration_limit``).
        pair: ``max`` or ``mean`` of the two transfer directions.
        top: how many sets to rank.
        worst: rank the highest-transfer sets first (maximize the objective).
        min_clean_acc, min_robust_acc: per-model minimum accuracies (fractions); a model whose value
            is unknown does not qualify.
        require: models every set must contain (names or a comma-separated string).
        exclude: models no set may contain.
        max_params: parameter budget for the whole set (sum of ``params``).
        family_only: only sets whose members share one family (``family`` column of models.csv).
        models: the ``models.csv`` table (``model, clean_acc, whitebox_robust_acc, params[, family]``).
        enumeration_limit: enumerate every subset while there are at most this many.
        clique_limit: most k-cliques collected at one threshold (minimax on large pools).

    Returns:
        A :class:`Recommendation`; ``.sets`` best first, ``.exact`` says whether the ranking is proven.

    Raises:
        UserError: malformed matrix, k out of range, unknown names, fewer than k qualifying models
            (the message lists which constraint removed which), an unmeetable parameter budget.

    Example:
        >>> import pandas as pd
        >>> T = pd.DataFrame([[1, .1, .9], [.2, 1, .3], [.8, .4, 1]], index=list("abc"), columns=list("abc"))
        >>> select_teachers(T, k=2, top=1).best.teachers
        ('a', 'b')
    """
    obj = _coerce(Objective, objective, "objective")
    rule = _coerce(PairRule, pair, "pair")
    prep = _prepare(matrix, k, obj, rule, top, bool(worst), min_clean_acc, min_robust_acc, require, exclude,
                    max_params, models)
    if not family_only:
        res = _search_for(prep, prep.cands, int(k), int(top), enumeration_limit, clique_limit)
        rec = _recommendation(prep, res, int(k), obj, rule, bool(worst), False, prep.excluded)
    else:
        per, extra = _per_family(prep, int(k), int(top), enumeration_limit, clique_limit)
        merged = prep.pool.rank([c for r in per.values() for c in r.sets], int(top))
        res = _Result(merged, all(r.exact for r in per.values()), all(r.best_score_exact for r in per.values()),
                      "+".join(sorted({r.method for r in per.values()})))
        rec = _recommendation(prep, res, int(k), obj, rule, bool(worst), True, {**prep.excluded, **extra})
    logger.info(rec.summary())
    return rec


def _per_family(prep: _Prepared, k: int, top: int, enumeration_limit: int,
                clique_limit: int) -> tuple[dict[str, _Result], dict[str, str]]:
    groups, extra = _families(prep, k)
    out: dict[str, _Result] = {}
    for fam, members in sorted(groups.items()):
        res = _search_for(prep, members, k, top, enumeration_limit, clique_limit, check_budget=False)
        if res is None or not res.sets:
            logger.info("family %s: no set of k=%d fits the parameter budget", fam, k)
            continue
        out[fam] = res
    if not out:
        raise UserError(f"--family-only: no family has a set of k={k} within --max-params "
                        f"{_fmt_params(prep.budget or 0)}")
    return out, extra


def select_teachers_by_family(
    matrix: pd.DataFrame | str | os.PathLike,
    k: int,
    objective: Objective | str = "minimax",
    pair: PairRule | str = "max",
    top: int = 1,
    worst: bool = False,
    min_clean_acc: float | None = None,
    min_robust_acc: float | None = None,
    require: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    max_params: float | None = None,
    models: pd.DataFrame | None = None,
    enumeration_limit: int = DEFAULT_ENUMERATION_LIMIT,
    clique_limit: int = DEFAULT_CLIQUE_LIMIT,
) -> dict[str, Recommendation]:
    """The best set(s) inside each family separately: the homogeneous baselines of a study.

    Same arguments as :func:`select_teachers`; families with fewer than k qualifying models (or no
    set within the budget) are left out.

    Returns:
        family -> :class:`Recommendation` restricted to that family.

    Example:
        >>> import pandas as pd
        >>> T = pd.DataFrame(0.5, index=list("abcd"), columns=list("abcd"))
        >>> models = pd.DataFrame({"model": list("abcd"), "family": ["cnn", "cnn", "vit", "vit"]})
        >>> {f: r.best.teachers for f, r in select_teachers_by_family(T, 2, models=models).items()}
        {'cnn': ('a', 'b'), 'vit': ('c', 'd')}
    """
    obj = _coerce(Objective, objective, "objective")
    rule = _coerce(PairRule, pair, "pair")
    prep = _prepare(matrix, k, obj, rule, top, bool(worst), min_clean_acc, min_robust_acc, require, exclude,
                    max_params, models)
    per, extra = _per_family(prep, int(k), int(top), enumeration_limit, clique_limit)
    out: dict[str, Recommendation] = {}
    for fam, res in per.items():
        excl = {**prep.excluded, **extra}
        excl.update({n: f"family {prep.pool.family[i]} (not {fam})" for i, n in enumerate(prep.pool.names)
                     if n not in excl and prep.pool.family[i] != fam})
        out[fam] = _recommendation(prep, res, int(k), obj, rule, bool(worst), True, excl)
        logger.info("family %s: %s", fam, out[fam].summary())
    return out


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def write_recommendation(rec: Recommendation, path: str | os.PathLike, graph: nx.Graph | None = None,
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
    from .files import atomic_write, atomic_write_json

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name such as {path / 'rec.json'}")
    png = path.with_suffix(".png")
    if png == path:
        raise UserError(f"--out {path} must not end in .png (the graph plot is written beside it as .png)")
    data = {**(dict(extra) if extra else {}), **rec.to_dict()}
    blob = None
    if plot:
        if graph is None:
            raise ValueError("write_recommendation(plot=True) needs the transfer graph")
        from .graph_plot import render_transfer_graph

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

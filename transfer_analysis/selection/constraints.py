"""What a recommendation is asked for (:class:`SelectionRequest`), and the pool it leaves.

Every constraint is checked here once, for both entry points (:func:`~.search.select_teachers` and
:func:`~.search.select_teachers_by_family`): a model that does not qualify is listed with the
reason, so "only 2 of 6 models qualify" always says which constraint removed which model.

Example:
    >>> req = SelectionRequest(k=2, objective="mean", require="a, b")
    >>> req.objective, req.required_names()
    (<Objective.MEAN: 'mean'>, ['a', 'b'])
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UserError
from .cliques import _Pool, _Search
from .graph import pair_scores
from .matrix_io import _attributes, read_matrix, validate_matrix
from .results import DEFAULT_CLIQUE_LIMIT, DEFAULT_ENUMERATION_LIMIT, Objective, PairRule, _coerce

__all__ = ["SelectionRequest", "request_from"]


def _names_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    return list(dict.fromkeys(s.strip() for s in items if s.strip()))


def _fmt_params(x: float) -> str:
    return f"{x:.4g}"


@dataclass(frozen=True)
class SelectionRequest:
    """One teacher-set request: the set size, the objective, and every constraint.

    Attributes:
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
        enumeration_limit: enumerate every subset while there are at most this many.
        clique_limit: most k-cliques collected at one threshold (minimax on large pools).
    """

    k: int
    objective: Objective | str = Objective.MINIMAX
    pair: PairRule | str = PairRule.MAX
    top: int = 5
    worst: bool = False
    min_clean_acc: float | None = None
    min_robust_acc: float | None = None
    require: str | Iterable[str] | None = None
    exclude: str | Iterable[str] | None = None
    max_params: float | None = None
    family_only: bool = False
    enumeration_limit: int = DEFAULT_ENUMERATION_LIMIT
    clique_limit: int = DEFAULT_CLIQUE_LIMIT

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "objective", _coerce(Objective, self.objective, "objective"))
        set_(self, "pair", _coerce(PairRule, self.pair, "pair"))
        for name in ("k", "top"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise UserError(f"`{name}` must be an integer, got {v!r}")
            set_(self, name, int(v))
        if self.k < 2:
            raise UserError(f"`k` must be at least 2 (a set needs a pair to score), got {self.k}")
        if self.top < 1:
            raise UserError(f"`top` must be a positive integer, got {self.top!r}")
        for name in ("min_clean_acc", "min_robust_acc"):
            v = getattr(self, name)
            if v is not None and not (0.0 <= float(v) <= 1.0):
                raise UserError(f"`{name}` must be a fraction in [0, 1], got {v}")
        if self.max_params is not None and not (float(self.max_params) > 0 and math.isfinite(float(self.max_params))):
            raise UserError(f"`max_params` must be a positive number, got {self.max_params}")
        set_(self, "worst", bool(self.worst))
        set_(self, "family_only", bool(self.family_only))

    def required_names(self) -> list[str]:
        """``require`` as a list of names (order kept, duplicates dropped)."""
        return _names_list(self.require)

    def excluded_names(self) -> list[str]:
        """``exclude`` as a list of names."""
        return _names_list(self.exclude)


#: the request's fields, in order (k first): the options the entry points take
_FIELDS = [f.name for f in fields(SelectionRequest)]


def request_from(k: int | SelectionRequest, options: Mapping[str, Any], caller: str) -> SelectionRequest:
    """The :class:`SelectionRequest` of an entry point's arguments: ``k`` and keyword options
    (the request's fields), or a request (the options then replace its fields)."""
    unknown = [name for name in options if name not in _FIELDS or name == "k"]
    if unknown:
        raise TypeError(f"{caller}() got unexpected option(s) {', '.join(map(repr, unknown))}; "
                        f"the options are the fields of SelectionRequest: {', '.join(_FIELDS[1:])}")
    if isinstance(k, SelectionRequest):
        return replace(k, **options) if options else k
    return SelectionRequest(k=k, **options)


@dataclass
class _Prepared:
    pool: _Pool
    cands: list[int]
    required: list[int]
    excluded: dict[str, str]
    constraints: dict[str, Any]
    budget: float | None


def _why_excluded(req: SelectionRequest, pool: _Pool, i: int, excluded_names: set[str]) -> str | None:
    """Why model ``i`` does not qualify under ``req`` (None when it does)."""
    n, lo_clean, lo_rob = pool.names[i], req.min_clean_acc, req.min_robust_acc
    budget = None if req.max_params is None else float(req.max_params)
    if n in excluded_names:
        return "excluded by `exclude`"
    if lo_clean is not None and math.isnan(pool.clean[i]):
        return "clean_acc unknown (`min_clean_acc` needs models.csv)"
    if lo_clean is not None and pool.clean[i] < lo_clean:
        return f"clean_acc {pool.clean[i]:.4g} < `min_clean_acc` {lo_clean:g}"
    if lo_rob is not None and math.isnan(pool.robust[i]):
        return "whitebox_robust_acc unknown (`min_robust_acc` needs models.csv)"
    if lo_rob is not None and pool.robust[i] < lo_rob:
        return f"robust_acc {pool.robust[i]:.4g} < `min_robust_acc` {lo_rob:g}"
    if budget is not None and math.isnan(pool.params[i]):
        return "params unknown (`max_params` needs models.csv)"
    if budget is not None and pool.params[i] > budget:
        return f"params {_fmt_params(pool.params[i])} > `max_params` {_fmt_params(budget)}"
    return None


def _build_pool(matrix: pd.DataFrame, req: SelectionRequest, models: pd.DataFrame | None) -> _Pool:
    names = sorted(matrix.index)
    m = matrix.loc[names, names]
    attrs = _attributes(names, models)
    # the one pair-score rule (an empty direction defers to the other), shared with the graph and the JSON
    S = pair_scores(m, req.pair).to_numpy(dtype=float, copy=True)
    np.fill_diagonal(S, 0.0)

    def col(key: str) -> np.ndarray:
        return np.asarray([math.nan if attrs[n][key] is None else attrs[n][key] for n in names], dtype=float)

    return _Pool(names=names, T=m.to_numpy(dtype=float), S=S, robust=col("robust_acc"), clean=col("clean_acc"),
                 params=col("params"), family=[attrs[n]["family"] for n in names], objective=req.objective,
                 worst=req.worst)


def prepare(matrix: pd.DataFrame | str | os.PathLike, req: SelectionRequest,
            models: pd.DataFrame | None = None) -> _Prepared:
    """The pool of ``matrix`` under ``req``: candidates, required models, and why the rest do not qualify."""
    if isinstance(matrix, (str, os.PathLike)):
        matrix, found = read_matrix(matrix)
        models = found if models is None else models
    m = validate_matrix(matrix)
    k, n_all = req.k, len(m)
    if k > n_all:
        raise UserError(f"k={k} is larger than the pool: the matrix has {n_all} models; choose `k` <= {n_all}")
    pool = _build_pool(m, req, models)
    names = pool.names
    req_names, exc_names = req.required_names(), req.excluded_names()
    known = set(names)
    for what, lst in (("require", req_names), ("exclude", exc_names)):
        unknown = [x for x in lst if x not in known]
        if unknown:
            raise UserError(f"`{what}`: unknown model(s) {', '.join(unknown)}; the matrix has "
                            f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    both = sorted(set(req_names) & set(exc_names))
    if both:
        raise UserError(f"{', '.join(both)} both required and excluded; drop one of `require`/`exclude`")
    if len(req_names) > k:
        raise UserError(f"`require` names {len(req_names)} models but k={k}; raise `k` or require fewer")
    excluded = {n: why for i, n in enumerate(names)
                if (why := _why_excluded(req, pool, i, set(exc_names))) is not None}
    bad_req = [f"{r} ({excluded[r]})" for r in req_names if r in excluded]
    if bad_req:
        raise UserError(f"required model does not qualify: {'; '.join(bad_req)}")
    budget = None if req.max_params is None else float(req.max_params)
    constraints = {"min_clean_acc": None if req.min_clean_acc is None else float(req.min_clean_acc),
                   "min_robust_acc": None if req.min_robust_acc is None else float(req.min_robust_acc),
                   "require": sorted(req_names), "exclude": sorted(exc_names),
                   "max_params": None if budget is None else (int(budget) if budget.is_integer() else budget)}
    cands = [i for i, n in enumerate(names) if n not in excluded]
    _check_enough(len(cands), k, n_all, excluded)
    return _Prepared(pool, cands, [names.index(r) for r in req_names], excluded, constraints, budget)
def _check_enough(n_ok: int, k: int, n_all: int, excluded: Mapping[str, str], what: str = "") -> None:
    if n_ok >= k:
        return
    reasons = [f"{n}: {why}" for n, why in excluded.items()]
    shown = "; ".join(reasons[:8]) + (f"; and {len(reasons) - 8} more" if len(reasons) > 8 else "")
    raise UserError(f"only {n_ok} of {n_all} models qualify{what}, fewer than k={k} (excluded {shown}); "
                    "relax the constraints or lower `k`")


def _check_budget(search: _Search, pool: _Pool, budget: float | None) -> None:
    if budget is None:
        return
    cheapest = search.cheapest_completion(search.required)
    if cheapest > budget:
        raise UserError(f"no set of k={search.k} fits `max_params` {_fmt_params(budget)}: the cheapest qualifying "
                        f"set{' with the required models' if search.required else ''} totals "
                        f"{_fmt_params(cheapest)} parameters; raise the budget or lower `k`")


def _families(prep: _Prepared, k: int) -> tuple[dict[str, list[int]], dict[str, str]]:
    pool = prep.pool
    if all(f is None for f in pool.family):
        raise UserError("`family_only` needs a 'family' column in models.csv beside the matrix")
    extra: dict[str, str] = {}
    groups: dict[str, list[int]] = {}
    for i in prep.cands:
        f = pool.family[i]
        if f is None:
            extra[pool.names[i]] = "family unknown (`family_only`)"
        else:
            groups.setdefault(f, []).append(i)
    req_f = {pool.family[r] for r in prep.required}
    if None in req_f:
        raise UserError("`family_only`: a required model has no family in models.csv")
    if len(req_f) > 1:
        raise UserError(f"`family_only`: the required models span families {', '.join(sorted(req_f))}")
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
        raise UserError(f"`family_only`: no family has k={k} qualifying models (qualifying per family: {counts})")
    return ok, extra



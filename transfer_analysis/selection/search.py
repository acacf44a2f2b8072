"""The entry points: :func:`select_teachers` (the k teachers whose adversarial examples transfer
least among one another) and :func:`select_teachers_by_family` (the best set inside each family).

Both take a :class:`~.constraints.SelectionRequest`, or ``k`` and the request's fields as keyword
options.

Example:
    >>> import pandas as pd
    >>> T = pd.DataFrame([[1, .1, .9], [.2, 1, .3], [.8, .4, 1]], index=list("abc"), columns=list("abc"))
    >>> select_teachers(T, k=2, top=1).best.teachers
    ('a', 'b')
    >>> select_teachers(T, SelectionRequest(k=2, objective="mean")).best.teachers
    ('a', 'b')
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..errors import UserError
from .cliques import _Result, _Search
from .constraints import SelectionRequest, _check_budget, _families, _fmt_params, _Prepared, prepare, request_from
from .results import Recommendation

__all__ = ["select_teachers", "select_teachers_by_family"]

logger = logging.getLogger("transfer_analysis.selection")


def _search_for(prep: _Prepared, req: SelectionRequest, cands: Sequence[int],
                check_budget: bool = True) -> _Result | None:
    s = _Search(prep.pool, cands, prep.required, req.k, req.top, prep.budget, req.enumeration_limit,
                req.clique_limit)
    if check_budget:
        _check_budget(s, prep.pool, prep.budget)
    elif prep.budget is not None and s.cheapest_completion(s.required) > prep.budget:
        return None
    return s.run()


def _recommendation(prep: _Prepared, req: SelectionRequest, res: _Result, family_only: bool,
                    excluded: Mapping[str, str]) -> Recommendation:
    pool = prep.pool
    if not res.sets:  # the pre-checks should make this unreachable; never return an empty ranking
        raise UserError(f"no set of k={req.k} satisfies the constraints; relax them or lower `k`")
    excl = dict(sorted(excluded.items()))
    return Recommendation(objective=req.objective, pair=req.pair, k=req.k, exact=res.exact,
                          best_score_exact=res.best_score_exact, method=res.method,
                          sets=[pool.teacher_set(c) for c in res.sets], worst=req.worst, family_only=family_only,
                          constraints=dict(prep.constraints), excluded=excl,
                          candidates=[n for n in pool.names if n not in excl], n_models=len(pool.names))


def select_teachers(matrix: pd.DataFrame | str | os.PathLike, k: int | SelectionRequest, *,
                    models: pd.DataFrame | None = None, **options: Any) -> Recommendation:
    """Recommend the k teachers whose adversarial examples transfer least among one another.

    Args:
        matrix: transfer matrix (index = sources, columns = targets), or a path for
            :func:`~.matrix_io.read_matrix` (then ``models.csv`` beside it is used unless ``models``
            is given).
        k: the set size, or a whole :class:`~.constraints.SelectionRequest`.
        models: the ``models.csv`` table (``model, clean_acc, whitebox_robust_acc, params[, family]``).
        **options: the request's other fields (``objective``, ``pair``, ``top`` (5), ``worst``,
            ``min_clean_acc``, ``min_robust_acc``, ``require``, ``exclude``, ``max_params``,
            ``family_only``, ``enumeration_limit``, ``clique_limit``); see
            :class:`~.constraints.SelectionRequest`.

    Returns:
        A :class:`~.results.Recommendation`; ``.sets`` best first, ``.exact`` says whether the
        ranking is proven.

    Raises:
        UserError: malformed matrix, k out of range, unknown names, fewer than k qualifying models
            (the message lists which constraint removed which), an unmeetable parameter budget.

    Example:
        >>> import pandas as pd
        >>> T = pd.DataFrame(0.5, index=list("abcd"), columns=list("abcd"))
        >>> select_teachers(T, k=3, exclude="a", top=1).best.teachers
        ('b', 'c', 'd')
    """
    req = request_from(k, options, "select_teachers")
    prep = prepare(matrix, req, models)
    if not req.family_only:
        res = _search_for(prep, req, prep.cands)
        rec = _recommendation(prep, req, res, False, prep.excluded)
    else:
        per, extra = _per_family(prep, req)
        merged = prep.pool.rank([c for r in per.values() for c in r.sets], req.top)
        res = _Result(merged, all(r.exact for r in per.values()), all(r.best_score_exact for r in per.values()),
                      "+".join(sorted({r.method for r in per.values()})))
        rec = _recommendation(prep, req, res, True, {**prep.excluded, **extra})
    logger.info(rec.summary())
    return rec


def _per_family(prep: _Prepared, req: SelectionRequest) -> tuple[dict[str, _Result], dict[str, str]]:
    groups, extra = _families(prep, req.k)
    out: dict[str, _Result] = {}
    for fam, members in sorted(groups.items()):
        res = _search_for(prep, req, members, check_budget=False)
        if res is None or not res.sets:
            logger.info("family %s: no set of k=%d fits the parameter budget", fam, req.k)
            continue
        out[fam] = res
    if not out:
        raise UserError(f"`family_only`: no family has a set of k={req.k} within `max_params` "
                        f"{_fmt_params(prep.budget or 0)}")
    return out, extra


def select_teachers_by_family(matrix: pd.DataFrame | str | os.PathLike, k: int | SelectionRequest, *,
                              models: pd.DataFrame | None = None, **options: Any) -> dict[str, Recommendation]:
    """The best set(s) inside each family separately: the homogeneous baselines of a study.

    Same arguments as :func:`select_teachers` (``top`` defaults to 1 here, and ``family_only`` is
    implied); families with fewer than k qualifying models (or no set within the budget) are left out.

    Returns:
        family -> :class:`~.results.Recommendation` restricted to that family.

    Example:
        >>> import pandas as pd
        >>> T = pd.DataFrame(0.5, index=list("abcd"), columns=list("abcd"))
        >>> models = pd.DataFrame({"model": list("abcd"), "family": ["cnn", "cnn", "vit", "vit"]})
        >>> {f: r.best.teachers for f, r in select_teachers_by_family(T, 2, models=models).items()}
        {'cnn': ('a', 'b'), 'vit': ('c', 'd')}
    """
    if not isinstance(k, SelectionRequest):
        options = {"top": 1, **options}
    req = request_from(k, options, "select_teachers_by_family")
    prep = prepare(matrix, req, models)
    per, extra = _per_family(prep, req)
    out: dict[str, Recommendation] = {}
    for fam, res in per.items():
        excl = {**prep.excluded, **extra}
        excl.update({n: f"family {prep.pool.family[i]} (not {fam})" for i, n in enumerate(prep.pool.names)
                     if n not in excl and prep.pool.family[i] != fam})
        out[fam] = _recommendation(prep, req, res, True, excl)
        logger.info("family %s: %s", fam, out[fam].summary())
    return out

"""Teacher sets drawn over the whole range of set scores (for studies of the transferability claim).

A study that asks "do low-transfer teacher sets give more robust students?" needs many sets whose
scores cover the range from the lowest to the highest, not just the two ends. :func:`sample_teacher_sets`
enumerates every k-subset of the pool, scores each with the one pair-score rule
(:func:`transfer_analysis.selection.pair_scores`: worst pair ``max_pair`` and average pair
``mean_pair``), cuts ``[min, max]`` of the max-pair score into ``n_sets`` equal-width strata and draws
one set uniformly from each non-empty stratum (seeded). When some strata are empty, the remaining
draws come, one at a time, from the stratum with the most sets not yet drawn (ties: the lower
stratum), so the sample always has ``n_sets`` distinct sets and still spans the range.

Example:
    >>> import pandas as pd
    >>> T = pd.DataFrame([[1, .1, .5, .9], [.1, 1, .3, .2], [.5, .3, 1, .7], [.9, .2, .7, 1]],
    ...                  index=list("abcd"), columns=list("abcd"))
    >>> [s.teachers for s in sample_teacher_sets(T, k=2, n_sets=3, seed=0)]
    [('b', 'c'), ('a', 'c'), ('a', 'd')]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from transfer_analysis.errors import UserError
from transfer_analysis.selection import pair_scores

__all__ = ["ScoredSet", "score_teacher_set", "sample_teacher_sets", "MAX_SAMPLING_SETS"]

#: most k-subsets enumerated (C(N, k)); larger pools are refused rather than sampled badly.
MAX_SAMPLING_SETS = 2_000_000


@dataclass(frozen=True)
class ScoredSet:
    """A teacher set with its pair scores: ``max_pair`` (worst pair) and ``mean_pair`` (average pair)."""

    teachers: tuple[str, ...]
    max_pair: float
    mean_pair: float
    stratum: int = -1

    def to_dict(self) -> dict[str, object]:
        """Plain data (JSON-ready)."""
        return {"teachers": list(self.teachers), "max_pair": self.max_pair, "mean_pair": self.mean_pair,
                "stratum": self.stratum}


def score_teacher_set(scores: pd.DataFrame, teachers: Sequence[str]) -> tuple[float, float]:
    """``(max_pair, mean_pair)`` of a set, from a pair-score table (:func:`pair_scores`).

    Pairs whose score is unknown (both directions empty) are left out; a set with no known pair
    scores NaN.

    Example:
        >>> T = pd.DataFrame([[1, .2, .4], [.6, 1, .1], [.4, .3, 1]], index=list("abc"), columns=list("abc"))
        >>> [round(v, 4) for v in score_teacher_set(pair_scores(T), ["a", "b", "c"])]
        [0.6, 0.4333]
    """
    vals = [float(scores.loc[a, b]) for a, b in itertools.combinations(teachers, 2)]
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return max(vals), sum(vals) / len(vals)


def sample_teacher_sets(matrix: pd.DataFrame, k: int, n_sets: int, *, seed: int = 0, pair: str = "max",
                        exclude_sets: Iterable[Sequence[str]] = (), models: Sequence[str] | None = None
                        ) -> list[ScoredSet]:
    """``n_sets`` distinct k-sets spread over the range of max-pair scores, lowest stratum first.

    Args:
        matrix: the transfer matrix (sources x targets).
        k: set size (2 <= k <= number of models).
        n_sets: how many sets to draw.
        seed: the draw's seed (same inputs and seed, same sets).
        pair: ``max`` or ``mean`` of the two transfer directions (as in :func:`pair_scores`).
        exclude_sets: sets never drawn (for example the named low- and high-transfer sets of a study).
        models: restrict the sets to these models (default: every model of the matrix).

    Returns:
        :class:`ScoredSet` objects (teachers sorted by name), ordered by stratum, then score.

    Raises:
        UserError: k or n_sets out of range, fewer candidate sets than ``n_sets``, too many subsets.
    """
    scores = pair_scores(matrix, pair)
    names = sorted(scores.index) if models is None else sorted(models)
    unknown = [m for m in names if m not in scores.index]
    if unknown:
        raise UserError(f"models not in the matrix: {', '.join(unknown)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 2 <= k <= len(names):
        raise UserError(f"k must be an integer between 2 and the number of models ({len(names)}), got {k!r}")
    if isinstance(n_sets, bool) or not isinstance(n_sets, (int, np.integer)) or n_sets < 1:
        raise UserError(f"n_sets must be a positive integer, got {n_sets!r}")
    if math.comb(len(names), k) > MAX_SAMPLING_SETS:
        raise UserError(f"C({len(names)}, {k}) = {math.comb(len(names), k)} sets is more than the "
                        f"{MAX_SAMPLING_SETS} that sampling enumerates; restrict the models")
    skip = {tuple(sorted(s)) for s in exclude_sets}
    cands = []
    for combo in itertools.combinations(names, k):
        if combo in skip:
            continue
        mx, mn = score_teacher_set(scores, combo)
        if not math.isnan(mx):
            cands.append((mx, mn, combo))
    if len(cands) < n_sets:
        raise UserError(f"only {len(cands)} scored sets of {k} teachers remain (after {len(skip)} excluded); "
                        f"cannot draw n_sets = {n_sets}")
    cands.sort(key=lambda c: (c[0], c[1], c[2]))
    lo, hi = cands[0][0], cands[-1][0]
    width = (hi - lo) / n_sets
    strata: list[list[int]] = [[] for _ in range(n_sets)]
    for i, (mx, _, _) in enumerate(cands):
        j = 0 if width == 0 else min(int((mx - lo) / width), n_sets - 1)
        strata[j].append(i)
    rng = np.random.default_rng(seed)
    chosen: dict[int, int] = {}  # candidate index -> stratum
    for j, members in enumerate(strata):
        if members:
            pick = members[int(rng.integers(len(members)))]
            chosen[pick] = j
    while len(chosen) < n_sets:
        left = [[i for i in members if i not in chosen] for members in strata]
        j = max(range(n_sets), key=lambda s: (len(left[s]), -s))
        pick = left[j][int(rng.integers(len(left[j])))]
        chosen[pick] = j
    out = [ScoredSet(cands[i][2], float(cands[i][0]), float(cands[i][1]), j) for i, j in chosen.items()]
    return sorted(out, key=lambda s: (s.stratum, s.max_pair, s.mean_pair, s.teachers))

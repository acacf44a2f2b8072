"""Teacher-set recommendation: the transferability graph and the search for low-transfer sets.

Modules: :mod:`.matrix_io` (reading ``transfer_matrix.csv`` and ``models.csv``), :mod:`.graph`
(the one pair-score rule and the graph), :mod:`.constraints` (:class:`SelectionRequest` and who
qualifies), :mod:`.cliques` (the search engine), :mod:`.search` (the entry points) and
:mod:`.results` (objectives, ranked sets, ``rec.json``).

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

from .constraints import SelectionRequest
from .graph import pair_scores, transfer_graph
from .matrix_io import read_matrix, read_models_csv, validate_matrix
from .results import (
    DEFAULT_CLIQUE_EFFORT,
    DEFAULT_CLIQUE_LIMIT,
    DEFAULT_ENUMERATION_LIMIT,
    Objective,
    PairRule,
    Recommendation,
    TeacherSet,
    write_recommendation,
)
from .search import select_teachers, select_teachers_by_family

__all__ = [
    "Objective",
    "PairRule",
    "TeacherSet",
    "Recommendation",
    "SelectionRequest",
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
    "DEFAULT_CLIQUE_EFFORT",
]

"""The transferability graph and the one pair-score rule: every consumer (the search, the graph
plot, the JSON, the sampled sets of a study) reads pair scores from :func:`pair_scores`.

Example:
    >>> import numpy as np, pandas as pd
    >>> T = pd.DataFrame([[1.0, np.nan], [0.5, 1.0]], index=["a", "b"], columns=["a", "b"])
    >>> float(pair_scores(T).loc["a", "b"])  # an empty direction defers to the other
    0.5
"""

from __future__ import annotations

from itertools import combinations

import networkx as nx
import numpy as np
import pandas as pd

from .matrix_io import _attributes, validate_matrix
from .results import PairRule, _coerce

__all__ = ["pair_scores", "transfer_graph"]


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

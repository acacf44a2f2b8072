"""The search engine behind :func:`~.search.select_teachers`: enumeration, the threshold-clique
search for minimax (exact for any pool), and local search for mean on pools too large to enumerate.

Internal: the public entry points are in :mod:`.search`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, combinations, islice

import numpy as np

from .results import (
    _ROUND,
    DEFAULT_CLIQUE_EFFORT,
    Objective,
    TeacherSet,
    _num,
)

logger = logging.getLogger("transfer_analysis.selection")

_CHUNK_ROWS = 1 << 18


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

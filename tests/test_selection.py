"""Teacher-set recommendation: exactness against brute force, constraints, approximate paths, I/O."""

from __future__ import annotations

import doctest
import json
import math
from itertools import combinations
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transfer_analysis import graph_plot, selection
from transfer_analysis.errors import UserError
from transfer_analysis.selection import (
    Objective,
    PairRule,
    pair_scores,
    read_matrix,
    select_teachers,
    select_teachers_by_family,
    transfer_graph,
    validate_matrix,
    write_recommendation,
)

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LETTERS = [c * 2 for c in "abcdefghijkl"]


# --------------------------------------------------------------------------------------------
# brute force: the reference every search is checked against
# --------------------------------------------------------------------------------------------
def brute(T, names, k, objective="minimax", pair="max", worst=False, robust=None, params=None,
          budget=None, require=(), allowed=None):
    """Every qualifying k-set, ranked by the documented key; [(names, max_pair, mean_pair)]."""
    n = len(names)
    S = np.maximum(T, T.T) if pair == "max" else (T + T.T) / 2
    robust = robust or [None] * n
    rows = []
    for c in combinations(range(n), k):
        nm = tuple(sorted(names[i] for i in c))
        if not set(require) <= set(nm) or (allowed is not None and not set(nm) <= set(allowed)):
            continue
        if budget is not None and sum(params[i] for i in c) > budget:
            continue
        ps = [S[a, b] for a, b in combinations(c, 2)]
        mx, mn = max(ps), sum(ps) / len(ps)
        rs = [robust[i] for i in c]
        rk = math.inf if any(r is None for r in rs) else -sum(rs) / k
        sg = -1 if worst else 1
        key = (sg * mx, sg * mn, rk, nm) if objective == "minimax" else (sg * mn, rk, nm)
        rows.append((key, nm, mx, mn))
    rows.sort()
    return [(nm, mx, mn) for _, nm, mx, mn in rows]


def frame(T, names):
    return pd.DataFrame(np.asarray(T, dtype=float), index=list(names), columns=list(names))


def models_table(names, robust=None, params=None, clean=None, family=None):
    n = len(names)
    d = {"model": list(names)}
    if robust is not None:
        d["whitebox_robust_acc"] = [np.nan if r is None else r for r in robust]
    if params is not None:
        d["params"] = params
    if clean is not None:
        d["clean_acc"] = clean
    if family is not None:
        d["family"] = family
    return pd.DataFrame(d) if n else None


@st.composite
def pools(draw, max_n=9, max_k=5):
    """A random pool: matrix on a 1/8 grid (exact sums, so ties are real ties), names, robust acc."""
    n = draw(st.integers(3, max_n))
    k = draw(st.integers(2, min(n, max_k)))
    names = draw(st.permutations(LETTERS))[:n]
    cells = draw(st.lists(st.integers(0, 8), min_size=n * n, max_size=n * n))
    T = np.asarray(cells, dtype=float).reshape(n, n) / 8
    robust = draw(st.lists(st.one_of(st.none(), st.integers(0, 4).map(lambda v: v / 4)), min_size=n, max_size=n))
    return names, T, k, robust


def listed(rec):
    return [(s.teachers, s.max_pair, s.mean_pair) for s in rec.sets]


def expected(rows, top=5):
    return [(nm, mx, pytest.approx(mn, abs=1e-12)) for nm, mx, mn in rows[:top]]


# --------------------------------------------------------------------------------------------
# exactness: enumeration, threshold-clique search
# --------------------------------------------------------------------------------------------
@PROPS
@given(pools(), st.sampled_from(["minimax", "mean"]), st.sampled_from(["max", "mean"]), st.booleans(),
       st.integers(1, 6))
def test_enumeration_matches_brute_force(pool, objective, pair, worst, top):
    names, T, k, robust = pool
    rec = select_teachers(frame(T, names), k, objective=objective, pair=pair, worst=worst, top=top,
                          models=models_table(names, robust))
    ref = brute(T, names, k, objective, pair, worst, robust)
    assert rec.exact and rec.best_score_exact and rec.method == "enumeration"
    assert listed(rec) == expected(ref, top)
    best = rec.best
    assert best.score == (best.max_pair if objective == "minimax" else best.mean_pair)


@PROPS
@given(pools(), st.sampled_from(["max", "mean"]), st.integers(1, 6))
def test_threshold_clique_search_matches_brute_force(pool, pair, top):
    names, T, k, robust = pool
    rec = select_teachers(frame(T, names), k, pair=pair, top=top, models=models_table(names, robust),
                          enumeration_limit=0)
    assert rec.method == "threshold-clique"
    assert rec.exact and rec.best_score_exact
    assert listed(rec) == expected(brute(T, names, k, "minimax", pair, False, robust), top)


@PROPS
@given(pools(max_n=8), st.data(), st.sampled_from(["minimax", "mean"]), st.booleans(), st.booleans())
def test_constraints_match_brute_force(pool, data, objective, worst, clique):
    names, T, k, robust = pool
    n = len(names)
    params = data.draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    budget = data.draw(st.one_of(st.none(), st.integers(2 * k, 7 * k)))
    require = data.draw(st.lists(st.sampled_from(names), max_size=min(2, k), unique=True))
    exclude = data.draw(st.lists(st.sampled_from([x for x in names if x not in require]), max_size=2, unique=True))
    allowed = [x for x in names if x not in exclude]
    ref = brute(T, names, k, objective, "max", worst, robust, params, budget, require, allowed)
    limit = 0 if (clique and objective == "minimax" and not worst) else 10**6
    kwargs = dict(objective=objective, worst=worst, top=4, require=require, exclude=exclude, max_params=budget,
                  models=models_table(names, robust, params), enumeration_limit=limit)
    if not ref:
        with pytest.raises(UserError):
            select_teachers(frame(T, names), k, **kwargs)
        return
    rec = select_teachers(frame(T, names), k, **kwargs)
    assert rec.exact
    assert listed(rec) == expected(ref, 4)
    for s in rec.sets:
        assert set(require) <= set(s.teachers) and not set(exclude) & set(s.teachers)
        if budget is not None:
            assert s.total_params <= budget


@pytest.mark.parametrize("seed", range(32))
def test_budget_binding_clique_search_matches_brute_force(seed):
    """The cheapest models transfer most: the parameter budget decides which sets are allowed."""
    rng = np.random.default_rng(seed)
    n, k = 9, (2 if seed % 3 == 0 else int(rng.integers(2, 5)))
    names = LETTERS[:n]
    params = [int(p) for p in rng.integers(1, 10, n)]
    T = np.clip(rng.integers(0, 9, (n, n)) / 8 + 0.5 * (np.asarray(params) < 5)[:, None], 0, 1)
    require = [names[int(np.argmin(params))]] if seed % 2 else []  # k=2 with one required: one free slot
    budget = int(sum(sorted(params)[:k]) + rng.integers(0, 2 * k))
    ref = brute(T, names, k, params=params, budget=budget, require=require)
    rec = select_teachers(frame(T, names), k, max_params=budget, top=4, enumeration_limit=0, require=require,
                          models=models_table(names, params=params))
    assert rec.exact and rec.method == "threshold-clique"
    assert listed(rec) == expected(ref, 4)


# --------------------------------------------------------------------------------------------
# approximate paths
# --------------------------------------------------------------------------------------------
@PROPS
@given(pools(max_n=9), st.booleans())
def test_local_search_mean_is_valid_and_says_approximate(pool, worst):
    names, T, k, robust = pool
    rec = select_teachers(frame(T, names), k, objective="mean", worst=worst, top=3,
                          models=models_table(names, robust), enumeration_limit=0)
    assert rec.exact is False and rec.best_score_exact is False and rec.method == "local-search"
    ref = brute(T, names, k, "mean", "max", worst, robust)
    by_names = {nm: (mx, mn) for nm, mx, mn in ref}
    assert 1 <= len(rec.sets) <= 3 and len({s.teachers for s in rec.sets}) == len(rec.sets)
    for s in rec.sets:  # real sets, honestly scored
        assert len(s.teachers) == k and s.teachers in by_names
        assert s.max_pair == by_names[s.teachers][0]
        assert s.mean_pair == pytest.approx(by_names[s.teachers][1], abs=1e-12)
    best_possible = ref[0][2]
    assert (rec.best.mean_pair <= best_possible + 1e-12) if worst else (rec.best.mean_pair >= best_possible - 1e-12)
    keys = [s.mean_pair for s in rec.sets]
    assert keys == sorted(keys, reverse=worst)


@PROPS
@given(pools(max_n=9))
def test_worst_minimax_approximate_still_finds_highest_pair(pool):
    names, T, k, robust = pool
    rec = select_teachers(frame(T, names), k, worst=True, models=models_table(names, robust), enumeration_limit=0)
    assert rec.exact is False and rec.best_score_exact is True
    assert rec.best.max_pair == brute(T, names, k, "minimax", "max", True, robust)[0][1]


def planted(n=30, k=4, seed=0):
    """Random transfer in [0.5, 1]; a planted k-set with pair scores 0.1 (the unique optimum)."""
    rng = np.random.default_rng(seed)
    T = rng.uniform(0.5, 1.0, (n, n))
    members = [int(i) for i in np.linspace(1, n - 1, k).round()]
    for a, b in combinations(members, 2):
        T[a, b] = T[b, a] = 0.1
    names = [f"m{i:02d}" for i in range(n)]
    return frame(T, names), tuple(names[i] for i in members)


def test_local_search_finds_a_planted_optimum():
    m, want = planted()
    assert want == ("m01", "m10", "m20", "m29")
    rec = select_teachers(m, 4, objective="mean", enumeration_limit=1000)
    assert rec.exact is False and rec.best.teachers == want and rec.best.mean_pair == pytest.approx(0.1)


def test_local_search_honours_budget_and_require():
    m, planted_set = planted()
    names = list(m.index)
    params = [50 if n in planted_set else 10 for n in names]  # the planted optimum is over budget
    for objective, worst in (("mean", False), ("mean", True), ("minimax", True)):
        rec = select_teachers(m, 4, objective=objective, worst=worst, max_params=100, require="m05",
                              models=models_table(names, params=params), enumeration_limit=100)
        assert rec.exact is False and len(rec.sets) == 5
        for s in rec.sets:
            assert s.total_params <= 100 and "m05" in s.teachers and len(set(s.teachers)) == 4
            assert sum(n in planted_set for n in s.teachers) <= 1


def test_clique_overflow_keeps_the_optimal_score_but_says_not_exact():
    names = [f"m{i}" for i in range(8)]
    rec = select_teachers(frame(np.full((8, 8), 0.5), names), 3, enumeration_limit=0, clique_limit=2, top=2)
    assert rec.exact is False and rec.best_score_exact is True
    assert rec.best.max_pair == 0.5 and rec.best.teachers == ("m0", "m1", "m2")


def test_clique_effort_limit_gives_a_valid_set_and_says_not_exact(monkeypatch):
    monkeypatch.setattr(selection.cliques, "DEFAULT_CLIQUE_EFFORT", 1)  # the engine reads it
    m, want = planted(n=12, k=4)
    rec = select_teachers(m, 4, enumeration_limit=0)
    assert rec.exact is False and rec.best_score_exact is False
    assert len(rec.best.teachers) == 4 and len(set(rec.best.teachers)) == 4


def test_large_pools_run():
    """Sanity (no timing asserted): 40 models k=4 exact; 200 models k=5 exact minimax, approximate mean."""
    rng = np.random.default_rng(1)
    names = [f"m{i:03d}" for i in range(200)]
    big = frame(rng.uniform(0, 1, (200, 200)), names)
    small = big.iloc[:40, :40]
    r40 = select_teachers(small, 4)
    assert r40.exact and r40.method == "enumeration" and len(r40.sets) == 5
    r200 = select_teachers(big, 5)
    assert r200.exact and r200.method == "threshold-clique"
    # the optimum is proven: no 5-clique below it (checked independently with networkx)
    S = np.maximum(big.to_numpy(), big.to_numpy().T)
    below = S < r200.best.max_pair
    np.fill_diagonal(below, False)
    g = nx.from_numpy_array(below.astype(int))
    assert max(len(q) for q in nx.find_cliques(g)) < 5
    rmean = select_teachers(big, 5, objective="mean")
    assert rmean.exact is False and len(rmean.best.teachers) == 5


# --------------------------------------------------------------------------------------------
# exact values on a hand-made pool
# --------------------------------------------------------------------------------------------
NAMES = ["a", "b", "c", "d"]
T4 = [[1.0, 0.9, 0.1, 0.2],
      [0.8, 1.0, 0.3, 0.1],
      [0.2, 0.2, 1.0, 0.4],
      [0.1, 0.3, 0.5, 1.0]]


def test_hand_example_minimax_mean_and_pairs():
    rec = select_teachers(frame(T4, NAMES), 3)
    assert [s.teachers for s in rec.sets] == [("a", "c", "d"), ("b", "c", "d"), ("a", "b", "c"), ("a", "b", "d")]
    best = rec.best
    assert best.max_pair == 0.5 and best.mean_pair == pytest.approx(0.3) and best.score == 0.5
    assert [(p["a"], p["b"], p["score"], p["transfer_ab"], p["transfer_ba"]) for p in best.pairs] == [
        ("a", "c", 0.2, 0.1, 0.2), ("a", "d", 0.2, 0.2, 0.1), ("c", "d", 0.5, 0.4, 0.5)]
    mean = select_teachers(frame(T4, NAMES), 2, objective="mean", pair="mean", top=2)
    # pair means: ad 0.15, ac 0.15, bd 0.2, bc 0.25, cd 0.45, ab 0.85
    assert [s.teachers for s in mean.sets] == [("a", "c"), ("a", "d")]
    assert mean.best.score == pytest.approx(0.15)


def test_ties_go_to_higher_robust_accuracy_then_names():
    T = np.full((4, 4), 0.25)
    models = models_table(NAMES, robust=[0.1, 0.2, 0.4, 0.3])
    rec = select_teachers(frame(T, NAMES), 2, models=models, top=6)
    assert [s.teachers for s in rec.sets] == [("c", "d"), ("b", "c"), ("a", "c"), ("b", "d"), ("a", "d"), ("a", "b")]
    assert rec.best.mean_robust_acc == pytest.approx(0.35)
    # unknown robust accuracy ranks last among ties; the rest alphabetical
    rec = select_teachers(frame(T, NAMES), 2, models=models_table(NAMES, robust=[None, 0.5, 0.5, 0.5]), top=4)
    assert [s.teachers for s in rec.sets] == [("b", "c"), ("b", "d"), ("c", "d"), ("a", "b")]
    assert rec.sets[3].mean_robust_acc is None


def test_enums_accept_strings_and_reject_unknown():
    rec = select_teachers(frame(T4, NAMES), 2, objective=Objective.MEAN, pair=PairRule.MEAN)
    assert rec.objective is Objective.MEAN and rec.pair is PairRule.MEAN
    with pytest.raises(UserError, match="`objective` must be one of minimax, mean"):
        select_teachers(frame(T4, NAMES), 2, objective="median")
    with pytest.raises(UserError, match="`pair` must be one of max, mean"):
        select_teachers(frame(T4, NAMES), 2, pair="min")


# --------------------------------------------------------------------------------------------
# constraints
# --------------------------------------------------------------------------------------------
ATTR = models_table(NAMES, robust=[0.50, 0.40, 0.30, 0.45], params=[10, 20, 30, 40],
                    clean=[0.90, 0.80, 0.70, 0.95], family=["cnn", "cnn", "vit", "vit"])


def test_each_constraint_is_honoured():
    m = frame(T4, NAMES)
    assert select_teachers(m, 2, models=ATTR, min_clean_acc=0.85, top=10).candidates == ["a", "d"]
    rec = select_teachers(m, 2, models=ATTR, min_robust_acc=0.42, top=10)
    assert [s.teachers for s in rec.sets] == [("a", "d")]
    assert rec.excluded == {"b": "robust_acc 0.4 < `min_robust_acc` 0.42",
                            "c": "robust_acc 0.3 < `min_robust_acc` 0.42"}
    rec = select_teachers(m, 3, models=ATTR, require="b", top=10)
    # abc and abd tie on both scores: abd has the higher mean robust accuracy (0.45 vs 0.40)
    assert [s.teachers for s in rec.sets] == [("b", "c", "d"), ("a", "b", "d"), ("a", "b", "c")]
    rec = select_teachers(m, 3, models=ATTR, exclude=["a"], top=10)
    assert [s.teachers for s in rec.sets] == [("b", "c", "d")]
    rec = select_teachers(m, 3, models=ATTR, max_params=65, top=10)  # a+b+c=60 is the only fit
    assert [s.teachers for s in rec.sets] == [("a", "b", "c")] and rec.best.total_params == 60
    assert rec.constraints["max_params"] == 65


def test_too_few_qualifying_names_the_count_and_the_reasons():
    with pytest.raises(UserError) as err:
        select_teachers(frame(T4, NAMES), 3, models=ATTR, min_clean_acc=0.85, exclude="d")
    msg = str(err.value)
    assert "only 1 of 4 models qualify" in msg and "fewer than k=3" in msg
    assert "b: clean_acc 0.8 < `min_clean_acc` 0.85" in msg and "d: excluded by `exclude`" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("kwargs, match", [
    (dict(require="zz"), "`require`: unknown model"),
    (dict(exclude="zz"), "`exclude`: unknown model"),
    (dict(require="a", exclude="a"), "both required and excluded"),
    (dict(require="a,b,c"), "`require` names 3 models but k=2"),
    (dict(require="c", min_robust_acc=0.4), "required model does not qualify: c"),
    (dict(max_params=25), "no set of k=2 fits `max_params` 25"),
    (dict(min_clean_acc=1.5), "fraction in"),
    (dict(top=0), "`top` must be a positive integer"),
])
def test_constraint_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        select_teachers(frame(T4, NAMES), 2, models=ATTR, **kwargs)


def test_one_request_object_for_both_entry_points():
    """A SelectionRequest is what both entry points take; options are its fields."""
    from transfer_analysis.selection import SelectionRequest

    req = SelectionRequest(k=2, objective="mean", top=3)
    a = select_teachers(frame(T4, NAMES), req, models=ATTR)
    b = select_teachers(frame(T4, NAMES), 2, objective="mean", top=3, models=ATTR)
    assert a.to_dict() == b.to_dict()
    fam = select_teachers_by_family(frame(T4, NAMES), req, models=ATTR)
    assert {f: r.best.teachers for f, r in fam.items()} == {"cnn": ("a", "b"), "vit": ("c", "d")}
    assert select_teachers(frame(T4, NAMES), req, top=1, models=ATTR).sets == a.sets[:1]  # options replace fields
    with pytest.raises(TypeError, match="unexpected option.*'objectiv'.*fields of SelectionRequest"):
        select_teachers(frame(T4, NAMES), 2, objectiv="mean")


def test_unknown_attributes_do_not_qualify_for_their_constraint():
    with pytest.raises(UserError, match="clean_acc unknown"):
        select_teachers(frame(T4, NAMES), 2, min_clean_acc=0.1)


@pytest.mark.parametrize("k, match", [(0, "`k` must be at least 2"), (1, "`k` must be at least 2"),
                                      (5, "k=5 is larger than the pool: the matrix has 4 models")])
def test_k_out_of_range(k, match):
    with pytest.raises(UserError, match=match):
        select_teachers(frame(T4, NAMES), k)


def test_family_only_and_per_family():
    m = frame(T4, NAMES)
    rec = select_teachers(m, 2, models=ATTR, family_only=True, top=5)
    # cnn: ab 0.9; vit: cd 0.5
    assert [s.teachers for s in rec.sets] == [("c", "d"), ("a", "b")]
    assert [s.family for s in rec.sets] == ["vit", "cnn"] and rec.family_only
    worst = select_teachers(m, 2, models=ATTR, family_only=True, worst=True)
    assert worst.best.teachers == ("a", "b")
    per = select_teachers_by_family(m, 2, models=ATTR)
    assert {f: r.best.teachers for f, r in per.items()} == {"cnn": ("a", "b"), "vit": ("c", "d")}
    assert per["vit"].best.max_pair == 0.5
    with pytest.raises(UserError, match="no family has k=3 qualifying models"):
        select_teachers(m, 3, models=ATTR, family_only=True)
    with pytest.raises(UserError, match="needs a 'family' column"):
        select_teachers(m, 2, family_only=True)


# --------------------------------------------------------------------------------------------
# reading, graph, JSON, PNG
# --------------------------------------------------------------------------------------------
def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD = "source,a,b,c\na,1.0,0.2,0.3\nb,0.4,1.0,0.5\nc,0.6,0.7,1.0\n"


def test_read_matrix_dir_and_file_and_models(tmp_path):
    write_csv(tmp_path / "transfer_matrix.csv", "source,b,a,c\na,0.2,1.0,0.3\nb,1.0,0.4,0.5\nc,0.7,0.6,\n")
    write_csv(tmp_path / "models.csv", "model,clean_acc,whitebox_robust_acc,params,family\n"
                                       "a,0.9,0.4,100,cnn\nb,0.8,,200,\nc,0.7,0.3,300,vit\n")
    m, models = read_matrix(tmp_path)
    assert list(m.columns) == ["a", "b", "c"] and m.loc["a", "b"] == 0.2 and math.isnan(m.loc["c", "c"])
    m2, _ = read_matrix(tmp_path / "transfer_matrix.csv")
    assert m2.equals(m)
    g = transfer_graph(m, models)
    assert g.nodes["a"] == {"clean_acc": 0.9, "robust_acc": 0.4, "params": 100.0, "family": "cnn", "arch": None}
    assert g.nodes["b"]["robust_acc"] is None and g.nodes["b"]["family"] is None
    assert g.edges["a", "c"]["weight"] == 0.6 and g.edges["b", "c"]["transfer"][("c", "b")] == 0.7
    ps = pair_scores(m, "mean")
    assert ps.loc["a", "b"] == pytest.approx(0.3) and math.isnan(ps.loc["a", "a"])


@pytest.mark.parametrize("text, match", [
    ("source,a,b\na,1,0.2\n", "not square"),
    ("source,a,b\na,1,0.2\nc,0.1,1\n", "row and column names differ"),
    ("source,a,b\na,1,x\nb,0.1,1\n", "not a number"),
    ("source,a,b\na,1,\nb,,1\n", "both empty/NaN"),
    ("source,a,a\na,1,0.2\na,0.1,1\n", "duplicate"),
    ("source,a,\na,1,0.2\nb,0.1,1\n", "name missing"),
    ("source,a,b\n,1,0.2\nb,0.1,1\n", "name missing"),
    ("source,a,b\na,1,0.2,0.3\nb,0.1,1\n", "line 2: 4 cells, expected 3"),
    ("source,a,b\na,1,1.5\nb,0.1,1\n", "outside \\[0, 1\\]"),
    ("source,a,b\na,1,inf\nb,0.1,1\n", "not finite"),
    ("", "empty"),
    ("model,a,b\na,1,0.2\nb,0.1,1\n", "first column must be 'source'"),
])
def test_malformed_matrices(tmp_path, text, match):
    p = write_csv(tmp_path / "transfer_matrix.csv", text)
    with pytest.raises(UserError, match=match):
        read_matrix(p)


def test_malformed_models_csv_and_missing_matrix(tmp_path):
    write_csv(tmp_path / "transfer_matrix.csv", GOOD)
    write_csv(tmp_path / "models.csv", "model,clean_acc\na,high\n")
    with pytest.raises(UserError, match="clean_acc of a is 'high', not a number"):
        read_matrix(tmp_path)
    write_csv(tmp_path / "models.csv", "model,clean_acc\na,85\n")
    with pytest.raises(UserError, match="fractions in"):
        read_matrix(tmp_path)
    with pytest.raises(UserError, match="transfer matrix not found"):
        read_matrix(tmp_path / "nope")


def test_validate_matrix_dataframe():
    with pytest.raises(UserError, match="non-numeric"):
        validate_matrix(pd.DataFrame([["x", 0.1], [0.2, 1]], index=["a", "b"], columns=["a", "b"]))
    v = validate_matrix(pd.DataFrame([[0.2, 1.0], [1.0, 0.3]], index=["a", "b"], columns=["b", "a"]))
    assert v.loc["a", "b"] == 0.2 and list(v.columns) == ["a", "b"]


def test_json_and_png_written(tmp_path):
    m = frame(T4, NAMES)
    rec = select_teachers(m, 3, models=models_table(NAMES, robust=[0.5, None, 0.3, 0.4]), top=2)
    paths = write_recommendation(rec, tmp_path / "rec.json", graph=transfer_graph(m, ATTR), extra={"matrix": "x"})
    assert paths == [tmp_path / "rec.png", tmp_path / "rec.json"]
    assert (tmp_path / "rec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "rec.json").read_text())
    assert data["objective"] == "minimax" and data["pair"] == "max" and data["k"] == 3 and data["exact"] is True
    assert data["matrix"] == "x" and data["constraints"]["require"] == []
    s0, s1 = data["sets"]
    assert s0["teachers"] == ["a", "c", "d"] and s0["score"] == 0.5 and s0["max_pair"] == 0.5
    assert s0["mean_pair"] == pytest.approx(0.3) and s0["mean_robust_acc"] == pytest.approx(0.4)
    assert s1["teachers"] == ["b", "c", "d"] and s1["mean_robust_acc"] is None
    assert s0["pairs"][2] == {"a": "c", "b": "d", "score": 0.5, "transfer_ab": 0.4, "transfer_ba": 0.5}
    assert json.loads(rec.to_json()) == {k: v for k, v in data.items() if k != "matrix"}
    assert not list(tmp_path.glob(".*tmp"))


def test_doctests_run():
    for mod in (selection, graph_plot):
        res = doctest.testmod(mod)
        assert res.failed == 0 and res.attempted > 0


def test_an_empty_direction_defers_to_the_other():
    """A cell with nothing to count (NaN) uses the reverse direction for the pair score."""
    T = pd.DataFrame([[1.0, np.nan, 0.2], [0.5, 1.0, 0.4], [0.1, 0.3, 1.0]], index=list("abc"), columns=list("abc"))
    assert pair_scores(T, "max").loc["a", "b"] == 0.5 and pair_scores(T, "mean").loc["b", "a"] == 0.5
    assert pair_scores(T, "mean").loc["b", "c"] == pytest.approx(0.35)
    rec = select_teachers(T, k=2)
    assert list(rec.best.teachers) == ["a", "c"] and rec.best.max_pair == pytest.approx(0.2)


def test_nan_cell_ranking_is_the_same_in_the_search_the_graph_and_the_json(tmp_path):
    """The case that once broke the ranking: T[a,b] empty, T[b,a] = 0.5, {a,c} = 0.6, {b,c} = 0.7. The whole ranking of
    ``--k 2 --objective mean --top 3`` follows the one pair-score rule, as the graph and rec.json do."""
    T = pd.DataFrame([[1.0, np.nan, 0.6], [0.5, 1.0, 0.7], [0.6, 0.7, 1.0]], index=list("abc"), columns=list("abc"))
    for objective in ("mean", "minimax"):
        rec = select_teachers(T, k=2, objective=objective, top=3)
        assert [s.teachers for s in rec.sets] == [("a", "b"), ("a", "c"), ("b", "c")], objective
        assert [s.score for s in rec.sets] == pytest.approx([0.5, 0.6, 0.7])
    graph = transfer_graph(T)
    assert {tuple(sorted(e)): d["weight"] for *e, d in graph.edges(data=True)} == \
        pytest.approx({("a", "b"): 0.5, ("a", "c"): 0.6, ("b", "c"): 0.7})
    paths = write_recommendation(rec, tmp_path / "rec.json", graph=graph)
    data = json.loads(paths[-1].read_text())
    assert [s["teachers"] for s in data["sets"]] == [["a", "b"], ["a", "c"], ["b", "c"]]
    assert data["sets"][0]["pairs"][0]["score"] == pytest.approx(0.5)

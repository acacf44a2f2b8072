"""The transferability engine: exact agreement with a hand computation, Wilson intervals, cache.

Models are nearest-centroid linear classifiers of the tiny synthetic data (accurate without any
training, with seeded weight noise so that they differ) and a random MLP; 32 images, 3 PGD steps.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchattacks
from torch import nn

import transfer_analysis.matrix.engine as matrix_mod  # the engine: where build_attack is looked up
from transfer_analysis import balanced_subset
from transfer_analysis.attacks import AttackConfig
from transfer_analysis.errors import UserError
from transfer_analysis.matrix import (_Placement, save_matrix_outputs, source_seed, transfer_matrix,
                                      wilson_interval)
from transfer_analysis.models import PixelSpaceModel, model_fingerprint

EPS = 0.15
STEPS = 3
BATCH = 12  # 32 images -> batches of 12, 12, 8
ATTACK = AttackConfig("pgd", eps=EPS, steps=STEPS)


@pytest.fixture(scope="module")
def centroids(tiny_data) -> torch.Tensor:
    x, y = tiny_data.images("train"), tiny_data.labels("train")
    return torch.stack([x[y == c].flatten(1).mean(0) for c in range(tiny_data.num_classes)])


def centroid_model(mu: torch.Tensor, seed: int, noise: float) -> nn.Module:
    """Nearest-centroid classifier with seeded noise on the centroids (accurate, no training)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(mu.shape[1], mu.shape[0])
    with torch.no_grad():
        lin.weight.copy_(mu + noise * torch.randn(mu.shape, generator=g))
        lin.bias.copy_(-0.5 * lin.weight.pow(2).sum(1))
    return nn.Sequential(nn.Flatten(), lin).eval().requires_grad_(False)


def mlp_model(seed: int, d: int = 144, c: int = 4) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, c))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval().requires_grad_(False)


@pytest.fixture
def pool(centroids) -> dict[str, nn.Module]:
    return {"lin0": centroid_model(centroids, 0, 0.1), "lin1": centroid_model(centroids, 1, 0.2),
            "lin2": centroid_model(centroids, 2, 0.3), "mlp": mlp_model(0)}


@pytest.fixture(scope="module")
def data(tiny_data) -> tuple[torch.Tensor, torch.Tensor]:
    idx = balanced_subset(tiny_data.y_test, 32, seed=0)
    return tiny_data.images("test", idx), tiny_data.labels("test", idx)


def run(pool, data, **kw):
    x, y = data
    kw.setdefault("batch_size", BATCH)
    return transfer_matrix(pool, x, y, kw.pop("attack", ATTACK), **kw)


def assert_same_result(a, b) -> None:
    assert a.names == b.names
    assert torch.equal(a.clean_pred, b.clean_pred)
    assert torch.equal(a.adv_pred, b.adv_pred)
    pd.testing.assert_frame_equal(a.long, b.long)
    pd.testing.assert_frame_equal(a.matrix, b.matrix)
    pd.testing.assert_frame_equal(a.models, b.models)


# --------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------
def test_engine_matches_direct_torchattacks(pool, data):
    x, y = data
    res = run(pool, data, seed=3)
    names = list(pool)
    # by hand: torchattacks PGD on each source, seeded as documented, batches in order
    clean_ok = {n: pool[n](x).argmax(1) == y for n in names}
    fooled = {}
    for s in names:
        torch.manual_seed(source_seed(3, model_fingerprint(pool[s])))
        atk = torchattacks.PGD(pool[s], eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True)
        x_adv = torch.cat([atk(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)])
        assert float((x_adv - x).abs().max()) <= EPS + 1e-6
        for t in names:
            with torch.no_grad():
                fooled[s, t] = pool[t](x_adv).argmax(1) != y
    for i, s in enumerate(names):
        assert torch.equal(res.clean_pred[i] == y, clean_ok[s])
        for j, t in enumerate(names):
            cs, ct, fs, ft = clean_ok[s], clean_ok[t], fooled[s, s], fooled[s, t]
            b = res.booleans(s, t)
            assert all(torch.equal(b[k], v) for k, v in {"cs": cs, "ct": ct, "fs": fs, "ft": ft}.items())
            den = int((cs & ct & fs).sum())
            num = int((cs & ct & fs & ft).sum())
            tr = res.long.query("source == @s and target == @t and metric == 'transfer_rate'").iloc[0]
            assert tr.n == den
            if den:
                assert tr.value == num / den and res.matrix.loc[s, t] == num / den
            else:
                assert math.isnan(tr.value) and math.isnan(res.matrix.loc[s, t])
            te = res.long.query("source == @s and target == @t and metric == 'target_error'").iloc[0]
            assert te.n == int(ct.sum()) and te.value == int((ct & ft).sum()) / int(ct.sum())
        row = res.models.set_index("model").loc[s]
        assert row.clean_acc == float(clean_ok[s].double().mean())
        assert row.whitebox_robust_acc == float((~fooled[s, s]).double().mean())
    # the case is not degenerate: some cells transfer partly
    vals = res.matrix.to_numpy()
    assert np.nanmin(vals) < 0.5 and np.sum((vals > 0) & (vals < 1)) >= 3
    # the diagonal is white-box success on clean-correct samples
    assert res.matrix.loc["lin0", "lin0"] == 1.0
    assert list(res.long.columns) == ["source", "target", "attack", "eps", "metric", "value", "n", "ci_low",
                                      "ci_high"]
    assert len(res.long) == 2 * len(names) ** 2 and set(res.long.attack) == {"pgd"} and set(res.long.eps) == {EPS}


def test_copies_transfer_fully(pool, data):
    base = pool["lin1"]
    same = copy.deepcopy(base)  # same fingerprint: same seed, same x_adv
    wrapped = PixelSpaceModel(copy.deepcopy(base))  # same function, another fingerprint: another random start
    assert model_fingerprint(wrapped) != model_fingerprint(base) == model_fingerprint(same)
    res = run({"a": base, "b": same, "c": wrapped}, data)
    k, n = res.counts("transfer_rate")
    assert (n > 0).all()
    assert (res.matrix.to_numpy() == 1.0).all()
    te = res.metric_matrix("target_error").to_numpy()
    assert (te == te[:, :1]).all()  # every copy errs exactly where the source does
    assert res.stats["attacks_run"] == 2  # a and b share one attack


def test_wilson_interval_hand_computation():
    # 3 successes out of 4, z = 1.96: center (p + z²/2n)/(1 + z²/n), half z sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    z = 1.959963984540054
    p, n = 0.75, 4
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo, hi = wilson_interval(3, 4)
    assert lo == pytest.approx(center - half, abs=1e-12) and hi == pytest.approx(center + half, abs=1e-12)
    assert (round(lo, 4), round(hi, 4)) == (0.3006, 0.9544)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    lo_a, hi_a = wilson_interval(np.array([0, 3, 5]), np.array([4, 4, 0]))
    assert lo_a[1] == lo and math.isnan(hi_a[2])


def test_intervals_bracket_values(pool, data):
    res = run(pool, data)
    long = res.long
    defined = long[long.n > 0]
    assert len(defined) > 0
    assert ((defined.ci_low <= defined.value) & (defined.value <= defined.ci_high)).all()
    assert ((defined.ci_low >= 0) & (defined.ci_high <= 1)).all()
    empty = long[long.n == 0]
    assert empty.value.isna().all() and empty.ci_low.isna().all() and empty.ci_high.isna().all()
    k, n = res.counts("target_error")
    lo, hi = wilson_interval(k, n)
    te = long[long.metric == "target_error"]
    assert np.array_equal(te.ci_low.to_numpy(), lo.reshape(-1))


def test_other_metrics_from_the_same_booleans(pool, data):
    res = run(pool, data)
    fo, cc = res.fooled, res.clean_correct
    k, n = res.counts("unconditional")
    assert (n == len(res.labels)).all() and np.array_equal(k, fo.sum(-1).numpy())
    k, n = res.counts("trs")
    assert n[0, 1] == int((cc[0] & cc[1]).sum()) and k[0, 1] == int((cc[0] & cc[1] & fo[0, 0] & fo[0, 1]).sum())
    with pytest.raises(UserError, match="unknown metric"):
        res.counts("nope")


# --------------------------------------------------------------------------------------------
# determinism and cache
# --------------------------------------------------------------------------------------------
def test_reruns_are_identical_and_cached(pool, data, tmp_path):
    first = run(pool, data, cache_dir=tmp_path / "cache")
    assert first.stats == {"attacks_run": 4, "target_evaluations": 16, "clean_evaluations": 4,
                           "sources_from_cache": 0}
    again = run(pool, data, cache_dir=tmp_path / "cache")
    assert again.stats == {"attacks_run": 0, "target_evaluations": 0, "clean_evaluations": 0,
                           "sources_from_cache": 4}
    assert_same_result(first, again)
    no_cache = run(pool, data)
    assert_same_result(first, no_cache)
    # the cache holds hex-named files only
    files = sorted(p.relative_to(tmp_path / "cache") for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert {p.parts[0] for p in files} == {"adv", "preds", "clean"} and len(files) == 12
    assert all(len(p.stem) == 64 and int(p.stem, 16) >= 0 for p in files)


@pytest.fixture
def attacked(monkeypatch) -> list[str]:
    """The fingerprints of the models the engine builds an attack for, in order."""
    calls: list[str] = []
    real = matrix_mod.build_attack

    def counting(cfg, model, **kw):
        calls.append(model_fingerprint(model))
        return real(cfg, model, **kw)

    monkeypatch.setattr(matrix_mod, "build_attack", counting)
    return calls


def test_adding_a_model_reuses_the_cache(pool, data, tmp_path, attacked):
    calls = attacked
    small = {k: pool[k] for k in ("lin0", "lin1", "lin2")}
    run(small, data, cache_dir=tmp_path / "cache")
    assert len(calls) == 3
    calls.clear()
    grown = {"mlp": pool["mlp"], **small}  # new model first: results must not depend on order
    res = run(grown, data, cache_dir=tmp_path / "cache")
    assert calls == [model_fingerprint(pool["mlp"])]
    assert res.stats == {"attacks_run": 1, "target_evaluations": 2 * 3 + 1, "clean_evaluations": 1,
                         "sources_from_cache": 0}
    calls.clear()
    fresh = run(grown, data)
    assert len(calls) == 4
    assert_same_result(res, fresh)


def test_rows_of_some_sources_attack_only_them_and_equal_the_matrix(pool, data, tmp_path, attacked):
    """transfer_rows: the same attack, seed and cache key as the matrix; the other models are targets only."""
    from transfer_analysis.matrix import transfer_rows

    calls = attacked
    x, y = data
    rows = transfer_rows(pool, x, y, ["lin1"], ATTACK, batch_size=BATCH, cache_dir=tmp_path / "cache")
    assert calls == [model_fingerprint(pool["lin1"])]
    assert [r["target"] for r in rows] == ["lin0", "lin2", "mlp"]
    calls.clear()
    full = run(pool, data, cache_dir=tmp_path / "cache")
    assert len(calls) == 3 and full.stats["sources_from_cache"] == 1  # the row came from transfer_rows' cache
    k, n = full.counts("transfer_rate")
    assert all(r["n"] > 0 for r in rows) and any(r["k"] > 0 for r in rows)  # a row with something to compare
    for r in rows:
        j = full.names.index(r["target"])
        assert (r["k"], r["n"]) == (int(k[1, j]), int(n[1, j]))
        assert r["value"] == pytest.approx(full.matrix.loc["lin1", r["target"]], nan_ok=True)
    # again, every row and clean prediction from the cache: the same rows
    again = transfer_rows(pool, x, y, ["lin1"], ATTACK, batch_size=BATCH, cache_dir=tmp_path / "cache")
    pd.testing.assert_frame_equal(pd.DataFrame(again), pd.DataFrame(rows))
    with pytest.raises(UserError, match="`sources` must name models of the pool"):
        transfer_rows(pool, x, y, ["nobody"], ATTACK)


def test_interrupted_run_resumes(pool, data, tmp_path, monkeypatch):
    class Interrupt(Exception):
        pass

    def stop(name: str) -> None:
        raise Interrupt(name)

    with pytest.raises(Interrupt, match="lin0"):
        run(pool, data, cache_dir=tmp_path / "cache", on_source_done=stop)
    assert len(list((tmp_path / "cache" / "adv").iterdir())) == 1
    resumed = run(pool, data, cache_dir=tmp_path / "cache")
    assert resumed.stats["attacks_run"] == 3 and resumed.stats["sources_from_cache"] == 1
    assert_same_result(resumed, run(pool, data))


def test_corrupt_cache_entry_is_recomputed(pool, data, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = run(pool, data, cache_dir=cache)
    for kind in ("adv", "preds"):
        victim = sorted((cache / kind).iterdir())[0]
        blob = victim.read_bytes()
        victim.write_bytes(blob[: len(blob) // 2])
    with caplog.at_level(logging.WARNING, logger="transfer_analysis.cache"):
        again = run(pool, data, cache_dir=cache)
    assert any("unreadable cache entry" in r.getMessage() for r in caplog.records)
    assert again.stats["attacks_run"] in (0, 1) and again.stats["target_evaluations"] == 4
    assert_same_result(first, again)
    assert_same_result(first, run(pool, data, cache_dir=cache))  # and rewritten whole


def test_cache_key_separates_attack_seed_and_data(pool, data, tmp_path):
    x, y = data
    small = {"lin0": pool["lin0"], "mlp": pool["mlp"]}
    run(small, data, cache_dir=tmp_path)
    for kw in ({"seed": 1}, {"attack": AttackConfig("pgd", eps=EPS, steps=2)}, {"indices": list(range(32))}):
        assert run(small, data, cache_dir=tmp_path, **kw).stats["attacks_run"] == 2
    flipped = transfer_matrix(small, x.flip(0), y.flip(0), ATTACK, batch_size=BATCH, cache_dir=tmp_path)
    assert flipped.stats["attacks_run"] == 2


def test_models_are_offloaded_and_results_unchanged(pool, data):
    res = run(pool, data, max_resident_bytes=0)
    assert_same_result(res, run(pool, data))
    assert all(p.device.type == "cpu" for m in pool.values() for p in m.parameters())


def test_placement_evicts_least_recently_used():
    mods = {n: nn.Linear(10, 10) for n in "abc"}  # 440 bytes each
    place = _Placement(mods, torch.device("cpu"), budget=900)
    for n in "ab":
        place.use(n)
    place.use("a")
    place.use("c")  # evicts b, the least recently used
    assert list(place.resident) == ["a", "c"]
    place.release()
    assert not place.resident


def test_bad_inputs_are_user_errors(pool, data):
    x, y = data
    with pytest.raises(UserError, match="`batch_size`"):
        transfer_matrix(pool, x, y, ATTACK, batch_size=0)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        transfer_matrix(pool, x * 2, y, ATTACK)
    with pytest.raises(UserError, match="labels"):
        transfer_matrix(pool, x, y[:-1], ATTACK)
    with pytest.raises(UserError, match="unknown attack"):
        transfer_matrix(pool, x, y, "pgdd")


def test_saved_outputs(pool, data, tmp_path):
    res = run(pool, data)
    paths = save_matrix_outputs(res, tmp_path)
    mat = pd.read_csv(paths["matrix"])
    assert list(mat.columns) == ["source", *pool] and list(mat.source) == list(pool)
    assert np.array_equal(mat.drop(columns="source").to_numpy(), res.matrix.to_numpy(), equal_nan=True)
    models = pd.read_csv(paths["models"])
    assert list(models.columns[:4]) == ["model", "clean_acc", "whitebox_robust_acc", "params"]
    assert models.params.tolist() == [580, 580, 580, 144 * 16 + 16 + 16 * 4 + 4]
    assert Path(paths["heatmap"]).read_bytes()[:4] == b"\x89PNG"

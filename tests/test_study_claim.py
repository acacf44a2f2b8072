"""The study protocol, the teacher-set sampler and the claim statistics."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pandas as pd
import pytest

from distill.pipeline.claim import (
    claim_verdict,
    convergence,
    partial_spearman_ci,
    per_set_table,
    spearman_ci,
)
from distill.pipeline.config import student_runs, student_train_config, validate_study_config
from distill.trainer import resolve_config
from transfer_analysis.errors import UserError
from transfer_analysis.selection import pair_scores, select_teachers
from transfer_analysis.set_sampling import sample_teacher_sets, score_teacher_set

STUDY = {
    "dataset": "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=64,n_test=32",
    "pool": [{"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn",
              "train": {"epochs": 1}} for n in ("a", "b", "c", "d")],
    "recommend": {"k": 2},
    "training": {"epochs": 6, "lr": 0.05, "weight_decay": 1e-4, "milestones": [0.5, 0.75], "batch_size": 16,
                 "kl_reduction": "batchmean"},
    "students": {"arch": "resnet18_cifar", "kwargs": {"width": 4}, "seeds": [0, 1],
                 "runs": [{"method": "darht", "teacher_set": "low-transfer"},
                          {"method": "darht", "teacher_set": "sampled", "n_sets": 3, "attacks": ["clean", "pgd20"]},
                          {"method": "ard", "teacher_set": "single"},
                          {"method": "rslad", "teacher_set": "single", "kwargs": {"temperature": 2.0}},
                          {"method": "pgd-at", "teacher_set": "none"}]},
    "evaluation": {"attacks": ["clean", "pgd20", "autoattack"], "attack_samples": {"autoattack": 8}},
}


def _study(**changes):
    cfg = copy.deepcopy(STUDY)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


# ------------------------------------------------------------------ the protocol
def test_every_student_gets_the_study_protocol():
    cfg = validate_study_config(_study())
    runs = student_runs(cfg)
    assert [r["id"] for r in runs][:4] == ["darht-low-transfer-s0", "darht-low-transfer-s1",
                                          "darht-sampled-1-s0", "darht-sampled-1-s1"]
    resolved = {r["id"]: resolve_config(student_train_config(cfg, r, ["a"] if r["method"] != "pgd-at" else []))
                for r in runs}
    protocol = {(c.epochs, c.lr, tuple(c.milestones), c.weight_decay, c.batch_size, c.momentum, c.optimizer,
                 c.lr_schedule) for c in resolved.values()}
    # one protocol, although the methods' reference defaults differ (ARD/RSLAD 2e-4, RSLAD 300 epochs, DARHT 256)
    assert protocol == {(6, 0.05, (0.5, 0.75), 1e-4, 16, 0.9, "sgd", "step")}
    # the KL reduction reaches the KL-based methods only; method hyperparameters stay per method
    assert resolved["ard-single-s0"].method_kwargs == {"reduction": "batchmean"}
    assert resolved["rslad-single-s0"].method_kwargs == {"temperature": 2.0, "reduction": "batchmean"}
    assert resolved["darht-low-transfer-s0"].method_kwargs == {}
    assert resolved["pgd-at-none-s0"].method_kwargs == {}
    # a run's own attack list; attack_samples only for the attacks it runs
    assert resolved["darht-sampled-1-s0"].final_attacks == ["clean", "pgd20"]
    assert resolved["darht-sampled-1-s0"].final_attack_samples == {}
    assert resolved["ard-single-s0"].final_attack_samples == {"autoattack": 8}


def test_without_a_protocol_students_keep_the_reference_defaults():
    cfg = validate_study_config(_study(training=None))
    by_method = {r["method"]: resolve_config(student_train_config(cfg, r, ["a"])) for r in student_runs(cfg)
                 if r["method"] in ("ard", "darht")}
    assert by_method["ard"].weight_decay == 2e-4 and by_method["ard"].method_kwargs == {}
    assert by_method["darht"].weight_decay == 5e-4
    # darht distill alone keeps the reference protocol too
    assert resolve_config({"method": "rslad", "student": "s", "dataset": "d"}).milestones == \
        pytest.approx([215 / 300, 260 / 300, 285 / 300])


@pytest.mark.parametrize("changes,match", [
    ({"training": {"lr": 0.1, "weight_decay": 0}}, "training.epochs is required"),
    ({"training": {"epochs": 2, "lr": 0.1, "weight_decay": 0}}, "training.milestones is required"),
    ({"training": {"epochs": 2, "lr": 0.1, "weight_decay": 0, "milestones": [], "kl_reduction": "sum"}},
     "kl_reduction"),
    ({"training": {"epochs": 2, "lr": "abc", "weight_decay": 0, "milestones": []}}, "lr"),
    ({"training": {"epochs": 2, "lr": 0.1, "weight_decay": 0, "milestones": [], "epoch": 3}},
     "did you mean 'epochs'"),
    ({"students__epochs": 3}, "students.epochs and training: both set"),
    ({"students__runs": [{"method": "darht", "teacher_set": "sampled"}]}, "n_sets"),
    ({"students__runs": [{"method": "darht", "teacher_set": "sampled", "n_sets": 2},
                         {"method": "darht", "teacher_set": "sampled", "n_sets": 2, "label": "x"}]}, "only one run"),
    ({"students__runs": [{"method": "ard", "teacher_set": "sampled", "n_sets": 2}]}, "one teacher"),
    ({"students__runs": [{"method": "darht", "teacher_set": "low-transfer", "n_sets": 2}]}, "sampled only"),
    ({"students__runs": [{"method": "darht", "teacher_set": "low-transfer", "attacks": ["pgdd"]}]}, "attacks"),
    ({"students__runs": [{"method": "darht", "teacher_set": "low-transfer", "kwargs": {"p_ad": 1}}]},
     "no option 'p_ad'"),
])
def test_protocol_errors_name_the_key(changes, match):
    with pytest.raises(UserError, match=match):
        validate_study_config(_study(**changes))


# ------------------------------------------------------------------ the sampler
def _random_matrix(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = [f"m{i}" for i in range(n)]
    t = rng.uniform(0.05, 0.95, size=(n, n))
    np.fill_diagonal(t, 1.0)
    return pd.DataFrame(t, index=names, columns=names)


def test_sampled_sets_span_the_range_and_are_deterministic():
    T = _random_matrix(8, 3)
    scores = pair_scores(T)
    every = sorted(score_teacher_set(scores, c)[0] for c in itertools.combinations(sorted(T.index), 3))
    lo, hi = every[0], every[-1]
    draws = sample_teacher_sets(T, k=3, n_sets=6, seed=5)
    assert len(draws) == 6 and len({d.teachers for d in draws}) == 6
    width = (hi - lo) / 6
    for d in draws:  # each set's score is its own (brute force), inside its stratum
        mx, mn = score_teacher_set(scores, d.teachers)
        assert (d.max_pair, d.mean_pair) == (mx, mn)
        assert lo + d.stratum * width - 1e-12 <= d.max_pair <= lo + (d.stratum + 1) * width + 1e-12
    strata = [d.stratum for d in draws]
    assert strata[0] == 0 and strata[-1] == 5  # the lowest and the highest stratum are both drawn
    assert [d.teachers for d in sample_teacher_sets(T, k=3, n_sets=6, seed=5)] == [d.teachers for d in draws]
    others = {tuple(d.teachers for d in sample_teacher_sets(T, k=3, n_sets=6, seed=s)) for s in range(6)}
    assert len(others) > 1  # the seed matters


def test_sampler_excludes_named_sets_and_fills_empty_strata():
    T = _random_matrix(6, 0)
    named = [("m0", "m1", "m2"), ("m3", "m4", "m5")]
    draws = sample_teacher_sets(T, k=3, n_sets=15, seed=0, exclude_sets=named)
    assert len(draws) == 15 and not {d.teachers for d in draws} & set(named)  # 20 - 2 = 18 candidates
    with pytest.raises(UserError, match="only 18 scored sets"):
        sample_teacher_sets(T, k=3, n_sets=19, exclude_sets=named)
    with pytest.raises(UserError, match="n_sets"):
        sample_teacher_sets(T, k=3, n_sets=0)


# ------------------------------------------------------------------ the statistics
def test_spearman_against_a_hand_computation():
    # ranks differ by (0, 1, 1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    r = spearman_ci([0.1, 0.2, 0.3, 0.4], [0.5, 0.7, 0.6, 0.8], n_boot=500, seed=1)
    assert r["rho"] == pytest.approx(0.8) and r["n_sets"] == 4
    assert r["ci_low"] <= r["rho"] <= r["ci_high"] and -1 <= r["ci_low"] and r["ci_high"] <= 1
    assert r == spearman_ci([0.1, 0.2, 0.3, 0.4], [0.5, 0.7, 0.6, 0.8], n_boot=500, seed=1)  # seeded
    # NaN pairs are dropped; a constant variable has no correlation
    assert spearman_ci([0.1, 0.2, np.nan, 0.3, 0.4], [0.5, 0.7, 0.1, 0.6, 0.8], n_boot=50)["rho"] == \
        pytest.approx(0.8)
    assert math.isnan(spearman_ci([1, 2, 3], [1, 1, 1], n_boot=50)["rho"])


def test_partial_spearman_against_the_textbook_formula():
    x, y, z = [1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5], [1, 3, 2, 5, 4, 6]
    from scipy import stats

    rxy, rxz, ryz = (stats.spearmanr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    expected = (rxy - rxz * ryz) / math.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    r = partial_spearman_ci(x, y, z, n_boot=200)
    assert r["rho"] == pytest.approx(expected)
    t = expected * math.sqrt(3 / (1 - expected ** 2))
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), 3))


def test_convergence_rule(tmp_path):
    def run(values):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        rows = "\n".join(f"{i + 1},{v}" for i, v in enumerate(values))
        (d / "summary.csv").write_text("epoch,test_pgd_acc\n" + rows + "\n")
        return convergence(d)

    assert run([0.1, 0.3, 0.40, 0.41, 0.42])["converged"] is True
    assert run([0.1, 0.3, 0.40, 0.43, 0.42])["converged"] is False  # moved 3 points within the last two epochs
    assert run([0.1, 0.3, 0.44, 0.42, 0.41])["pgd_change_last_epochs"] == pytest.approx(0.03)
    assert run([0.4, 0.41])["converged"] is False  # too short to tell
    assert convergence(tmp_path / "missing")["converged"] is False


def test_per_set_means_leave_out_unconverged_students_and_the_verdict_follows_the_ci():
    rows = pd.DataFrame({
        "set_id": ["s1", "s1", "s2", "s2", "s3"], "teachers": ["a+b"] * 2 + ["a+c"] * 2 + ["b+c"],
        "teacher_set": ["low-transfer", "low-transfer", "sampled", "sampled", "sampled"],
        "max_pair": [0.1, 0.1, 0.5, 0.5, 0.9], "mean_pair": [0.1, 0.1, 0.4, 0.4, 0.8],
        "mean_teacher_robust_acc": [0.5] * 5, "clean_acc": [0.8] * 5, "pgd20_acc": [0.5, 0.6, 0.4, 0.9, 0.3],
        "converged": [True, True, True, False, True]})
    sets = per_set_table(rows)
    assert list(sets["set_id"]) == ["s1", "s2", "s3"] and list(sets["n_seeds"]) == [2, 1, 1]
    assert sets["pgd20_mean"].tolist() == pytest.approx([0.55, 0.4, 0.3])
    assert sets["named"].tolist() == [True, False, False]
    neg = {"rho": -0.9, "ci_low": -1.0, "ci_high": -0.4, "p_value": 0.01, "n_sets": 12}
    zero = {**neg, "ci_high": 0.2}
    pos = {**neg, "rho": 0.8, "ci_low": 0.3, "ci_high": 1.0}
    assert claim_verdict({"spearman_max_pair_vs_pgd20": neg, "partial_max_pair_vs_pgd20": neg})[0] == "supported"
    assert claim_verdict({"spearman_max_pair_vs_pgd20": neg, "partial_max_pair_vs_pgd20": zero})[0] == "not supported"
    assert claim_verdict({"spearman_max_pair_vs_pgd20": zero, "partial_max_pair_vs_pgd20": zero})[0] == "not supported"
    assert claim_verdict({"spearman_max_pair_vs_pgd20": pos, "partial_max_pair_vs_pgd20": zero})[0] == "contradicted"
    assert claim_verdict({})[0] == "not tested"


# ------------------------------------------------------------------ one pair-score rule
def test_nan_cell_defers_to_the_other_direction_in_the_whole_ranking():
    T = pd.DataFrame([[1.0, np.nan, 0.6], [0.5, 1.0, 0.7], [0.6, 0.7, 1.0]], index=list("abc"), columns=list("abc"))
    for objective in ("mean", "minimax"):
        rec = select_teachers(T, k=2, objective=objective, top=3)
        assert [s.teachers for s in rec.sets] == [("a", "b"), ("a", "c"), ("b", "c")], objective
        assert [s.max_pair for s in rec.sets] == pytest.approx([0.5, 0.6, 0.7])


# ------------------------------------------------------------------ preconditions, power and ties
def _committed():
    from pathlib import Path

    study = Path(__file__).resolve().parents[1] / "results" / "fashion-mnist"
    models = pd.read_csv(study / "models.csv")
    return (pd.read_csv(study / "students_detail.csv"), pd.read_csv(study / "claim_sets.csv"),
            dict(zip(models["model"], models["whitebox_robust_acc"])))


def test_ties_rank_as_ties_on_the_committed_study():
    from distill.pipeline.claim import spearman_ci

    _, sets, _ = _committed()
    # the per-set means carry float noise (0.5466666666666667 vs ...666): ranked raw, rho was -0.156
    assert spearman_ci(sets["max_pair"], sets["pgd20_mean"], n_boot=50)["rho"] == pytest.approx(-0.1519, abs=1e-4)


def test_the_committed_study_is_inconclusive_with_its_failed_preconditions():
    from distill.pipeline.claim import claim_statistics, claim_verdict, preconditions

    students, sets, teachers = _committed()
    pre = preconditions(students, sets, teachers, "matrix")
    assert pre["teacher_gap"]["best"] == pytest.approx(0.657 - students[students.method == "pgd-at"].pgd20_acc.mean())
    assert pre["distillation_gain"]["label"] == "rslad-single" and pre["distillation_gain"]["ci_low"] < 0
    assert [f.split(":")[0] for f in pre["failed"]] == ["teacher gap", "distillation gain", "power"]
    assert pre["power"]["n_sets"] == 18 and pre["power"]["mde_rho"] == pytest.approx(0.619, abs=1e-3)
    verdict, sentence = claim_verdict(claim_statistics(sets, n_boot=200), pre)
    assert verdict == "inconclusive" and "teacher gap" in sentence


def test_a_powered_study_in_the_right_regime_that_sees_nothing_is_not_supported():
    from distill.pipeline.claim import claim_statistics, claim_verdict, preconditions

    rng = np.random.default_rng(0)
    n_sets, seeds = 40, 5
    rows, sets = [], []
    for s in range(seeds):
        rows.append({"method": "pgd-at", "teacher_set": "none", "label": "pgd-at-none", "seed": s,
                     "pgd20_acc": 0.58 + 0.002 * rng.standard_normal()})
        rows.append({"method": "rslad", "teacher_set": "single", "label": "rslad-single", "seed": s,
                     "pgd20_acc": 0.63 + 0.002 * rng.standard_normal()})
    for i in range(n_sets):
        sets.append({"set_id": f"s{i}", "max_pair": 0.1 + 0.01 * i, "mean_pair": 0.1 + 0.01 * i,
                     "mean_teacher_robust_acc": 0.7 + 0.001 * (i % 3), "n_seeds": seeds,
                     "pgd20_mean": 0.6 + 0.01 * math.sin(2.4 * i),  # rho -0.04: no effect
                     "pgd20_std": 0.01})
    sets = pd.DataFrame(sets)
    pre = preconditions(pd.DataFrame(rows), sets, {"a": 0.70, "b": 0.68}, "PGD-20")
    assert pre["failed"] == [] and pre["power"]["mde_rho"] < 0.5
    verdict, _ = claim_verdict(claim_statistics(sets, n_boot=200), pre)
    assert verdict == "not supported"


def test_minimal_detectable_rho_has_80_percent_power_by_simulation():
    from distill.pipeline.claim import minimal_detectable_rho
    from scipy import stats

    rng = np.random.default_rng(1)
    n = 30
    rho = minimal_detectable_rho(n)
    cov = [[1, rho], [rho, 1]]
    hits = 0
    for _ in range(1500):
        xy = rng.multivariate_normal([0, 0], cov, n)
        hits += stats.pearsonr(xy[:, 0], xy[:, 1]).pvalue < 0.05
    assert 0.75 < hits / 1500 < 0.85

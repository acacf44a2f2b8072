"""The study's claim as statistics: do teacher sets that transfer less give more robust students?

Over every DARHT student of a study (named and sampled teacher sets), per set: its scores
(``max_pair``, ``mean_pair``: :func:`transfer_analysis.set_sampling.score_teacher_set`, the one
pair-score rule), the mean white-box robust accuracy of its teachers (the confound: stronger
teachers may make stronger students whatever their transferability), and each robust accuracy
averaged over seeds. Then:

- ``spearman_<score>_vs_<attack>``: Spearman's rho of the set score against the students' accuracy,
  on per-set means, with a percentile bootstrap 95% CI over sets and scipy's p-value;
- ``partial_<score>_vs_<attack>``: the same, controlling for the teachers' mean robust accuracy
  (Pearson correlation of the rank residuals after a linear fit on the covariate's ranks; p-value
  from t with n - 3 degrees of freedom).

Beside the set scores, a second predictor is tested the same way: ``student_teacher_transfer``, the
transfer rate of each trained student's own adversarial examples (the matrix attack) to its
teachers, mean over the teachers and then over the set's seeds (after SAAD, arXiv 2512.10275, which
finds distilled robustness tracks it). Its entries are ``spearman_student_teacher_transfer_vs_*``
and ``partial_student_teacher_transfer_vs_*``; no direction is predicted for it.

The claim predicts a *negative* rho (lower transfer, higher robustness). Students whose test PGD
accuracy still moved by :data:`CONVERGENCE_THRESHOLD` or more over their last
:data:`CONVERGENCE_WINDOW` epochs are "not converged" and left out of every statistic.

Example:
    >>> r = spearman_ci([0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.45, 0.4, 0.42, 0.3], n_boot=200)
    >>> round(r["rho"], 6), r["n_sets"]
    (-0.9, 5)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transfer_analysis.utils import atomic_write_json, atomic_write_text

__all__ = ["CONVERGENCE_WINDOW", "CONVERGENCE_THRESHOLD", "SCORES", "CLAIM_ATTACKS", "SET_STUDY_COLUMNS",
           "convergence", "student_protocol", "spearman_ci", "partial_spearman_ci", "claim_statistics",
           "claim_verdict", "per_set_table", "plot_claim", "write_claim", "preconditions", "minimal_detectable_rho",
           "TIE_DECIMALS", "MIN_TEACHER_GAP", "MAX_MDE_RHO"]

logger = logging.getLogger(__name__)

#: a student is converged when its test PGD accuracy moved by less than the threshold over its last
#: ``CONVERGENCE_WINDOW`` epochs (max - min of the last window + 1 per-epoch values)
CONVERGENCE_WINDOW = 2
CONVERGENCE_THRESHOLD = 0.03
SCORES = ("max_pair", "mean_pair")
#: the second predictor: how well each student's own adversarial examples transfer to its teachers
#: (mean over the teachers; a per-student measurement, averaged over a set's seeds)
STUDENT_TRANSFER = "student_teacher_transfer"
PREDICTORS = (*SCORES, STUDENT_TRANSFER)
CLAIM_ATTACKS = ("pgd20", "cw", "autoattack")
COVARIATE = "mean_teacher_robust_acc"
SET_STUDY_COLUMNS = ["set_id", "teachers", "max_pair", "mean_pair", COVARIATE, STUDENT_TRANSFER, "seed",
                     "clean_acc", "pgd20_acc", "cw_acc", "autoattack_acc", "converged", "pgd_change_last_epochs", "epochs", "milestones",
                     "weight_decay", "lr", "batch_size"]
_PROTOCOL = ("epochs", "lr", "lr_schedule", "milestones", "gamma", "weight_decay", "batch_size", "momentum",
             "optimizer")


def convergence(run_dir: str | Path, window: int = CONVERGENCE_WINDOW,
                threshold: float = CONVERGENCE_THRESHOLD) -> dict[str, Any]:
    """``{"converged", "pgd_change_last_epochs"}`` from a training run's ``summary.csv``.

    The change is ``max - min`` of ``test_pgd_acc`` over the last ``window + 1`` epochs (so both the
    last step and the two-epoch drift count); fewer epochs than that is "not converged" (unknown).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "summary.csv").write_text("epoch,test_pgd_acc\\n1,0.2\\n2,0.41\\n3,0.42\\n4,0.43\\n")
        >>> convergence(d)
        {'converged': True, 'pgd_change_last_epochs': 0.02}
    """
    path = Path(run_dir) / "summary.csv"
    if not path.is_file():
        return {"converged": False, "pgd_change_last_epochs": math.nan}
    acc = pd.read_csv(path)["test_pgd_acc"].astype(float).tolist()
    if len(acc) < window + 1:
        return {"converged": False, "pgd_change_last_epochs": math.nan}
    tail = acc[-(window + 1):]
    change = round(max(tail) - min(tail), 10)
    return {"converged": bool(change < threshold - 1e-12), "pgd_change_last_epochs": change}


def student_protocol(run_dir: str | Path) -> dict[str, Any]:
    """The training protocol a run actually used (its resolved ``config.yaml``), flat.

    ``milestones`` becomes a string of epochs (``"5,7.5"``) so tables compare it at a glance;
    ``kl_reduction`` is the method's KL reduction, empty for methods without one.
    """
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {k: None for k in (*_PROTOCOL, "kl_reduction")}
    conf = yaml.safe_load(path.read_text()) or {}
    out = {k: conf.get(k) for k in _PROTOCOL}
    epochs = conf.get("epochs") or 0
    out["milestones"] = ",".join(f"{m * epochs:g}" for m in (conf.get("milestones") or [])) \
        if conf.get("lr_schedule") == "step" else ""
    out["kl_reduction"] = ((conf.get("resolved") or {}).get("method") or {}).get("reduction") or ""
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy import stats

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def _partial(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    from scipy import stats

    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
    design = np.column_stack([np.ones_like(rz), rz])
    res_x = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
    res_y = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
    if np.ptp(res_x) < 1e-12 or np.ptp(res_y) < 1e-12:
        return math.nan
    return float(np.corrcoef(res_x, res_y)[0, 1])


def _bootstrap(fn: Any, arrays: Sequence[np.ndarray], n_boot: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = fn(*(a[idx] for a in arrays))
        if not math.isnan(v):
            vals.append(v)
    if len(vals) < max(10, n_boot // 10):
        return math.nan, math.nan
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


#: accuracies are multiples of 1/n and their means over seeds carry float noise far below this:
#: values are rounded to it before ranking, so ties rank as ties (0.5466666666666667 == 0.5466666666666666)
TIE_DECIMALS = 9
#: preconditions of a study that can answer its question: the best teacher at least this far above
#: what the student reaches alone (PGD-AT), in accuracy
MIN_TEACHER_GAP = 0.08
#: ... and enough sets that a moderate correlation is detected at 80% power
MAX_MDE_RHO = 0.5
_Z_ALPHA, _Z_POWER = 1.959964, 0.841621  # two-sided 5%, 80% power


def _clean(*arrays: Sequence[float]) -> list[np.ndarray]:
    a = [np.round(np.asarray(v, dtype=float), TIE_DECIMALS) for v in arrays]
    keep = np.all([~np.isnan(v) for v in a], axis=0)
    return [v[keep] for v in a]


def spearman_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Spearman's rho of ``x`` against ``y`` with a percentile bootstrap 95% CI (pairs with a NaN dropped).

    Returns ``{rho, ci_low, ci_high, n_sets, p_value}`` (NaN where undefined: fewer than 3 points or a
    constant variable).
    """
    from scipy import stats

    x_, y_ = _clean(x, y)
    rho = _spearman(x_, y_)
    p = float(stats.spearmanr(x_, y_).pvalue) if not math.isnan(rho) else math.nan
    lo, hi = _bootstrap(_spearman, [x_, y_], n_boot, seed) if not math.isnan(rho) else (math.nan, math.nan)
    return {"rho": rho, "ci_low": lo, "ci_high": hi, "n_sets": int(len(x_)), "p_value": p}


def partial_spearman_ci(x: Sequence[float], y: Sequence[float], z: Sequence[float], n_boot: int = 2000,
                        seed: int = 0) -> dict[str, Any]:
    """Spearman partial correlation of ``x`` and ``y`` controlling for ``z``, with a bootstrap 95% CI.

    Example:
        >>> r = partial_spearman_ci([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], [1, 3, 2, 5, 4], n_boot=100)
        >>> round(r["rho"], 4), r["n_sets"]
        (0.9784, 5)
    """
    from scipy import stats

    x_, y_, z_ = _clean(x, y, z)
    r = _partial(x_, y_, z_)
    n = len(x_)
    p = math.nan
    if not math.isnan(r) and n > 3:
        t = r * math.sqrt((n - 3) / max(1e-300, 1 - r * r))
        p = float(2 * stats.t.sf(abs(t), n - 3))
    lo, hi = _bootstrap(_partial, [x_, y_, z_], n_boot, seed) if not math.isnan(r) else (math.nan, math.nan)
    return {"rho": r, "ci_low": lo, "ci_high": hi, "n_sets": int(n), "p_value": p}


def per_set_table(set_rows: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct teacher set from per-student rows (converged students only): scores,
    covariate, number of students, and mean and std over them of every accuracy column present.

    Rows with the same teachers under two labels are one set (``set_id`` joins the labels with `` = ``).
    """
    ok = set_rows[set_rows["converged"].astype(bool)]
    out = []
    # one row per distinct set: two labels with the same teachers (say high-transfer and homogeneous)
    # are one set, counted once
    key = ok["teachers"].map(lambda t: "+".join(sorted(str(t).split("+"))))
    for _, g in ok.groupby(key, sort=False):
        set_id = " = ".join(dict.fromkeys(g["set_id"]))
        row: dict[str, Any] = {"set_id": set_id, "teachers": g["teachers"].iloc[0],
                               "named": g["teacher_set"].iloc[0] != "sampled",
                               **{c: float(g[c].iloc[0]) for c in (*SCORES, COVARIATE)}, "n_seeds": int(len(g))}
        measured = pd.to_numeric(g.get(STUDENT_TRANSFER), errors="coerce").dropna() \
            if STUDENT_TRANSFER in g else pd.Series(dtype=float)
        row[STUDENT_TRANSFER] = float(measured.mean()) if len(measured) else math.nan
        for attack in ("clean", *CLAIM_ATTACKS):
            vals = pd.to_numeric(g.get(f"{attack}_acc"), errors="coerce").dropna() \
                if f"{attack}_acc" in g else pd.Series(dtype=float)
            row[f"{attack}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{attack}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        out.append(row)
    columns = ["set_id", "teachers", "named", *SCORES, COVARIATE, STUDENT_TRANSFER, "n_seeds",
               *(f"{a}_{m}" for a in ("clean", *CLAIM_ATTACKS) for m in ("mean", "std"))]
    return pd.DataFrame(out, columns=columns)


def claim_statistics(sets: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Every ``spearman_*`` and ``partial_*`` entry over a :func:`per_set_table` (attacks with at least
    3 sets that ran them)."""
    out: dict[str, Any] = {}
    for attack in CLAIM_ATTACKS:
        col = f"{attack}_mean"
        if col not in sets or sets[col].notna().sum() < 3:
            continue
        for score in PREDICTORS:
            if score not in sets or sets[score].notna().sum() < 3:
                continue
            out[f"spearman_{score}_vs_{attack}"] = spearman_ci(sets[score], sets[col], n_boot, seed)
            out[f"partial_{score}_vs_{attack}"] = partial_spearman_ci(sets[score], sets[col], sets[COVARIATE],
                                                                      n_boot, seed)
    return out


def _direction(entry: Mapping[str, Any]) -> str:
    if math.isnan(entry["rho"]) or math.isnan(entry["ci_low"]):
        return "undetermined"
    if entry["ci_high"] < 0:
        return "negative"
    if entry["ci_low"] > 0:
        return "positive"
    return "not distinguishable from zero"


def minimal_detectable_rho(n_sets: int) -> float:
    """The smallest |rho| a two-sided 5% test over ``n_sets`` sets detects with 80% power (Fisher z).

    Example:
        >>> round(minimal_detectable_rho(18), 2), round(minimal_detectable_rho(40), 2)
        (0.62, 0.43)
    """
    if n_sets <= 3:
        return math.nan
    return math.tanh((_Z_ALPHA + _Z_POWER) / math.sqrt(n_sets - 3))


def _mean_ci(diffs: Sequence[float]) -> dict[str, float]:
    """Mean and t-interval (95%) of per-seed differences."""
    from scipy import stats

    d = np.asarray([v for v in diffs if not math.isnan(v)], dtype=float)
    if len(d) == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_seeds": 0}
    m = float(d.mean())
    if len(d) < 2:
        return {"mean": m, "ci_low": math.nan, "ci_high": math.nan, "n_seeds": 1}
    h = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return {"mean": m, "ci_low": m - h, "ci_high": m + h, "n_seeds": int(len(d))}


def _teacher_strength(out: Path | None, cfg: Mapping[str, Any], models: pd.DataFrame | None) -> tuple[dict, str]:
    """Each pool model's PGD-20 accuracy from its training run here, else the matrix's white-box
    robust accuracy; and which source was used."""
    import json

    values: dict[str, float] = {}
    sources = set()
    for spec in cfg.get("pool", []):
        name = spec["name"]
        metrics = out / "teachers" / f"{name}.run" / "metrics.json" if out is not None else None
        acc = None
        if metrics is not None and metrics.is_file():
            acc = (json.loads(metrics.read_text()).get("accuracy") or {}).get("pgd20")
        if acc is not None:
            values[name], _ = float(acc), sources.add("PGD-20 of the teacher's training run")
        elif models is not None and name in set(models["model"]):
            values[name] = float(models.set_index("model").loc[name, "whitebox_robust_acc"])
            sources.add("white-box robust accuracy of the matrix's attack")
    return values, "; ".join(sorted(sources))


def preconditions(students: pd.DataFrame, sets: pd.DataFrame, teacher_acc: Mapping[str, float],
                  teacher_source: str = "") -> dict[str, Any]:
    """Whether a study can answer its question, from its students and sets:

    - ``teacher_gap``: the best and the mean teacher PGD-20 accuracy minus the student's own PGD-AT
      (the ``pgd-at`` / ``none`` run, mean over seeds); distillation has something to pass on
      only when teachers are clearly stronger (at least :data:`MIN_TEACHER_GAP`);
    - ``distillation_gain``: the best single-teacher distillation (ARD, RSLAD, KD from ``single``)
      minus PGD-AT, paired by seed, with a 95% t-interval over seeds: is distillation helping at all;
    - ``set_score_span``: the range of the sets' max-pair scores the correlation is measured over;
    - ``power``: the smallest |rho| detectable at 80% power with this many sets, and the same
      effect as accuracy points across the span, from the observed seed noise (a regression slope's
      standard error on per-set means).

    ``failed`` lists the preconditions not met (``None`` where one cannot be computed).
    """
    def acc_of(label_mask: pd.Series) -> pd.Series:
        g = students[label_mask]
        return pd.to_numeric(g["pgd20_acc"], errors="coerce").groupby(g["seed"]).mean()

    out: dict[str, Any] = {"failed": []}
    has = {"method", "teacher_set", "pgd20_acc", "seed"} <= set(students.columns)
    at = acc_of((students["method"] == "pgd-at") & (students["teacher_set"] == "none")) if has else pd.Series()
    student_alone = float(at.mean()) if len(at) else math.nan
    ta = [v for v in teacher_acc.values() if not math.isnan(v)]
    out["teacher_gap"] = {"best": max(ta) - student_alone if ta else math.nan,
                          "mean": float(np.mean(ta)) - student_alone if ta else math.nan,
                          "best_teacher": max(ta) if ta else math.nan, "student_pgd_at": student_alone,
                          "teacher_accuracy": teacher_source, "threshold": MIN_TEACHER_GAP}
    gains = {}
    if has and len(at):
        for label, g in students[(students["teacher_set"] == "single")
                                 & students["method"].isin(["ard", "rslad", "kd"])].groupby("label"):
            mine = pd.to_numeric(g["pgd20_acc"], errors="coerce").groupby(g["seed"]).mean()
            gains[str(label)] = _mean_ci([mine[s] - at[s] for s in mine.index if s in at.index])
    best = max(gains.items(), key=lambda kv: kv[1]["mean"], default=(None, _mean_ci([])))
    out["distillation_gain"] = {"label": best[0], **best[1], "all": gains}
    scores = pd.to_numeric(sets.get("max_pair", pd.Series(dtype=float)), errors="coerce").dropna()
    span = float(scores.max() - scores.min()) if len(scores) else math.nan
    out["set_score_span"] = span
    n = int(len(scores))
    stds = pd.to_numeric(sets.get("pgd20_std", pd.Series(dtype=float)), errors="coerce").dropna()
    seeds = float(pd.to_numeric(sets.get("n_seeds", pd.Series(dtype=float)), errors="coerce").mean()) if n else math.nan
    noise = float(np.sqrt(np.mean(stds ** 2)) / math.sqrt(seeds)) if len(stds) and seeds > 0 else math.nan
    sd_x = float(scores.std(ddof=1)) if n > 1 else math.nan
    slope_se = noise / (sd_x * math.sqrt(n - 1)) if n > 2 and sd_x > 0 and not math.isnan(noise) else math.nan
    out["power"] = {"n_sets": n, "mde_rho": minimal_detectable_rho(n), "threshold_rho": MAX_MDE_RHO,
                    "mde_points_across_span": (_Z_ALPHA + _Z_POWER) * slope_se * span if not math.isnan(slope_se)
                    else math.nan, "per_set_noise": noise}
    gap = out["teacher_gap"]["best"]
    if math.isnan(gap) or gap < MIN_TEACHER_GAP:
        out["failed"].append(f"teacher gap: the best teacher is {points(gap)} points above the student's own PGD-AT "
                             f"(needs {MIN_TEACHER_GAP * 100:.0f})")
    g = out["distillation_gain"]
    if math.isnan(g.get("ci_low", math.nan)) or g["ci_low"] <= 0:
        out["failed"].append(f"distillation gain: {g['label'] or 'no single-teacher distillation'} over PGD-AT is "
                             f"{points(g['mean'])} points (95% CI {points(g['ci_low'])} to {points(g['ci_high'])}), not "
                             "above zero")
    mde = out["power"]["mde_rho"]
    if math.isnan(mde) or mde > MAX_MDE_RHO:
        out["failed"].append(f"power: with {n} sets only |rho| >= {mde:.2f} is detected at 80% power (needs "
                             f"<= {MAX_MDE_RHO})" if not math.isnan(mde) else f"power: {n} sets are too few")
    return out


def points(v: float | None, unknown: str = "unknown") -> str:
    """An accuracy difference as signed percentage points, one decimal (``unknown`` when missing).

    Example:
        >>> points(0.0975), points(float("nan"), "-")
        ('+9.8', '-')
    """
    return unknown if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:+.1f}"


def claim_verdict(stats: Mapping[str, Any], pre: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(verdict, sentence)`` from :func:`claim_statistics`; the primary test is the max-pair score
    against PGD-20 accuracy (the attack every student ran), raw and controlling for teacher strength.

    ``verdict`` is ``supported`` (both CIs below zero), ``contradicted`` (a CI above zero),
    ``not supported`` (otherwise, in a study whose :func:`preconditions` hold), ``inconclusive``
    (otherwise, when a precondition fails: the null says little), or ``not tested`` (too few
    converged sets).
    """
    raw, part = stats.get("spearman_max_pair_vs_pgd20"), stats.get("partial_max_pair_vs_pgd20")
    if raw is None or math.isnan(raw["rho"]):
        return "not tested", "Too few converged DARHT students with distinct set scores to test the claim."
    d_raw = _direction(raw)
    d_part = _direction(part) if part is not None else "undetermined"
    desc = (f"Spearman rho of the set's max-pair transfer score against the students' PGD-20 accuracy is "
            f"{raw['rho']:+.2f} (95% bootstrap CI {raw['ci_low']:+.2f} to {raw['ci_high']:+.2f}, p = "
            f"{raw['p_value']:.3f}, {raw['n_sets']} sets): {d_raw}")
    if part is not None and not math.isnan(part["rho"]):
        desc += (f"; controlling for the teachers' mean robust accuracy, {part['rho']:+.2f} (CI "
                 f"{part['ci_low']:+.2f} to {part['ci_high']:+.2f}, p = {part['p_value']:.3f}): {d_part}")
    if d_raw == "negative" and d_part in ("negative", "undetermined"):
        verdict = "supported"
    elif "positive" in (d_raw, d_part):
        verdict = "contradicted"
    elif pre is not None and pre.get("failed"):
        verdict = "inconclusive"
    else:
        verdict = "not supported"
    sentences = {
        "inconclusive": "The correlation cannot be told apart from zero, and this study cannot tell absence from "
                        "a missed effect: " + "; ".join((pre or {}).get("failed", [])) + ".",
        "supported": "Lower-transfer teacher sets gave more robust students here, beyond what teacher strength "
                     "explains.",
        "contradicted": "Lower-transfer teacher sets gave *less* robust students here: the opposite of the claim.",
        "not supported": "At this scale the data do not show that lower-transfer teacher sets give more robust "
                         "students: the correlation cannot be told apart from zero.",
    }
    return verdict, f"{sentences[verdict]} {desc}."


def plot_claim(sets: pd.DataFrame, path: Path, baselines: Mapping[str, float] | None = None,
               stats: Mapping[str, Any] | None = None) -> Path | None:
    """Set score (max pair, mean pair) against the students' PGD-20 and CW accuracy: one point per set,
    error bars = std over seeds, named sets labelled, baselines' PGD-20/CW means as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ("pgd20", "cw") if f"{a}_mean" in sets and sets[f"{a}_mean"].notna().any()]
    if not attacks:  # a study without PGD-20 or CW has nothing to draw
        return None
    fig, axes = plt.subplots(len(attacks), 2, figsize=(10, 3.8 * len(attacks)), dpi=110, squeeze=False)
    for i, attack in enumerate(attacks):
        for j, score in enumerate(SCORES):
            ax = axes[i][j]
            named = sets["named"].astype(bool)
            for mask, colour, lab in ((~named, "tab:blue", "sampled set"), (named, "tab:red", "named set")):
                part = sets[mask]
                ax.errorbar(part[score], part[f"{attack}_mean"], yerr=part[f"{attack}_std"].fillna(0.0), fmt="o",
                            color=colour, ecolor=colour, alpha=0.8, capsize=3, label=lab)
            for r in sets[named].itertuples():
                ax.annotate(str(r.set_id).replace("darht-", ""), (getattr(r, score), getattr(r, f"{attack}_mean")),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color="tab:red")
            for k, (name, acc) in enumerate(sorted((baselines or {}).get(attack, {}).items())):
                ax.axhline(acc, color=plt.get_cmap("Dark2")(k), ls="--", lw=1, label=f"{name} (mean)")
            entry = (stats or {}).get(f"spearman_{score}_vs_{attack}")
            title = f"{attack.upper()} vs {score.replace('_', ' ')}"
            if entry and not math.isnan(entry["rho"]):
                title += f": rho {entry['rho']:+.2f} [{entry['ci_low']:+.2f}, {entry['ci_high']:+.2f}]"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(f"set {score.replace('_', ' ')} transfer score")
            ax.set_ylabel(f"student {attack.upper()} accuracy")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("Teacher-set transferability vs student robustness (points: sets, bars: std over seeds)",
                 fontsize=10)
    fig.tight_layout()
    from transfer_analysis import plots

    plots.save_figure(fig, path)
    plt.close(fig)
    return path


def _json_ready(obj: Any) -> Any:
    """NaN becomes ``null``, numpy scalars plain numbers (strict JSON)."""
    from transfer_analysis.files import to_plain

    return to_plain(obj, nan_to_none=True)


def _set_rows(out: Path, cfg: Mapping[str, Any], students: pd.DataFrame) -> pd.DataFrame:
    """The DARHT students' rows with their set's scores and teacher strength (``set_study.csv``)."""
    from transfer_analysis.selection import pair_scores, read_matrix
    from transfer_analysis.set_sampling import score_teacher_set

    matrix, models = read_matrix(out / "matrix")
    scores = pair_scores(matrix, cfg["recommend"]["pair"])
    robust = models.set_index("model")["whitebox_robust_acc"].astype(float) if models is not None else None
    rows = []
    for r in students[students["method"] == "darht"].to_dict("records"):
        teachers = [t for t in str(r["teachers"]).split("+") if t]
        mx, mn = score_teacher_set(scores, teachers)
        rows.append({**r, "set_id": r["label"], "max_pair": mx, "mean_pair": mn,
                     COVARIATE: float(robust[teachers].mean()) if robust is not None else math.nan})
    df = pd.DataFrame(rows)
    for c in SET_STUDY_COLUMNS:
        if c not in df:
            df[c] = math.nan
    return df


def write_claim(out: Path, cfg: Mapping[str, Any], rec: Mapping[str, Any], students: pd.DataFrame,
                n_boot: int = 2000, progress: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Write ``set_study.csv``, ``claim.json`` and ``claim.png`` for a study's DARHT students.

    ``progress`` (:func:`distill.pipeline.runner.study_progress`) of a study with students still to
    train makes the verdict ``interim``: the statistics are those of the finished students, the
    verdict they would give is ``verdict_so_far``, and ``interim`` says how many stand behind them.

    Returns the content of ``claim.json`` (``None`` when the study has no DARHT student).
    """
    if "method" not in students or not (students["method"] == "darht").any():
        return None
    rows = _set_rows(out, cfg, students)
    atomic_write_text(out / "set_study.csv", rows[SET_STUDY_COLUMNS].to_csv(index=False))
    sets = per_set_table(rows)
    stats = claim_statistics(sets, n_boot=n_boot, seed=int(cfg["seed"])) if len(sets) else {}
    from transfer_analysis.selection import read_matrix

    _, models = read_matrix(out / "matrix")
    teacher_acc, source = _teacher_strength(out, cfg, models)
    pre = preconditions(students, sets, teacher_acc, source)
    verdict, sentence = claim_verdict(stats, pre)
    excluded = rows[~rows["converged"].astype(bool)]
    claim = {
        "verdict": verdict, "statement": sentence, "primary": "spearman_max_pair_vs_pgd20",
        "prediction": "negative rho: lower set transfer score, higher student robust accuracy",
        "n_sets": int(len(sets)), "n_students": int(len(rows) - len(excluded)),
        "not_converged": [f"{r.set_id} seed {r.seed}" for r in excluded.itertuples()],
        "convergence_rule": f"converged: test PGD accuracy moved by less than {CONVERGENCE_THRESHOLD} over the "
                            f"last {CONVERGENCE_WINDOW} epochs",
        "bootstrap": {"resamples": n_boot, "over": "teacher sets", "interval": "percentile 95%",
                      "seed": int(cfg["seed"])},
        "covariate": COVARIATE,
        "preconditions": pre,
        **stats,
    }
    if progress is not None and progress["missing"]:
        claim.update(verdict="interim", verdict_so_far=verdict, interim=dict(progress),
                     statement=f"Interim: {progress['finished']} of {progress['planned']} students have finished; "
                               f"over them: {verdict}. {sentence}")
    atomic_write_json(out / "claim.json", _json_ready(claim))
    baselines: dict[str, dict[str, float]] = {}
    others = students[students["method"] != "darht"]
    for attack in ("pgd20", "cw"):
        col = f"{attack}_acc"
        if col in others:
            baselines[attack] = {str(lab): float(pd.to_numeric(g[col], errors="coerce").mean())
                                 for lab, g in others.groupby("label") if pd.to_numeric(g[col], errors="coerce").notna().any()}
    if len(sets):
        plot_claim(sets, out / "claim.png", baselines, stats)
    atomic_write_text(out / "claim_sets.csv", sets.to_csv(index=False))
    return claim

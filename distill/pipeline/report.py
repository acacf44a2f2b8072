"""``report.md`` for a pipeline run: tables, plots, and plain statements of what the numbers show.

Everything the report shows is copied or drawn into the run directory itself (PNG, CSV), so the
directory can be committed as it is (``results/<study>/``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from transfer_analysis.utils import atomic_write, atomic_write_text

__all__ = ["write_report", "summarize_students", "protocol_lines", "plot_robustness_vs_accuracy", "plot_training_curves"]

logger = logging.getLogger(__name__)

_ACC = ["clean_acc", "fgsm_acc", "pgd20_acc", "cw_acc", "autoattack_acc"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def summarize_students(students: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every accuracy, per (method, teacher set) label.

    Example:
        >>> df = pd.DataFrame({"label": ["a", "a"], "method": ["m", "m"], "teacher_set": ["none"] * 2,
        ...                    "teachers": ["", ""], "seed": [0, 1], "clean_acc": [0.5, 0.7]})
        >>> summarize_students(df)[["label", "seeds", "clean_acc_mean", "clean_acc_std"]].round(4).values.tolist()
        [['a', 2, 0.6, 0.1414]]
    """
    accs = [c for c in _ACC if c in students.columns]
    rows = []
    for label, group in students.groupby("label", sort=False):
        row: dict[str, Any] = {"label": label, "method": group["method"].iloc[0],
                               "teacher_set": group["teacher_set"].iloc[0], "teachers": group["teachers"].iloc[0],
                               "seeds": int(len(group))}
        for c in accs:
            vals = pd.to_numeric(group[c], errors="coerce")
            row[f"{c}_mean"] = float(vals.mean())
            row[f"{c}_std"] = float(vals.std(ddof=1)) if len(vals.dropna()) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def plot_robustness_vs_accuracy(students: pd.DataFrame, path: Path, robust_col: str) -> Path:
    """Scatter of clean accuracy against robust accuracy, one colour per (method, teacher set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=120)
    cmap = plt.get_cmap("tab10")
    for i, (label, group) in enumerate(students.groupby("label", sort=False)):
        ax.scatter(group["clean_acc"], group[robust_col], color=cmap(i % 10), label=label, alpha=0.75, s=36)
        ax.scatter([group["clean_acc"].mean()], [group[robust_col].mean()], color=cmap(i % 10), marker="X", s=110,
                   edgecolor="black", linewidth=0.6)
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel(robust_col.replace("_acc", "") + " accuracy")
    ax.set_title("Students: robustness vs accuracy (dots: seeds, X: mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    from transfer_analysis import plots

    plots.save_figure(fig, path)
    plt.close(fig)
    return path


def plot_training_curves(run_dirs: Mapping[str, Path], path: Path) -> Path | None:
    """Test clean and PGD accuracy per epoch for every student run (from each ``summary.csv``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {rid: pd.read_csv(d / "summary.csv") for rid, d in run_dirs.items() if (d / "summary.csv").is_file()}
    if not frames:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharex=True)
    cmap = plt.get_cmap("tab10")
    labels = sorted({rid.rsplit("-s", 1)[0] for rid in frames})  # run ids are LABEL-sSEED: one colour per label
    for rid, df in frames.items():
        label = rid.rsplit("-s", 1)[0]
        for ax, col in zip(axes, ("test_clean_acc", "test_pgd_acc")):
            if col in df:
                ax.plot(df["epoch"], df[col], color=cmap(labels.index(label) % 10), alpha=0.8, marker="o", ms=3,
                        label=label)
    for ax, title in zip(axes, ("test clean accuracy", "test PGD accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labs = axes[0].get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labs):
        seen.setdefault(lab, h)
    axes[1].legend(seen.values(), seen.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    from transfer_analysis import plots

    plots.save_figure(fig, path)
    plt.close(fig)
    return path


def _compare(summary: pd.DataFrame, a: str, b: str, col: str) -> str | None:
    """One plain sentence comparing label ``a`` with ``b`` on ``col`` (mean over seeds, spread)."""
    if a not in set(summary["label"]) or b not in set(summary["label"]) or f"{col}_mean" not in summary:
        return None
    ra, rb = summary.set_index("label").loc[a], summary.set_index("label").loc[b]
    ma, mb = ra[f"{col}_mean"], rb[f"{col}_mean"]
    sa, sb = ra[f"{col}_std"], rb[f"{col}_std"]
    diff = ma - mb
    spread = max(x for x in (sa, sb, 0.0) if not math.isnan(x))
    verdict = ("higher than" if diff > 0 else "lower than") if abs(diff) > spread else "within the seed spread of"
    name = col.replace("_acc", "")
    return (f"- {a} {name} accuracy {ma:.3f} is {verdict} {b} ({mb:.3f}; difference {diff:+.3f}, "
            f"largest seed std {spread:.3f}).")


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy a file so that ``dst`` is never seen half-written."""
    with atomic_write(dst, "wb") as fh:
        fh.write(src.read_bytes())


def _pfmt(v: Any) -> str:
    """A protocol value as written (``5e-04`` stays readable: no rounding to 3 decimals)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:g}" if isinstance(v, float) else str(v)


_PROTOCOL_COLUMNS = ["epochs", "lr", "lr_schedule", "milestones", "gamma", "weight_decay", "batch_size", "momentum",
                     "optimizer"]


def protocol_lines(students: pd.DataFrame) -> list[str]:
    """The training protocol, printed once, and every student that differs from it (from what each run
    recorded in its ``config.yaml``, not from the study config).

    Example:
        >>> df = pd.DataFrame({"id": ["a-s0", "b-s0"], "method": ["ard", "pgd-at"], "epochs": [10, 10],
        ...                    "lr": [0.1, 0.1], "kl_reduction": ["batchmean", ""]})
        >>> protocol_lines(df)[2]
        '| 10 | 0.1 |'
    """
    cols = [c for c in _PROTOCOL_COLUMNS if c in students.columns]
    if not cols:
        return []
    keys = students[cols].astype(str).agg(" | ".join, axis=1)
    common = keys.mode().iloc[0]
    ref = students[keys == common].iloc[0]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             "| " + " | ".join(_pfmt(ref[c]) for c in cols) + " |", ""]
    odd = students[keys != common]
    if len(odd):
        lines.append("Students that ran a different protocol (not comparable with the rest):")
        for r in odd.to_dict("records"):
            diff = ", ".join(f"{c} {_pfmt(r[c])} (not {_pfmt(ref[c])})" for c in cols if str(r[c]) != str(ref[c]))
            lines.append(f"- {r['id']}: {diff}")
    else:
        who = "The one student" if len(students) == 1 else f"Every one of the {len(students)} students"
        lines.append(f"{who} ran exactly this protocol (read back from each run's `config.yaml`).")
    if "kl_reduction" in students.columns:
        kl = {m: sorted({str(v) for v in g["kl_reduction"] if str(v) not in ("", "nan", "None")})
              for m, g in students.groupby("method")}
        kl = {m: v for m, v in kl.items() if v}
        if kl:
            lines.append("KL reduction of the KL-based methods: " + "; ".join(f"{m} {', '.join(v)}"
                                                                              for m, v in sorted(kl.items()))
                         + " (`batchmean`: the true KL; `mean`: the true KL divided by the number of classes).")
    return lines


def _known(x: Any) -> bool:
    return x is not None and not math.isnan(x)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 teacher set"``, ``"3 teacher sets"``: a count read back as a person writes it.

    Example:
        >>> plural(1, "teacher set"), plural(18, "teacher set"), plural(2, "student", "students")
        ('1 teacher set', '18 teacher sets', '2 students')
    """
    return f"{n} {word if n == 1 else (many or word + 's')}"


#: the study whose report holds a claim verdict, pointed to from smoke tests
CLAIM_STUDY = ("experiments/configs/fashion-mnist.yaml", "results/fashion-mnist/report.md")


def claim_summary_sentence(claim: Mapping[str, Any]) -> str:
    """The claim section's first sentence: the verdict, or, for a study too small to test it (a
    smoke test such as the quickstart), one plain sentence saying so and where the claim is tested.

    Example:
        >>> claim_summary_sentence({"verdict": "not tested", "statement": "", "n_sets": 1, "n_students": 1})[:60]
        'This study has 1 teacher set (1 converged DARHT student): to'
    """
    if claim["verdict"] != "not tested":
        return f"**Verdict: {claim['verdict']}.** {claim['statement']}"
    return (f"This study has {plural(int(claim['n_sets']), 'teacher set')} "
            f"({plural(int(claim['n_students']), 'converged DARHT student')}): too few to test the claim, which "
            "needs a correlation over many sets (a study this small, such as the quickstart, is a smoke test of "
            f"every stage). The claim is tested by a study such as `{CLAIM_STUDY[0]}`, whose committed report and verdict are in the "
            f"toolkit's `{CLAIM_STUDY[1]}`.")


def precondition_sentence(pre: Mapping[str, Any]) -> str:
    """The preconditions and power of ``claim.json`` as one sentence of numbers.

    Example:
        >>> precondition_sentence({"teacher_gap": {"best": 0.1, "mean": 0.05, "teacher_accuracy": "PGD-20"},
        ...     "distillation_gain": {"label": "rslad-single", "mean": 0.03, "ci_low": 0.01, "ci_high": 0.05},
        ...     "set_score_span": 0.3, "power": {"n_sets": 40, "mde_rho": 0.43, "mde_points_across_span": 0.02}})[:72]
        'Teacher gap over the student alone (PGD-AT): best +10.0, mean +5.0 point'
    """
    from distill.pipeline.claim import points

    def pts(v: Any) -> str:
        return points(v, "-")

    gap, gain, power = pre["teacher_gap"], pre["distillation_gain"], pre["power"]
    return (f"Teacher gap over the student alone (PGD-AT): best {pts(gap['best'])}, mean {pts(gap['mean'])} points "
            f"({gap.get('teacher_accuracy') or 'teacher accuracy'}). Distillation gain ({gain.get('label') or '-'} "
            f"over PGD-AT, paired by seed): {pts(gain['mean'])} points, 95% CI {pts(gain['ci_low'])} to "
            f"{pts(gain['ci_high'])}. Set scores span {pre['set_score_span']:.3f}; with {power['n_sets']} sets the "
            f"smallest |rho| detected at 80% power is {power['mde_rho']:.2f}, an effect of "
            f"{pts(power['mde_points_across_span'])} accuracy points across that span at the observed seed noise.")


def _claim_lines(claim: Mapping[str, Any], out: Path) -> list[str]:
    lines = ["## The claim: do lower-transfer teacher sets give more robust students?", "",
             claim_summary_sentence(claim), ""]
    if claim["verdict"] != "not tested":
        lines += [f"Over {plural(int(claim['n_sets']), 'teacher set')} "
                  f"({plural(int(claim['n_students']), 'converged DARHT student')}; per-set means over seeds). "
                  f"Bootstrap: {claim['bootstrap']['resamples']} resamples of the sets, percentile 95% CI. The claim "
                  "predicts a negative rho. `partial_*`: controlling for the set's mean teacher white-box robust "
                  "accuracy. Files: `claim.json`, `set_study.csv` (one row per student), `claim_sets.csv`."]
    rows = []
    for key, v in claim.items():
        if isinstance(v, Mapping) and "rho" in v:
            rho = f"{v['rho']:+.2f}" if _known(v["rho"]) else "-"
            ci = f"{v['ci_low']:+.2f} to {v['ci_high']:+.2f}" if _known(v["ci_low"]) else "-"
            p_value = f"{v['p_value']:.3f}" if _known(v["p_value"]) else "-"
            rows.append(f"| {key} | {rho} | {ci} | {p_value} | {v['n_sets']} |")
    pre = claim.get("preconditions")
    if pre and claim["verdict"] != "not tested":
        lines += ["", "Can this study answer its question? " + (
            "Every precondition holds." if not pre["failed"] else "Not met: " + "; ".join(pre["failed"]) + "."),
            "", precondition_sentence(pre)]
    if rows:  # no header over an empty table (a study without enough sets to test)
        lines += ["", "| test | rho | 95% CI | p | sets |", "|---|---|---|---|---|", *rows]
    if claim["not_converged"]:
        lines += ["", "Left out as not converged (" + claim["convergence_rule"] + "): "
                  + ", ".join(claim["not_converged"]) + "."]
    if (out / "claim.png").is_file():
        lines += ["", "![set score vs student robustness](claim.png)"]
    sets_csv = out / "claim_sets.csv"
    if sets_csv.is_file():
        sets = pd.read_csv(sets_csv)
        if len(sets):
            show = pd.DataFrame({
                "set": sets["set_id"], "teachers": sets["teachers"], "max pair": sets["max_pair"],
                "mean pair": sets["mean_pair"], "teacher robust acc": sets["mean_teacher_robust_acc"],
                "seeds": sets["n_seeds"],
                "pgd20": [f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else f"{m:.3f}"
                          for m, s in zip(sets["pgd20_mean"], sets["pgd20_std"])],
                "cw": [f"{m:.3f} ± {s:.3f}" if not math.isnan(s) else f"{m:.3f}"
                       for m, s in zip(sets["cw_mean"], sets["cw_std"])]})
            lines += ["", "Teacher sets, sorted by max pair score:", "",
                      _table(show.sort_values("max pair").reset_index(drop=True))]
    return lines + [""]


def _tuning_lines(tuning: Mapping[str, Any]) -> list[str]:
    """The grid each method was given, every setting's validation accuracy, and the choice."""
    attack = tuning["attack"]
    lines = ["## Tuning", "",
             f"Every tuned method got the same small grid; each setting trained one student (the method's first "
             f"run and seed) on the training images less {tuning['validation_images']} held out, and the setting "
             f"with the best validation {attack} was chosen (ties: the first). The test set played no part. Every "
             "student of the method below ran its chosen setting.", "",
             f"| method | run | setting | validation clean | validation {attack} | chosen |", "|---|---|---|---|---|---|"]
    for method, e in tuning["methods"].items():
        for j, setting in enumerate(e["settings"]):
            shown = ", ".join(f"{k}={v}" for k, v in setting.items()) or "(defaults)"
            lines.append(f"| {method} | {e['run']} | {shown} | {e['validation_clean'][j]:.3f} | "
                         f"{e[f'validation_{attack}'][j]:.3f} | {'yes' if j == e['chosen_index'] else ''} |")
    return lines + [""]


def write_report(out: Path, cfg: Mapping[str, Any], rec: Mapping[str, Any], students: pd.DataFrame,
                 command: Sequence[str], claim: Mapping[str, Any] | None = None,
                 tuning: Mapping[str, Any] | None = None, progress: Mapping[str, Any] | None = None) -> Path:
    """Write ``report.md`` (and the PNG/CSV files it shows) into ``out``: one function per section;
    ``progress`` with students missing (:func:`distill.pipeline.runner.study_progress`) marks it interim."""
    matrix_dir = out / "matrix"
    for name in ("transfer_matrix.csv", "models.csv", "transfer_heatmap.png", "transfer_long.csv"):
        if (matrix_dir / name).is_file():
            _atomic_copy(matrix_dir / name, out / name)
    if (out / "recommendation_low.png").is_file():
        _atomic_copy(out / "recommendation_low.png", out / "recommendation.png")
    models = pd.read_csv(out / "models.csv") if (out / "models.csv").is_file() else None
    summary = summarize_students(students)
    atomic_write_text(out / "students_summary.csv", summary.to_csv(index=False))
    robust_col = next((c for c in ("autoattack_acc", "pgd20_acc", "cw_acc", "fgsm_acc")
                       if c in students.columns and students[c].notna().any()), "clean_acc")
    plot_robustness_vs_accuracy(students, out / "robustness_vs_accuracy.png", robust_col)
    curves = plot_training_curves({rid: out / "students" / rid for rid in students["id"]}, out / "training_curves.png")

    acc = models.set_index("model") if models is not None else None
    lines = _intro_lines(cfg, command) + _interim_lines(progress) + _pool_lines(cfg, acc) + _matrix_lines() \
        + _sets_lines(rec)
    student_lines, unconverged = _students_lines(cfg, students, summary, curves is not None)
    lines += (_tuning_lines(tuning) if tuning else []) + student_lines + _findings_lines(summary, students, rec, acc, robust_col, unconverged, claim)
    if claim is not None:
        lines += _claim_lines(claim, out)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _interim_lines(progress: Mapping[str, Any] | None) -> list[str]:
    """The warning of a report written while students are still to train (nothing when none are).

    Example:
        >>> _interim_lines({"finished": 1, "planned": 3, "missing": ["a-s1", "a-s2"]})[0][:40]
        '**Interim report: 1 of 3 students have f'
    """
    if not progress or not progress["missing"]:
        return []
    missing = progress["missing"]
    shown = ", ".join(f"`{m}`" for m in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    return [f"**Interim report: {progress['finished']} of {progress['planned']} students have finished.** "
            f"Every table, plot and statement below is over the finished students only and will change; the "
            f"claim's verdict is not drawn until all have finished. Still to train: {shown}. Continue the study "
            "with the command above and `--resume`.", ""]


def _intro_lines(cfg: Mapping[str, Any], command: Sequence[str]) -> list[str]:
    import shlex

    lines = [f"# Study: {cfg['study']}", ""]
    if cfg.get("description"):
        lines += [str(cfg["description"]).strip(), ""]
    lines += ["Reproduce with:", "", "```bash", shlex.join(command), "```", "",
              f"Dataset `{cfg['dataset']}`, ε = {cfg['eps']} ({cfg['eps_value']:.4f}) for teacher training, the "
              f"matrix, the students and the evaluation; training subset: {cfg['train_subset'] or 'all'} images "
              f"(seeded, class-balanced); seed {cfg['seed']}.", ""]

    return lines


def _pool_lines(cfg: Mapping[str, Any], acc: pd.DataFrame | None) -> list[str]:
    lines = ["## Pool", ""]
    pool_rows = []
    for spec in cfg["pool"]:
        t = spec.get("train")
        row = {"model": spec["name"], "arch": spec["arch"], "family": spec.get("family") or "-",
               "training": f"{t['method']} x{t['epochs']} ep, eps {t['eps_value']:g}" if t else
               (spec.get("training") or "given checkpoint")}
        if acc is not None and spec["name"] in acc.index:
            row["params"] = int(acc.loc[spec["name"], "params"])
            row["clean_acc"] = float(acc.loc[spec["name"], "clean_acc"])
            row["whitebox_robust_acc"] = float(acc.loc[spec["name"], "whitebox_robust_acc"])
        pool_rows.append(row)
    m = cfg["matrix"]
    lines += [_table(pd.DataFrame(pool_rows)), "",
              f"Clean and white-box robust accuracy ({m['attack']}, {m['steps']} steps) on the matrix's "
              f"{m['n_samples']} test images.", ""]

    return lines


def _matrix_lines() -> list[str]:
    return ["## Transferability", "",
            "`T[s, t]`: among images both models classify correctly and whose attack fools the source s, the "
            "fraction that also fools the target t (1 on the diagonal by definition; the heatmap's outlined "
            "diagonal is each model's white-box success rate). Files: `transfer_matrix.csv`, "
            "`transfer_long.csv` (with counts and 95% Wilson intervals).", "",
            "![transferability heatmap](transfer_heatmap.png)", ""]



def _sets_lines(rec: Mapping[str, Any]) -> list[str]:
    low, high = rec["low-transfer"], rec["high-transfer"]
    lines = ["## Teacher sets", "",
              f"k = {rec['k']}, pair score = {rec['pair']} of the two directions.", "",
              "| set | teachers | max pair | mean pair | mean robust acc | how |", "|---|---|---|---|---|---|",
              f"| low-transfer | {', '.join(low['sets'][0]['teachers'])} | {_fmt(low['sets'][0]['max_pair'])} | "
              f"{_fmt(low['sets'][0]['mean_pair'])} | {_fmt(low['sets'][0]['mean_robust_acc'])} | "
              f"{low['objective']}, exact: {low['exact']} |",
              f"| high-transfer | {', '.join(high['sets'][0]['teachers'])} | {_fmt(high['sets'][0]['max_pair'])} | "
              f"{_fmt(high['sets'][0]['mean_pair'])} | {_fmt(high['sets'][0]['mean_robust_acc'])} | "
              f"{high['objective']} (highest first), exact: {high['exact']} |"]
    for fam, r in rec["homogeneous"].items():
        s = r["sets"][0]
        lines.append(f"| homogeneous ({fam}) | {', '.join(s['teachers'])} | {_fmt(s['max_pair'])} | "
                     f"{_fmt(s['mean_pair'])} | {_fmt(s['mean_robust_acc'])} | best within the family |")
    lines.append(f"| single | {rec['single']['teacher']} | - | - | {_fmt(rec['single']['whitebox_robust_acc'])} | "
                 "highest white-box robust accuracy |")
    lines += ["", "![recommendation graph](recommendation.png)", ""]

    return lines


def _students_lines(cfg: Mapping[str, Any], students: pd.DataFrame, summary: pd.DataFrame,
                    curves: bool) -> tuple[list[str], set[str]]:
    """The students section, and the labels of the students that did not converge."""
    s = cfg["students"]
    ev = cfg["evaluation"]
    per_run_attacks = sorted({a for r_ in s["runs"] for a in (r_.get("attacks") or [])})
    lines = ["## Students", "",
              f"All students: `{' / '.join(s['archs'])}` {s['kwargs'] or ''}, the same data"
              + (f" ({s['train_subset']} seeded class-balanced training images)" if s["train_subset"] else "")
              + f"; seeds {s['seeds']}. The reported model is the last epoch's (no selection on "
              f"the test set). Evaluation on {ev['n_samples']} test images (seeded, class-balanced, the same for every "
              f"student): {', '.join(ev['attacks'])}"
              + "".join(f"; {a} on a nested class-balanced {n} of them (the same for every student that runs it; its "
                        f"column is over those {n})" for a, n in ev["attack_samples"].items()) + "."
              + (" Runs with their own attack list: " + "; ".join(f"{r_['label']}: {', '.join(r_['attacks'])}"
                                                                  for r_ in s["runs"] if r_.get("attacks"))
                 + "." if per_run_attacks else ""), "",
              "Training protocol" + (" (the study's `training:` section, overriding each method's reference "
                                     "defaults)" if cfg.get("training") else
                                     " (each method's reference defaults scaled to the study's epochs)") + ":", ""]
    lines += protocol_lines(students) + [""]
    unconverged = set()
    if "converged" in students.columns:
        bad = students[~students["converged"].astype(bool)]
        unconverged = set(bad["label"])
        if len(bad):
            lines += ["**Not converged** (test PGD accuracy moved by 3 points or more over the last two epochs; "
                      "no conclusion below is drawn from these labels): "
                      + ", ".join(f"{r.id} ({_fmt(r.pgd_change_last_epochs)})" for r in bad.itertuples()) + ".", ""]
        else:
            who = "The student" if len(students) == 1 else f"Every one of the {len(students)} students"
            lines += [f"{who} converged (test PGD accuracy moved by less than 3 points over the last two epochs).", ""]
    one_seed = bool(len(summary)) and int(summary["seeds"].max()) == 1
    lines += ["One seed per student, so no spread over seeds:" if one_seed else "Mean ± standard deviation over seeds:",
              ""]
    table = []
    for row in summary.itertuples():
        r = {"student": row.label, "teachers": row.teachers or "-", "seeds": row.seeds}
        for c in _ACC:
            if f"{c}_mean" in summary.columns:
                mean, std = getattr(row, f"{c}_mean"), getattr(row, f"{c}_std")
                r[c.replace("_acc", "")] = f"{mean:.3f} ± {std:.3f}" if not math.isnan(std) else f"{mean:.3f}"
        table.append(r)
    lines += [_table(pd.DataFrame(table)), "", "Per seed: `students.csv`.", "",
              "![robustness vs accuracy](robustness_vs_accuracy.png)", ""]
    if curves:
        lines += ["![training curves](training_curves.png)", ""]

    return lines, unconverged


ANCHOR = "darht-low-transfer"


def comparison_sentences(summary: pd.DataFrame, robust_col: str, unconverged: set[str]) -> list[str]:
    """The comparisons of "what the numbers show": the converged low-transfer DARHT student against
    every other converged named student, or one sentence saying why there is nothing to compare.

    Example:
        >>> one = pd.DataFrame({"label": ["darht-low-transfer"], "teacher_set": ["low-transfer"],
        ...                     "pgd20_acc_mean": [0.5], "pgd20_acc_std": [0.01]})
        >>> comparison_sentences(one, "pgd20_acc", set())  # doctest: +NORMALIZE_WHITESPACE
        ['- darht-low-transfer is the only student here: there is nothing to compare it with (the study
        configs add the high-transfer, homogeneous and single-teacher students and the baselines).']
    """
    labels = list(summary["label"])
    sets = summary.set_index("label")["teacher_set"]
    others = [lab for lab in labels if lab != ANCHOR and lab not in unconverged and sets[lab] != "sampled"]
    if ANCHOR in labels and ANCHOR in unconverged:
        return [f"- The {ANCHOR} student did not converge, so the others are not compared with it."]
    if ANCHOR not in labels:
        kinds = ", ".join(labels)
        return [f"- No {ANCHOR} student in this study ({kinds}): the comparisons below it are not made."]
    if not others:
        alone = "the only student here" if len(labels) == 1 else "the only named student here"
        return [f"- {ANCHOR} is {alone}: there is nothing to compare it with (the study configs add the "
                "high-transfer, homogeneous and single-teacher students and the baselines)."]
    out = []
    for other in [lab for lab in others if lab.startswith("darht-")] + [lab for lab in others
                                                                         if not lab.startswith("darht-")]:
        for col in (robust_col, "clean_acc"):
            sentence = _compare(summary, ANCHOR, other, col)
            if sentence:
                out.append(sentence)
    return out


def _findings_lines(summary: pd.DataFrame, students: pd.DataFrame, rec: Mapping[str, Any], acc: pd.DataFrame | None,
                    robust_col: str, unconverged: set[str], claim: Mapping[str, Any] | None) -> list[str]:
    """What the numbers show: the sets' scores, weak models, each comparison, the claim, masking flags."""
    low, high = rec["low-transfer"], rec["high-transfer"]
    lines = ["## What the numbers show", ""]
    labels = list(summary["label"])
    statements = []
    ls, hs = low["sets"][0], high["sets"][0]
    statements.append(f"- The low-transfer set ({', '.join(ls['teachers'])}) has worst pair score {ls['max_pair']:.3f} "
                      f"against {hs['max_pair']:.3f} for the high-transfer set ({', '.join(hs['teachers'])}).")
    if acc is not None:
        weak = [f"{n} ({acc.loc[n, 'clean_acc']:.2f})" for n in acc.index
                if float(acc.loc[n, "clean_acc"]) < 0.5]
        if weak:
            statements.append("- Weak pool models (clean accuracy below 0.5): " + ", ".join(weak) + ". Transfer rates "
                              "to and from them rest on few images (see `n` in `transfer_long.csv`), and a set that "
                              "contains them may be low-transfer because they are weak, not because they are diverse.")
    statements += comparison_sentences(summary, robust_col, unconverged)
    lines += statements
    if claim is not None and claim["verdict"] != "not tested":
        lines += ["", f"The claim, tested over every converged DARHT student (next section): **{claim['verdict']}**."]
    elif "darht-low-transfer" in labels and "darht-high-transfer" in labels \
            and not {"darht-low-transfer", "darht-high-transfer"} & unconverged:
        ra = summary.set_index("label")
        d = ra.loc["darht-low-transfer", f"{robust_col}_mean"] - ra.loc["darht-high-transfer", f"{robust_col}_mean"]
        lines += ["", ("The paper's claim (a low-transfer teacher set gives a more robust student than a "
                       "high-transfer one) " + ("holds here" if d > 0 else "does not hold here") +
                       f" on {robust_col.replace('_acc', '')} accuracy (difference {d:+.3f}); see the seed spread "
                       "above before reading much into it.")]
    flagged = students[students.get("flags", pd.Series([""] * len(students))).fillna("") != ""] \
        if "flags" in students else students.iloc[0:0]
    if len(flagged):
        lines += ["", "Gradient-masking flags raised by the evaluation (the robust accuracies of these students are "
                  "upper bounds, not estimates):", ""]
        for r in flagged.itertuples():
            lines.append(f"- {r.label} seed {r.seed}: {r.flags}")
    lines.append("")
    return lines

"""Study configs for ``darht pipeline``: schema, defaults, validation and the plan a dry run prints.

A study config is one YAML file (see ``experiments/configs/``)::

    study: fashion-mnist          # a name for the report
    dataset: fashion-mnist        # any --dataset value
    seed: 0
    eps: 0.1                      # the budget everywhere (teacher training, matrix, students, evaluation)
    train_subset: 10000           # seeded class-balanced training images for every training stage (null: all)
    pool:                         # pool entries (the pool schema of docs/design.md) plus `train:` for teachers made here
      - {name: cnn_a, arch: resnet18_cifar, kwargs: {width: 16}, family: cnn,
         train: {method: fast-at, epochs: 3}}
    matrix: {n_samples: 1000, attack: pgd, steps: 10}
    recommend: {k: 3, objective: minimax, pair: max}
    students:
      arch: resnet18_cifar
      kwargs: {width: 16}
      epochs: 5
      seeds: [0, 1]
      runs:
        - {method: darht, teacher_set: low-transfer}
        - {method: pgd-at, teacher_set: none}
    evaluation: {n_samples: 1000, attacks: [clean, fgsm, pgd20, cw, autoattack]}

``students.tune`` gives methods the same small grid (at most :data:`MAX_TUNE_SETTINGS` settings of
the method's options each, e.g. ``{darht: [{kd_weight: 1}, {kd_weight: 4}], rslad: [...]}``), and
``students.validation`` the images held out of the students' training data to choose on: each
setting trains one student (the method's first run, the first seed) on the rest, the setting with
the best validation PGD-20 is chosen (ties: the first), and every student of that method runs it.
The test set plays no part in the choice. With ``validation`` set, every student (tuned or not)
trains without the held-out images, so all methods see the same data.

``students.train_subset`` (default: the study's ``train_subset``) trains the students on a smaller
seeded class-balanced part of the training set; ``evaluation.attack_samples`` (e.g.
``{autoattack: 200}``) runs an expensive attack on a nested class-balanced part of the
``n_samples`` evaluation images (see :func:`distill.evaluation.evaluate_robustness`).

Every mistake is a :class:`~transfer_analysis.errors.UserError` naming the key.

Example:
    >>> cfg = validate_study_config({"dataset": "synthetic", "pool": [
    ...     {"name": "a", "arch": "resnet18_cifar", "train": {"epochs": 1}},
    ...     {"name": "b", "arch": "resnet18_cifar", "train": {"epochs": 1}}],
    ...     "recommend": {"k": 2}, "students": {"arch": "resnet18_cifar",
    ...     "runs": [{"method": "darht", "teacher_set": "low-transfer"}]}})
    >>> cfg["students"]["seeds"], cfg["matrix"]["attack"]
    ([0], 'pgd')
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transfer_analysis.checks import as_int, as_number, ema_decay
from transfer_analysis.errors import UserError
from transfer_analysis.models import parse_pool_entries
from transfer_analysis.models.entry import check_robustbench_spec, map_entry_paths
from transfer_analysis.utils import parse_eps, read_yaml

__all__ = ["TEACHER_SETS", "NAMED_SETS", "DEFAULTS", "TRAINING_DEFAULTS", "PROTOCOL_KEYS", "MAX_TUNE_SETTINGS",
           "load_study_config",
           "with_overrides",
           "validate_study_config", "student_runs", "student_train_config", "describe_plan"]

TEACHER_SETS = ("low-transfer", "high-transfer", "homogeneous", "single", "none", "custom", "sampled")
#: the teacher sets a study names (everything but ``sampled`` and ``custom``); sampled sets never repeat them
NAMED_SETS = ("low-transfer", "high-transfer", "homogeneous")

#: ``training:``, the one protocol every student of a study runs (overrides the methods' reference
#: defaults). ``None``: required. ``kl_reduction`` applies to every method with a KL ``reduction``
#: option (ARD, RSLAD, MTARD, KD); ``null`` keeps each method's own.
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": None, "lr": None, "weight_decay": None, "milestones": None, "batch_size": None,
    "momentum": 0.9, "optimizer": "sgd", "lr_schedule": "step", "gamma": 0.1, "nesterov": False,
    "warmup_epochs": 0.0, "kl_reduction": None,
}
#: the protocol keys a study reports for every student (``set_study.csv`` columns and the report's table)
PROTOCOL_KEYS = ("epochs", "lr", "lr_schedule", "milestones", "gamma", "weight_decay", "batch_size", "momentum",
                 "optimizer")

DEFAULTS: dict[str, Any] = {
    "study": None,
    "description": None,
    "dataset": None,
    "data_root": None,
    "seed": 0,
    "eps": "8/255",
    "batch_size": 128,
    "train_subset": None,
    "pool": [],
    "training": None,
    "teacher_training": {"method": "pgd-at", "epochs": 10, "lr": 0.1, "ema": None},
    "matrix": {"n_samples": 1000, "attack": "pgd", "steps": 10, "step_size": None, "batch_size": 256},
    "recommend": {"k": 3, "objective": "minimax", "pair": "max", "high_objective": "mean"},
    "students": {"arch": None, "kwargs": {}, "epochs": 10, "lr": 0.1, "seeds": [0], "runs": [],
                 "method_kwargs": {}, "eval_samples": 500, "train_subset": None, "ema": None, "tune": None,
                 "validation": None},
    "evaluation": {"n_samples": 1000, "attacks": ["clean", "fgsm", "pgd20", "cw", "autoattack"],
                   "batch_size": 256, "attack_samples": {}},
}
#: most settings ``students.tune`` may give one method (a small grid: equal tuning, not a search)
MAX_TUNE_SETTINGS = 4
_NEEDS = {"darht": "set", "ard": "one", "rslad": "one", "kd": "one", "mtard": "two",
          "pgd-at": "none", "trades": "none", "fast-at": "none", "standard": "none"}


def _check_keys(section: Mapping[str, Any], allowed: Mapping[str, Any] | set[str], where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{where}: unknown key {unknown[0]!r}{hint}; allowed: {', '.join(sorted(allowed))}")


def _merge(defaults: Mapping[str, Any], given: Any, where: str) -> dict[str, Any]:
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise UserError(f"{where} must be a mapping, got {type(given).__name__}")
    _check_keys(given, defaults, where)
    out = copy.deepcopy(dict(defaults))
    out.update(given)
    return out


def validate_study_config(raw: Any, source: str = "config") -> dict[str, Any]:
    """Fill defaults and check every key of a study config; return the resolved config.

    One function per section (pool, matrix, recommend, students, evaluation), called in that order.
    """
    if not isinstance(raw, Mapping):
        raise UserError(f"{source}: a study config is a mapping (see experiments/configs/quickstart.yaml)")
    cfg = _merge({k: v for k, v in DEFAULTS.items()}, {k: v for k, v in raw.items()}, source)
    for section in ("teacher_training", "matrix", "recommend", "students", "evaluation"):
        cfg[section] = _merge(DEFAULTS[section], raw.get(section), f"{source}: {section}")
    if not cfg["dataset"]:
        raise UserError(f"{source}: 'dataset' is required (a name such as fashion-mnist, or a .npz path)")
    cfg["eps_value"] = parse_eps(cfg["eps"], "eps")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise UserError(f"{source}: seed must be an integer >= 0, got {cfg['seed']!r}")
    as_int(cfg["batch_size"], f"{source}: batch_size", 1, exact=True)
    as_int(cfg["train_subset"], f"{source}: train_subset", 1, allow_none=True, exact=True)

    names, families = _check_pool_section(cfg, source)
    _check_matrix_section(cfg, source)
    k = _check_recommend_section(cfg, source, names)
    _check_students_section(cfg, source, names, families, k)
    cfg["training"] = _training_protocol(raw, cfg, source)
    _check_evaluation_section(cfg, source)
    _check_student_configs(cfg, source)
    return cfg


def _check_pool_section(cfg: dict[str, Any], source: str) -> tuple[list[str], dict[str, str | None]]:
    """``pool``: the pool schema (docs/design.md) plus ``train:`` (a teacher made here); the names and families."""
    if not isinstance(cfg["pool"], list) or not cfg["pool"]:
        raise UserError(f"{source}: 'pool' must be a non-empty list of models")
    trains: dict[str, dict[str, Any] | None] = {}
    stripped = []
    for i, entry in enumerate(cfg["pool"]):
        if not isinstance(entry, Mapping):
            raise UserError(f"{source}: pool model #{i + 1} must be a mapping")
        train = entry.get("train")
        if train is not None:
            train = _merge({"eps": None, "batch_size": None, "optimizer": "sgd", "weight_decay": None, "ema": None}
                           | cfg["teacher_training"],
                           train, f"{source}: pool model {entry.get('name')!r} train")
        stripped.append({k: v for k, v in entry.items() if k != "train"})
        trains[str(entry.get("name"))] = train
    entries = parse_pool_entries({"models": stripped}, f"{source}: pool")
    for e in entries:
        # a RobustBench model's weights are the zoo's (robustbench.model_dir), never trained or given here
        if e.source == "robustbench" and trains[e.name] is not None:
            raise UserError(f"{source}: pool model {e.name!r}: a RobustBench model is used as the zoo gives it; "
                            "'train:' does not apply")
        if trains[e.name] is None and not e.checkpoint and not e.pretrained and e.source != "robustbench":
            raise UserError(f"{source}: pool model {e.name!r} needs 'train:' (made here), 'checkpoint:' or "
                            "'pretrained: true' (or source: robustbench)")
        t = trains[e.name]
        if t is not None:
            if t["method"] not in ("standard", "fast-at", "pgd-at", "trades"):
                raise UserError(f"{source}: pool model {e.name!r}: train.method must be standard, fast-at, pgd-at "
                                f"or trades, got {t['method']!r}")
            as_int(t["epochs"], f"{source}: pool model {e.name!r} train.epochs", 1, exact=True)
            as_int(t["batch_size"], f"{source}: pool model {e.name!r} train.batch_size", 1, allow_none=True, exact=True)
            as_number(t["lr"], f"{source}: pool model {e.name!r} train.lr", strict=True)
            if t["weight_decay"] is not None:
                as_number(t["weight_decay"], f"{source}: pool model {e.name!r} train.weight_decay")
            if t["optimizer"] not in ("sgd", "adamw"):
                raise UserError(f"{source}: pool model {e.name!r} train.optimizer must be sgd or adamw, got "
                                f"{t['optimizer']!r}")
            t["ema"] = ema_decay(t["ema"], f"{source}: pool model {e.name!r} train.ema")
            t["eps_value"] = parse_eps(t["eps"], "eps") if t["eps"] is not None else cfg["eps_value"]
    cfg["pool"] = [{**e.to_dict(), **({"train": trains[e.name]} if trains[e.name] else {})} for e in entries]
    names = [e.name for e in entries]
    families = {e.name: e.family for e in entries}

    return names, families


def _check_matrix_section(cfg: dict[str, Any], source: str) -> None:
    """``matrix``: sample counts, steps and the attack the matrix stage will build."""
    m = cfg["matrix"]
    as_int(m["n_samples"], f"{source}: matrix.n_samples", 1, exact=True)
    as_int(m["steps"], f"{source}: matrix.steps", 1, exact=True)
    as_int(m["batch_size"], f"{source}: matrix.batch_size", 1, exact=True)
    if m["step_size"] is not None:
        parse_eps(m["step_size"], "matrix.step_size")
    from transfer_analysis.attacks import AttackConfig

    try:  # the attack the matrix stage will build: an unknown name is refused before any training
        AttackConfig(name=str(m["attack"]), eps=cfg["eps_value"], steps=m["steps"],
                     step_size=None if m["step_size"] is None else parse_eps(m["step_size"], "step_size")).resolved()
    except UserError as err:
        raise UserError(f"{source}: matrix.attack: {err}") from None


def _check_recommend_section(cfg: dict[str, Any], source: str, names: list[str]) -> int:
    """``recommend``: objectives, pair rule and k; returns k."""
    r = cfg["recommend"]
    for key in ("objective", "high_objective"):
        if r[key] not in ("minimax", "mean"):
            raise UserError(f"{source}: recommend.{key} must be minimax or mean, got {r[key]!r}")
    if r["pair"] not in ("max", "mean"):
        raise UserError(f"{source}: recommend.pair must be max or mean, got {r['pair']!r}")
    k = r["k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= len(names):
        raise UserError(f"{source}: recommend.k must be between 2 and the pool size ({len(names)}), got {k!r}")

    return k


def _check_students_section(cfg: dict[str, Any], source: str, names: list[str], families: dict[str, str | None],
                            k: int) -> None:
    """``students``: architectures, epochs, seeds and every run (a sampled run becomes n_sets runs)."""
    s = cfg["students"]
    archs = s["arch"] if isinstance(s["arch"], list) else [s["arch"]]
    if not archs or not all(isinstance(a, str) and a for a in archs) or len(set(archs)) != len(archs):
        raise UserError(f"{source}: students.arch is required: one architecture for every student, or a list of "
                        "distinct ones (each run is repeated for each)")
    s["archs"] = archs
    as_int(s["epochs"], f"{source}: students.epochs", 1, exact=True)
    if not isinstance(s["seeds"], list) or not s["seeds"] or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in s["seeds"]):
        raise UserError(f"{source}: students.seeds must be a non-empty list of integers >= 0, got {s['seeds']!r}")
    if len(set(s["seeds"])) != len(s["seeds"]):
        raise UserError(f"{source}: students.seeds repeats a seed ({s['seeds']}); two runs with one seed are one "
                        "run counted twice")
    if isinstance(s["eval_samples"], bool) or not isinstance(s["eval_samples"], int) or s["eval_samples"] < 0:
        raise UserError(f"{source}: students.eval_samples must be an integer >= 0, got {s['eval_samples']!r}")
    if not isinstance(s["runs"], list) or not s["runs"]:
        raise UserError(f"{source}: students.runs must list at least one {{method, teacher_set}}")
    runs: list[dict[str, Any]] = []
    for i, run in enumerate(s["runs"]):
        runs += _check_student_run(run, f"{source}: students.runs #{i + 1}", names, families, k, runs)
    labels = [r_["label"] for r_ in runs]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise UserError(f"{source}: students.runs has two runs labelled {dup[0]!r}; give one a 'label:'")
    s["runs"] = runs

    as_int(s["train_subset"], f"{source}: students.train_subset", 1, allow_none=True, exact=True)
    _check_tuning(s, source)


def _check_tuning(s: dict[str, Any], source: str) -> None:
    """``students.tune`` (method -> 1..MAX_TUNE_SETTINGS option mappings, methods the study runs) and
    ``students.validation`` (required with it)."""
    as_int(s["validation"], f"{source}: students.validation", 1, allow_none=True, exact=True)
    tune = s["tune"] or {}
    if not isinstance(tune, Mapping):
        raise UserError(f"{source}: students.tune maps methods to lists of settings, e.g. "
                        "{darht: [{kd_weight: 1}, {kd_weight: 4}]}")
    methods = [r["method"] for r in s["runs"]]
    for method, settings in tune.items():
        if method not in methods:
            raise UserError(f"{source}: students.tune.{method}: no run of the study uses {method} "
                            f"(runs: {', '.join(dict.fromkeys(methods))})")
        if not isinstance(settings, list) or not 1 <= len(settings) <= MAX_TUNE_SETTINGS or \
                not all(isinstance(v, Mapping) for v in settings):
            raise UserError(f"{source}: students.tune.{method} must list 1 to {MAX_TUNE_SETTINGS} settings, each a "
                            "mapping of the method's options")
    if tune and s["validation"] is None:
        raise UserError(f"{source}: students.tune needs students.validation, the number of training images held "
                        "out to choose on (the test set is never used to choose)")
    # None when untuned: a run started before tuning existed resumes (an unset option is the old behaviour)
    s["tune"] = {m: [dict(v) for v in settings] for m, settings in tune.items()} or None


def _check_student_run(run: Any, where: str, names: list[str], families: dict[str, str | None], k: int,
                       runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry of ``students.runs`` (``runs``: those before it), resolved; ``sampled`` gives n_sets runs."""
    if not isinstance(run, Mapping):
        raise UserError(f"{where} must be a mapping with method and teacher_set")
    _check_keys(run, {"method", "teacher_set", "family", "teachers", "label", "kwargs", "n_sets", "attacks"}, where)
    method = run.get("method")
    if method not in _NEEDS:
        close = difflib.get_close_matches(str(method), list(_NEEDS), n=1)
        raise UserError(f"{where}: unknown method {method!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; choose one of {', '.join(_NEEDS)}")
    tset = run.get("teacher_set", "none" if _NEEDS[method] == "none" else None)
    if tset not in TEACHER_SETS:
        raise UserError(f"{where}: teacher_set must be one of {', '.join(TEACHER_SETS)}, got {tset!r}")
    if (_NEEDS[method] == "none") != (tset == "none"):
        raise UserError(f"{where}: method {method} " + ("takes no teachers: use teacher_set: none"
                        if _NEEDS[method] == "none" else "needs teachers: teacher_set cannot be none"))
    if _NEEDS[method] == "one" and tset not in ("single", "custom"):
        raise UserError(f"{where}: method {method} distills from one teacher: use teacher_set: single or custom")
    if tset == "homogeneous":
        fam = run.get("family")
        if fam is None:
            raise UserError(f"{where}: teacher_set homogeneous needs 'family:' (one of "
                            f"{', '.join(sorted({f for f in families.values() if f}))})")
        members = [n for n in names if families[n] == fam]
        if len(members) < (k if _NEEDS[method] == "set" else 1):
            raise UserError(f"{where}: family {fam!r} has {len(members)} pool model(s), fewer than k = {k}")
    if tset == "custom":
        teachers = run.get("teachers")
        if not isinstance(teachers, list) or not teachers:
            raise UserError(f"{where}: teacher_set custom needs 'teachers: [names]'")
        missing = [t for t in teachers if t not in names]
        if missing:
            raise UserError(f"{where}: teachers {', '.join(map(str, missing))} are not in the pool")
        if len(set(teachers)) != len(teachers):  # what darht distill --teachers a,a refuses
            raise UserError(f"{where}: teachers names a teacher twice: {', '.join(map(str, teachers))}")
    attacks = run.get("attacks")
    if attacks is not None:
        from distill.evaluation import parse_attacks

        if not isinstance(attacks, list) or not attacks:
            raise UserError(f"{where}: attacks must be a non-empty list (it replaces evaluation.attacks "
                            "for this run)")
        try:
            attacks = parse_attacks(attacks)
        except UserError as err:
            raise UserError(f"{where}: attacks: {err}") from None
    if not isinstance(run.get("kwargs") or {}, Mapping):
        raise UserError(f"{where}: kwargs must be a mapping of the method's options")
    base = {"method": method, "teacher_set": tset, "family": run.get("family"),
            "teachers": run.get("teachers"), "kwargs": dict(run.get("kwargs") or {}), "attacks": attacks,
            "sample_index": None,
            "label": run.get("label") or (f"{method}-{tset}" + (f"-{run['family']}" if run.get("family")
                                                                 and tset == "homogeneous" else ""))}
    if tset == "sampled":
        if _NEEDS[method] != "set":
            raise UserError(f"{where}: teacher_set sampled draws sets of k teachers: only for darht")
        if any(r_["teacher_set"] == "sampled" for r_ in runs):
            raise UserError(f"{where}: only one run may use teacher_set sampled (raise its n_sets instead)")
        n_sets = as_int(run.get("n_sets"), f"{where}: n_sets (how many sets to draw)", 1, exact=True)
        width = len(str(n_sets))
        return [{**base, "sample_index": j, "label": f"{base['label']}-{j + 1:0{width}d}"} for j in range(n_sets)]
    else:
        if run.get("n_sets") is not None:
            raise UserError(f"{where}: n_sets is for teacher_set sampled only")
        return [base]


def _check_evaluation_section(cfg: dict[str, Any], source: str) -> None:
    """``evaluation``: sample counts, the attacks and the samples of each."""
    ev = cfg["evaluation"]
    as_int(ev["n_samples"], f"{source}: evaluation.n_samples", 1, exact=True)
    as_int(ev["batch_size"], f"{source}: evaluation.batch_size", 1, exact=True)
    if not isinstance(ev["attacks"], list) or not ev["attacks"]:
        raise UserError(f"{source}: evaluation.attacks must be a non-empty list")
    if ev["attack_samples"]:
        from distill.evaluation import check_attack_samples, parse_attacks

        attacks = ["clean", *parse_attacks(ev["attacks"])]
        try:
            ev["attack_samples"] = check_attack_samples(ev["attack_samples"], attacks)
        except UserError as err:
            raise UserError(f"{source}: evaluation.attack_samples: {err}") from None
    ev["attack_samples"] = dict(ev["attack_samples"] or {})


def _training_protocol(raw: Mapping[str, Any], cfg: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The study's ``training:`` section, filled and checked (``None`` when the study has none).

    With it, ``students.epochs``/``students.lr`` may not be set too (one place for the protocol);
    ``students.epochs``/``lr`` are then mirrored from it for the plan.
    """
    given = raw.get("training")
    if given is None:
        return None
    tr = _merge(TRAINING_DEFAULTS, given, f"{source}: training")
    for key in ("epochs", "lr", "weight_decay"):
        if tr[key] is None:
            raise UserError(f"{source}: training.{key} is required (training: is the protocol every student runs)")
    if tr["lr_schedule"] == "step" and tr["milestones"] is None:
        raise UserError(f"{source}: training.milestones is required with lr_schedule step (fractions of training, "
                        "e.g. [0.5, 0.75])")
    if tr["milestones"] is None:
        tr["milestones"] = []
    if tr["batch_size"] is None:
        tr["batch_size"] = cfg["batch_size"]
    if tr["kl_reduction"] not in (None, "batchmean", "mean"):
        raise UserError(f"{source}: training.kl_reduction must be batchmean, mean or null (each method's own), "
                        f"got {tr['kl_reduction']!r}")
    students = raw.get("students") or {}
    for key in ("epochs", "lr"):
        if isinstance(students, Mapping) and key in students:
            raise UserError(f"{source}: students.{key} and training: both set; the study's protocol is training:, "
                            f"drop students.{key}")
    cfg["students"]["epochs"], cfg["students"]["lr"] = tr["epochs"], tr["lr"]
    return tr


def student_train_config(cfg: Mapping[str, Any], run: Mapping[str, Any], teachers: list[str],
                         pool: str | None = None, device: str = "cpu",
                         setting: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``darht distill`` configuration of one student of a study: the one place that applies the
    study's protocol (``training:``, else ``students.epochs``/``lr`` and the methods' reference
    defaults), the method's hyperparameters and the student's evaluation.

    ``setting``: the method's tuned options (``students.tune``: the chosen one, or the one being
    tried); they override ``students.method_kwargs`` and are overridden by the run's own ``kwargs``.

    Example:
        >>> cfg = validate_study_config({"dataset": "synthetic", "pool": [
        ...     {"name": "a", "arch": "resnet18_cifar", "train": {"epochs": 1}},
        ...     {"name": "b", "arch": "resnet18_cifar", "train": {"epochs": 1}}],
        ...     "recommend": {"k": 2}, "training": {"epochs": 4, "lr": 0.05, "weight_decay": 5e-4,
        ...     "milestones": [0.5], "kl_reduction": "batchmean"}, "students": {"arch": "resnet18_cifar",
        ...     "runs": [{"method": "ard", "teacher_set": "single"}]}})
        >>> c = student_train_config(cfg, student_runs(cfg)[0], ["a"])
        >>> c["epochs"], c["milestones"], c["weight_decay"], c["method_kwargs"]
        (4, [0.5], 0.0005, {'reduction': 'batchmean'})
    """
    from distill.methods import get_method_class

    s, ev = cfg["students"], cfg["evaluation"]
    attacks = list(run.get("attacks") or ev["attacks"])
    method_kwargs = {**(s["method_kwargs"].get(run["method"]) or {}), **dict(setting or {}), **run["kwargs"]}
    config: dict[str, Any] = {
        "method": run["method"], "student": run["arch"], "student_kwargs": dict(s["kwargs"]),
        "dataset": cfg["dataset"], "data_root": cfg["data_root"], "pool": pool, "teachers": list(teachers),
        "eps": cfg["eps_value"], "eval_samples": s["eval_samples"], "final_attacks": attacks,
        "final_eval_samples": ev["n_samples"],
        "final_attack_samples": {a: n for a, n in ev["attack_samples"].items() if a in attacks},
        "eval_seed": cfg["seed"], "seed": run["seed"], "device": device, "ema": s["ema"],
    }
    tr = cfg.get("training")
    if tr is None:
        config.update(epochs=s["epochs"], lr=s["lr"], batch_size=cfg["batch_size"])
    else:
        config.update({k: tr[k] for k in ("epochs", "lr", "weight_decay", "milestones", "batch_size", "momentum",
                                           "optimizer", "lr_schedule", "gamma", "nesterov", "warmup_epochs")})
        fields = {f.name for f in dataclasses.fields(get_method_class(run["method"]))}
        if tr["kl_reduction"] is not None and "reduction" in fields and "reduction" not in method_kwargs:
            method_kwargs["reduction"] = tr["kl_reduction"]
    config["method_kwargs"] = method_kwargs
    return config


def _check_student_configs(cfg: Mapping[str, Any], source: str) -> None:
    """Resolve every student's training configuration and method (what a run would do first), so a
    bad value anywhere (``lr: abc``, an unknown method option) is refused before any work."""
    from distill.methods import create_method
    from distill.trainer import resolve_config

    seen = set()
    for run in student_runs(cfg):
        key = (run["method"], run["label"].rsplit("-", 1)[0] if run["teacher_set"] == "sampled" else run["label"])
        if key in seen:
            continue
        seen.add(key)
        for j, setting in enumerate((cfg["students"]["tune"] or {}).get(run["method"]) or [None]):
            conf = student_train_config(cfg, run, [], setting=setting)
            where = f"students.runs {run['label']!r}" + (f" with students.tune.{run['method']} #{j + 1}"
                                                         if setting is not None else "")
            try:
                resolved = resolve_config(conf)
                create_method(resolved.method, eps=resolved.eps, **resolved.method_kwargs)
            except UserError as err:
                raise UserError(f"{source}: {where}: {err}") from None
        images = cfg["students"]["train_subset"] or cfg["train_subset"]
        if images is not None and cfg["students"]["validation"] is not None:
            if cfg["students"]["validation"] >= images:
                raise UserError(f"{source}: students.validation ({cfg['students']['validation']}) leaves none of the "
                                f"{images} training images to train on")
            images -= cfg["students"]["validation"]
        if images is not None and resolved.batch_size > images:  # what the trainer refuses, said now
            raise UserError(f"{source}: students.runs {run['label']!r}: batch size {resolved.batch_size} exceeds the "
                            f"{images} training images; lower the batch size or raise the training subset")
    for spec in cfg["pool"]:
        train = spec.get("train")
        batch = (train or {}).get("batch_size") or cfg["batch_size"]
        if train is not None and cfg["train_subset"] is not None and batch > cfg["train_subset"]:
            raise UserError(f"{source}: pool model {spec['name']!r}: batch size {batch} exceeds the "
                            f"{cfg['train_subset']} training images (train_subset)")


def load_study_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read (safe loader) and validate a study config; pool paths (relative to the file) become absolute."""
    path = Path(path)
    raw = read_yaml(path, "config")
    cfg = validate_study_config(raw, str(path))
    for i, entry in enumerate(cfg["pool"]):
        if entry.get("source") == "robustbench":  # its default model_dir is relative to this file too
            entry["robustbench"] = check_robustbench_spec(entry.get("robustbench"), f"{path}: pool")
        # absolute: the run directory's pool.yaml names them relative to itself (see the runner), so a
        # path relative to the config file must not be read relative to the run directory
        cfg["pool"][i] = map_entry_paths(entry, lambda p: str((path.parent / os.path.expanduser(p)).resolve()))
    if cfg["study"] is None:
        cfg["study"] = path.stem
    return cfg


def with_overrides(cfg: dict[str, Any], *, ema: float | None = None) -> dict[str, Any]:
    """``cfg`` with the command line's study overrides applied: ``ema`` (``darht pipeline --ema``)
    replaces ``students.ema``, the moving-average decay of every student (``None``: the config's own).

    Example:
        >>> with_overrides({"students": {"ema": None}}, ema=0.99)["students"]["ema"]
        0.99
    """
    if ema is not None:
        cfg = copy.deepcopy(cfg)
        cfg["students"]["ema"] = ema_decay(ema, "ema")
    return cfg


def student_runs(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every (run, student architecture, seed) of the study, in order, with a directory-safe id.

    With several student architectures the architecture is part of the label.
    """
    archs = cfg["students"]["archs"]
    out = []
    for run in cfg["students"]["runs"]:
        for arch in archs:
            label = run["label"] if len(archs) == 1 else f"{run['label']}-{arch}"
            for seed in cfg["students"]["seeds"]:
                out.append({**run, "arch": arch, "label": label, "seed": seed, "id": f"{label}-s{seed}"})
    return out


def describe_plan(cfg: Mapping[str, Any]) -> list[str]:
    """The stages a run of ``cfg`` performs, one line each (what ``--dry-run`` prints)."""
    pool = cfg["pool"]
    trained = [p for p in pool if "train" in p]
    lines = [f"study {cfg['study']}: dataset {cfg['dataset']}, eps {cfg['eps']} ({cfg['eps_value']:.6f}), "
             f"seed {cfg['seed']}, training subset {cfg['train_subset'] or 'all'}"]
    lines.append(f"1. pool: {len(pool)} models in {len({p.get('family') for p in pool})} families; "
                 f"train {len(trained)} (" + ", ".join(f"{p['name']}: {p['train']['method']} x{p['train']['epochs']}"
                                                       for p in trained) + f"), load {len(pool) - len(trained)}")
    m = cfg["matrix"]
    lines.append(f"2. matrix: {m['attack']} ({m['steps']} steps) on {m['n_samples']} test images, "
                 f"{len(pool)} sources x {len(pool)} targets")
    r = cfg["recommend"]
    lines.append(f"3. recommend: k = {r['k']}, objective {r['objective']}, pair {r['pair']}; "
                 "low-transfer, high-transfer, per-family and best single teacher")
    s = cfg["students"]
    runs = student_runs(cfg)
    subset = f" on {s['train_subset']} training images" if s["train_subset"] else ""
    if s["validation"]:
        subset += f" ({s['validation']} of them held out for validation)"
    lines.append(f"4. students: {len(runs)} runs of {' and '.join(s['archs'])} x {s['epochs']} epochs{subset} ("
                 + ", ".join(r_["label"] for r_ in s["runs"]) + f"; seeds {s['seeds']})")
    if s["tune"]:
        lines.append(f"   tuning on {s['validation']} held-out training images by validation PGD-20, first run and "
                     f"seed of each method: " + "; ".join(f"{m} x{len(v)}" for m, v in s["tune"].items()))
    ev = cfg["evaluation"]
    parts = ", ".join(f"{a} on {ev['attack_samples'][a]} of them" for a in ev["attack_samples"])
    lines.append(f"5. evaluation: {', '.join(ev['attacks'])} on {ev['n_samples']} test images per student"
                 + (f" ({parts})" if parts else ""))
    lines.append("6. report: report.md with tables and plots")
    return lines

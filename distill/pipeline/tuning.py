"""Equal tuning (``students.tune``): the students' data less a validation split, one run per setting
evaluated on that split only, and the choice every student of the method then runs.

Example:
    >>> TUNING_FILE, TUNING_ATTACK
    ('tuning.json', 'pgd20')
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill.pipeline.config import student_runs, student_train_config
from transfer_analysis.errors import UserError
from transfer_analysis.utils import atomic_write_json

__all__ = ["TUNING_FILE", "TUNING_ATTACK", "student_data", "tuning_runs", "stage_tuning", "chosen_settings"]

def student_data(cfg: Mapping[str, Any], ds: Any, train_ds: Any) -> tuple[Any, Any]:
    """``(students' training data, validation data)``: ``students.train_subset`` (else the study's
    training images) without the ``students.validation`` held-out images, and a dataset whose test
    split is those images (``None`` without ``validation``). The one rule for a whole run and for
    array items."""
    s = cfg["students"]
    base = train_ds if s["train_subset"] is None else ds.with_train_subset(s["train_subset"], cfg["seed"])
    if s["validation"] is None:
        return base, None
    try:
        return base.holdout(s["validation"], seed=cfg["seed"])
    except UserError as err:
        raise UserError(f"students.validation: {err}") from None


#: the tuning's outcome in the run directory: every setting's validation PGD-20 and the choice
TUNING_FILE = "tuning.json"
#: what a setting is chosen by (on the validation images)
TUNING_ATTACK = "pgd20"


def tuning_runs(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One run per (method, setting) of ``students.tune``: the method's first student run (its first
    architecture and seed) with the setting, id ``tune-METHOD-J``."""
    runs = student_runs(cfg)
    out = []
    for method, settings in (cfg["students"]["tune"] or {}).items():
        first = next(r for r in runs if r["method"] == method)
        for j, setting in enumerate(settings):
            out.append({**first, "id": f"tune-{method}-{j + 1}", "setting": dict(setting), "setting_index": j})
    return out


def stage_tuning(cfg: Mapping[str, Any], out: Path, pool_path: Path, rec: Mapping[str, Any], val_ds: Any,
                  device: str, tracking: Mapping[str, Any] | None = None,
                  claims: Path | None = None) -> dict[str, Any]:
    """Train every setting of ``students.tune`` once, evaluated on the held-out validation images only,
    and choose per method the setting with the best validation PGD-20 (ties: the first). Writes and
    returns ``tuning.json``; each setting's run is kept under ``OUT/tuning/ID`` (resumable). With
    ``claims`` (a worker of ``--jobs``), train the unfinished settings no other worker has claimed and
    return ``{}`` (the parent chooses)."""
    import json

    from distill.pipeline.runner import _claim, _status, _teachers_for
    from distill.trainer import train
    from transfer_analysis.models import load_pool

    if not cfg["students"]["tune"]:
        return {}
    path = out / TUNING_FILE
    if path.is_file():
        return json.loads(path.read_text())
    pool = None
    results: dict[str, Any] = {}
    runs = tuning_runs(cfg)
    for i, run in enumerate(runs):
        teachers = _teachers_for(run, rec)
        run_dir = out / "tuning" / run["id"]
        if claims is not None and ((run_dir / "metrics.json").is_file() or not _claim(claims, run["id"])):
            continue
        if not (run_dir / "metrics.json").is_file():
            if teachers and pool is None:
                pool = load_pool(pool_path, val_ds.num_classes, val_ds.in_chans, val_ds.image_size)
            _status("tuning", f"{run['id']} ({i + 1}/{len(runs)}): {run['method']} {run['setting']}")
            config = {**student_train_config(cfg, run, teachers, pool=str(pool_path), device=device,
                                             setting=run["setting"]),
                      # evaluated on the validation images (val_ds's test split): the one tuning metric
                      "final_attacks": ["clean", TUNING_ATTACK], "final_eval_samples": None,
                      "final_attack_samples": {}, **dict(tracking or {})}
            train(config, run_dir, resume=(run_dir / "config.yaml").is_file(), dataset=val_ds,
                  teachers={n: pool[n] for n in teachers} if teachers else None)
        if claims is not None:
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        entry = results.setdefault(run["method"], {"run": run["label"], "seed": run["seed"], "settings": [],
                                                   f"validation_{TUNING_ATTACK}": [], "validation_clean": []})
        entry["settings"].append(run["setting"])
        entry[f"validation_{TUNING_ATTACK}"].append(metrics["accuracy"][TUNING_ATTACK])
        entry["validation_clean"].append(metrics["accuracy"]["clean"])
    if claims is not None:
        return {}
    for method, entry in results.items():
        scores = entry[f"validation_{TUNING_ATTACK}"]
        best = max(range(len(scores)), key=lambda j: (round(scores[j], 9), -j))
        entry["chosen_index"], entry["chosen"] = best, entry["settings"][best]
        _status("tuning", f"{method}: chose {entry['chosen']} (validation {TUNING_ATTACK} {scores[best]:.4f})")
    tuning = {"validation_images": int(len(val_ds.y_test)), "attack": TUNING_ATTACK, "methods": results}
    atomic_write_json(path, tuning)
    return tuning


def chosen_settings(cfg: Mapping[str, Any], out: Path) -> dict[str, dict[str, Any]]:
    """method -> its chosen ``students.tune`` setting, from ``tuning.json`` (refused when the study
    tunes and the tuning has not run)."""
    import json

    if not cfg["students"]["tune"]:
        return {}
    path = out / TUNING_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the study tunes its methods (students.tune); run the tuning first "
                        "(`only` tune, or the whole pipeline)")
    return {m: e["chosen"] for m, e in json.loads(path.read_text())["methods"].items()}

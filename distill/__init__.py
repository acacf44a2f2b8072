"""Distill robustness from a teacher set: DARHT, its baselines, teacher training, robust evaluation.

Public names are imported lazily (see ``_EXPORTS``).
"""

from __future__ import annotations

import importlib
from typing import Any

from transfer_analysis import __version__ as __version__  # the one version string (package metadata)

# public name -> submodule that defines it (filled in as the distillation modules land)
_EXPORTS: dict[str, str] = {
    "build_student": "student",
    "load_student": "student",
    "save_student": "student",
    "Student": "student",
    "StudentTeacherFeatureMap": "student",
    "darht_loss": "losses",
    "create_method": "methods",
    "list_methods": "methods",
    "register_method": "methods",
    "Method": "methods",
    "FrozenTeachers": "methods",
    "train": "trainer",
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "train_teacher": "teachers",
    "evaluate_robustness": "evaluation",
    "robust_accuracy": "evaluation",
    "accuracy": "evaluation",
    "per_sample_correct": "evaluation",
    "load_model": "evaluation.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

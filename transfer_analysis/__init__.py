"""Measure adversarial transferability across a pool of models and choose low-transfer teacher sets.

Public names are imported lazily, so ``import transfer_analysis`` is cheap and a command only pays
for what it uses.

Example:
    >>> from transfer_analysis import parse_eps
    >>> round(parse_eps("8/255"), 6)
    0.031373
"""

from __future__ import annotations

import importlib
from typing import Any

def _version() -> str:
    """The one version string: the installed distribution's (pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("darht-toolkit")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


__version__ = _version()

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "UserError": "errors",
    "parse_eps": "utils",
    "resolve_device": "runtime",
    "seed_everything": "runtime",
    "load_dataset": "data",
    "ImageDataset": "data",
    "balanced_subset": "data",
    "save_indices": "data",
    "load_indices": "data",
    "augment_batch": "data",
    "load_pool": "models",
    "read_pool_config": "models",
    "build_pool_model": "models",
    "PixelSpaceModel": "models",
    "PoolEntry": "models",
    "load_state_dict_file": "models",
    "LazyPool": "models",
    "open_pool": "models",
    "open_image_folder": "data",
    "FolderDataset": "data",
    "Objective": "selection",
    "PairRule": "selection",
    "TeacherSet": "selection",
    "Recommendation": "selection",
    "read_matrix": "selection",
    "read_models_csv": "selection",
    "validate_matrix": "selection",
    "pair_scores": "selection",
    "transfer_graph": "selection",
    "select_teachers": "selection",
    "select_teachers_by_family": "selection",
    "SelectionRequest": "selection",
    "write_recommendation": "selection",
    "render_transfer_graph": "graph_plot",
    "plot_transfer_graph": "graph_plot",
    "AttackConfig": "attacks",
    "build_attack": "attacks",
    "list_attacks": "attacks",
    "register_attack": "attacks",
    "LinfPGD": "attacks",
    "pgd_attack": "attacks",
    "attack_config": "attacks",
    "transfer_matrix": "matrix",
    "transfer_rows": "matrix",
    "TransferResult": "matrix",
    "wilson_interval": "matrix",
    "save_matrix_outputs": "matrix",
    "run_matrix": "matrix",
    "MatrixCache": "cache",
    "plot_heatmap": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

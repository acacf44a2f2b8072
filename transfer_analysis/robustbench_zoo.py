"""RobustBench model-zoo entries in a pool (``source: robustbench``), loaded without RobustBench's loader.

A pool entry::

    - name: carmon
      source: robustbench
      robustbench: {name: Carmon2019Unlabeled, dataset: cifar10, threat_model: Linf, model_dir: models}
      family: wrn

builds the zoo's architecture (``robustbench.model_zoo.model_dicts[BenchmarkDataset][ThreatModel][name]
["model"]()``) and reads ``model_dir/<dataset>/<threat_model>/<name>.pt`` with the toolkit's own safe
loader (``weights_only=True``; ``state_dict`` nesting and ``module.`` prefixes handled), never
through RobustBench's ``torch.load``. Zoo models take [0, 1] images and normalize inside, like the
toolkit's. Offline with no file there, the message names the path and the RobustBench call that
downloads it where there is a network.

Installing: RobustBench 1.1.1 pins ``timm==1.0.9`` and imports ``autoattack`` (shipped as
``pyautoattack``), ``gdown`` and ``pkg_resources`` (gone from setuptools >= 81) in its package
``__init__``. The toolkit only needs the zoo, so it imports ``robustbench.model_zoo`` without
running that ``__init__``, and the extra installs without its pins::

    pip install --no-deps "robustbench==1.1.1" geotorch torchdiffeq

Example:
    >>> checkpoint_path({"name": "Standard", "dataset": "cifar10", "threat_model": "Linf", "model_dir": "models"})
    PosixPath('models/cifar10/Linf/Standard.pt')
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .errors import UserError

__all__ = ["DATASETS", "THREAT_MODELS", "check_spec", "checkpoint_path", "zoo", "build_zoo_model"]

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions")
INSTALL = 'pip install --no-deps "robustbench==1.1.1" geotorch torchdiffeq'


def check_spec(spec: Any, where: str) -> dict[str, str]:
    """The ``robustbench:`` mapping of a pool entry, checked and filled (threat_model Linf, model_dir
    ``models`` by default)."""
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: source robustbench needs 'robustbench: {{name, dataset, threat_model, model_dir}}'")
    unknown = sorted(set(spec) - {"name", "dataset", "threat_model", "model_dir"})
    if unknown:
        raise UserError(f"{where}: robustbench has unknown key {unknown[0]!r}; allowed: name, dataset, threat_model, "
                        "model_dir")
    out = {"threat_model": "Linf", "model_dir": "models", **{k: v for k, v in spec.items() if v is not None}}
    for key in ("name", "dataset", "threat_model", "model_dir"):
        if not isinstance(out.get(key), str) or not out[key].strip():
            raise UserError(f"{where}: robustbench.{key} must be a non-empty string, got {out.get(key)!r}")
    if out["dataset"] not in DATASETS:
        raise UserError(f"{where}: robustbench.dataset must be one of {', '.join(DATASETS)}, got {out['dataset']!r}")
    if out["threat_model"] not in THREAT_MODELS:
        raise UserError(f"{where}: robustbench.threat_model must be one of {', '.join(THREAT_MODELS)}, got "
                        f"{out['threat_model']!r}")
    return out


def checkpoint_path(spec: Mapping[str, str]) -> Path:
    """``model_dir/<dataset>/<threat_model>/<name>.pt``: RobustBench's own layout."""
    return Path(spec["model_dir"]) / spec["dataset"] / spec["threat_model"] / f"{spec['name']}.pt"


def zoo() -> tuple[Any, Any, Any]:
    """``(model_dicts, BenchmarkDataset, ThreatModel)`` from ``robustbench.model_zoo``, imported
    without running RobustBench's package ``__init__`` (its autoattack, gdown and pkg_resources
    imports are not needed for the zoo)."""
    if "robustbench.model_zoo" not in sys.modules:
        spec = importlib.util.find_spec("robustbench")
        if spec is None or spec.submodule_search_locations is None:
            raise UserError(f"a pool entry has source robustbench but RobustBench is not installed; {INSTALL}")
        if "robustbench" not in sys.modules:
            skeleton = types.ModuleType("robustbench")
            skeleton.__path__ = list(spec.submodule_search_locations)
            skeleton.__spec__ = spec
            sys.modules["robustbench"] = skeleton
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as err:
        raise UserError(f"RobustBench's model zoo does not import ({err}); {INSTALL}") from err
    return model_dicts, BenchmarkDataset, ThreatModel


def build_zoo_model(spec: Mapping[str, str], trust: bool = False, load_weights: bool = True) -> nn.Module:
    """The zoo's architecture for ``spec`` with the weights of :func:`checkpoint_path` (safe loader)."""
    from .pool import apply_state_dict, load_state_dict_file

    model_dicts, dataset_enum, threat_enum = zoo()
    models = model_dicts[dataset_enum(spec["dataset"])][threat_enum(spec["threat_model"])]
    if spec["name"] not in models:
        import difflib

        close = difflib.get_close_matches(spec["name"], list(models), n=3)
        raise UserError(f"RobustBench has no {spec['dataset']}/{spec['threat_model']} model {spec['name']!r}"
                        + (f"; did you mean {', '.join(close)}?" if close else ""))
    model = models[spec["name"]]["model"]()
    if load_weights:
        path = checkpoint_path(spec)
        if not path.is_file():
            raise UserError(f"RobustBench checkpoint not found: {path}; put the file there (where there is a network, "
                            f"robustbench.utils.load_model(model_name={spec['name']!r}, dataset={spec['dataset']!r}, "
                            f"threat_model={spec['threat_model']!r}, model_dir={str(spec['model_dir'])!r}) downloads "
                            "it to that path)")
        apply_state_dict(model, load_state_dict_file(path, trust=trust), what=f"RobustBench checkpoint {path}")
    return model

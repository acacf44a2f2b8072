"""Pool entries: the YAML schema of a pool file, parsed and checked (the first step of an entry's road).

Schema (one entry per model)::

    models:
      - name: vit_a                     # unique: letters, digits, '_', '-', '.'
        arch: vit_tiny_patch16_224      # any name timm.create_model takes: a registry name (with or
                                        #   without a pretrained tag), hf-hub:ORG/NAME[@rev] or
                                        #   local-dir:PATH (timm's config.json + model.safetensors)
        kwargs: {img_size: 32, patch_size: 4}
        pretrained: false               # true = timm's weights and pretrained config (mean, std, input
                                        #   size, interpolation, crop); offline from the HF cache
        pretrained_file: null           # local weights for pretrained: true (offline use)
        num_classes: null               # N = a new N-class head on pretrained weights (fine-tuning);
                                        #   otherwise a pretrained head must fit the data's classes
        checkpoint: teachers/vit_a.safetensors   # relative to the YAML file; safetensors or torch
        checkpoint_key: null            # which state dict of a torch checkpoint (e.g. state_dict_ema)
        input_size: 32                  # default: the pretrained size, else the data's
        mean: [0.4914, 0.4822, 0.4465]  # default: the pretrained config's, else none (inputs in [0, 1])
        std: [0.2471, 0.2435, 0.2616]
        interpolation: bilinear         # resize inside forward (default: the pretrained config's)
        crop_pct: null                  # centre crop inside forward (see models.wrapper)
        family: transformer
        trust_checkpoint: false         # true = allow unpickling code for this file only

Example:
    >>> [e.name for e in parse_pool_entries({"models": [{"name": "r", "arch": "resnet18_cifar"}]})]
    ['r']
    >>> check_model_name("a,b", "pool")
    Traceback (most recent call last):
    ...
    transfer_analysis.errors.UserError: pool: model name 'a,b' must use letters, digits, '_', '-' or '.' (it names files and is selected by --models/--teachers, comma-separated)
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import read_yaml

__all__ = ["PoolEntry", "SOURCES", "MAX_INPUT_SIZE", "INTERPOLATIONS", "parse_pool_entries", "read_pool_config",
           "check_model_name", "check_robustbench_spec", "map_entry_paths", "ROBUSTBENCH_DATASETS",
           "ROBUSTBENCH_THREAT_MODELS"]

_KNOWN_KEYS = {
    "name", "arch", "kwargs", "checkpoint", "checkpoint_key", "pretrained", "pretrained_file", "num_classes",
    "input_size", "mean", "std", "interpolation", "crop_pct", "family", "trust_checkpoint", "training", "eps",
    "notes", "source", "robustbench",
}
#: where a pool model comes from: timm (registry, hf-hub:, local-dir:; the default) or RobustBench's zoo
SOURCES = ("timm", "robustbench")
#: largest input side a pool entry may resize to
MAX_INPUT_SIZE = 4096
#: resize modes inside the wrapper (timm's pretrained configs use bilinear and bicubic)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
ROBUSTBENCH_THREAT_MODELS = ("Linf", "L2", "corruptions")
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_model_name(name: Any, where: str) -> str:
    """The one name rule of pool models (entries, trained teachers): letters, digits, ``_ - .``.

    A name reaches file names (``NAME.safetensors``, cache keys), log lines and the comma-separated
    ``--models``/``--teachers`` lists, so commas, path separators, spaces and control characters
    are refused.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        shown = repr(name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "...")
        raise UserError(f"{where}: model name {shown} must use letters, digits, '_', '-' or '.' (it names files and "
                        "is selected by --models/--teachers, comma-separated)")
    return name


@dataclass
class PoolEntry:
    """One model of a pool file."""

    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    checkpoint_key: str | None = None
    pretrained: bool = False
    pretrained_file: str | None = None
    num_classes: int | None = None
    input_size: int | tuple[int, int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    family: str | None = None
    trust_checkpoint: bool = False
    training: str | None = None
    eps: float | str | None = None
    notes: str | None = None
    source: str = "timm"
    robustbench: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry as YAML-ready plain data, without empty fields."""
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
                if (v not in (None, {}, False) or k in ("name", "arch")) and not (k == "source" and v == "timm")}


def check_robustbench_spec(spec: Any, where: str) -> dict[str, str]:
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
    if out["dataset"] not in ROBUSTBENCH_DATASETS:
        raise UserError(f"{where}: robustbench.dataset must be one of {', '.join(ROBUSTBENCH_DATASETS)}, got "
                        f"{out['dataset']!r}")
    if out["threat_model"] not in ROBUSTBENCH_THREAT_MODELS:
        raise UserError(f"{where}: robustbench.threat_model must be one of {', '.join(ROBUSTBENCH_THREAT_MODELS)}, "
                        f"got {out['threat_model']!r}")
    return out


def _input_size(value: Any, where: str) -> int | tuple[int, int] | None:
    if value is None or (_is_int(value) and 0 < value <= MAX_INPUT_SIZE):
        return value
    if (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            and all(_is_int(v) and 0 < v <= MAX_INPUT_SIZE for v in value)):
        return tuple(value)
    raise UserError(f"{where}: input_size must be a positive integer (at most {MAX_INPUT_SIZE}) or [height, width], "
                    f"got {value!r}")


def _check_values(raw: Mapping[str, Any], where: str) -> None:
    """Types and ranges of an entry's scalar and list fields."""
    for key in ("mean", "std"):
        v = raw.get(key)
        if v is not None and (not isinstance(v, Sequence) or isinstance(v, str) or not v
                              or not all(_is_number(c) and math.isfinite(c) for c in v)):
            raise UserError(f"{where}: {key} must be a list of finite numbers, got {v!r}")
    if raw.get("std") is not None and any(c <= 0 for c in raw["std"]):
        raise UserError(f"{where}: std values must be positive, got {raw['std']!r}")
    for key in ("pretrained", "trust_checkpoint"):
        if key in raw and not isinstance(raw[key], bool):
            raise UserError(f"{where}: {key} must be true or false, got {raw[key]!r}")
    for key in ("checkpoint", "checkpoint_key", "pretrained_file", "family", "training", "notes"):
        if raw.get(key) is not None and not (isinstance(raw[key], str) and raw[key].strip()):
            raise UserError(f"{where}: {key} must be a non-empty string, got {raw[key]!r}")
    if raw.get("num_classes") is not None and not (_is_int(raw["num_classes"]) and raw["num_classes"] >= 2):
        raise UserError(f"{where}: num_classes must be an integer >= 2 (a new head of that many classes), got "
                        f"{raw['num_classes']!r}")
    if raw.get("interpolation") is not None and raw["interpolation"] not in INTERPOLATIONS:
        raise UserError(f"{where}: interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                        f"{raw['interpolation']!r}")
    crop = raw.get("crop_pct")
    if crop is not None and not (_is_number(crop) and 0.05 <= crop <= 1):
        raise UserError(f"{where}: crop_pct must be a number in [0.05, 1], got {crop!r}")
    if raw.get("pretrained_file") and not raw.get("pretrained"):
        raise UserError(f"{where}: pretrained_file needs pretrained: true")
    if raw.get("eps") is not None:
        from ..utils import parse_eps

        parse_eps(raw["eps"], f"{where}: eps")


def _parse_entry(raw: Any, i: int, source_name: str) -> PoolEntry:
    where = f"{source_name}: model #{i + 1}"
    if not isinstance(raw, Mapping):
        raise UserError(f"{where} must be a mapping with at least name and arch")
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        key = sorted(map(str, unknown))[0]
        close = difflib.get_close_matches(key, sorted(_KNOWN_KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"{where} has unknown key {key!r}{hint}; allowed: {', '.join(sorted(_KNOWN_KEYS))}")
    kind = raw.get("source", "timm")
    if kind not in SOURCES:
        raise UserError(f"{where}: source must be one of {', '.join(SOURCES)}, got {kind!r}")
    rb = None
    if kind == "robustbench":
        rb = check_robustbench_spec(raw.get("robustbench"), where)
        raw = {"arch": f"robustbench:{rb['name']}", **raw}
        for key in ("kwargs", "pretrained", "pretrained_file", "checkpoint", "mean", "std", "num_classes"):
            if raw.get(key):
                raise UserError(f"{where}: '{key}' does not apply to a RobustBench model (the zoo builds it, its "
                                "weights are robustbench.model_dir/<dataset>/<threat_model>/<name>.pt, and it "
                                "normalizes inside)")
    elif raw.get("robustbench") is not None:
        raise UserError(f"{where}: 'robustbench:' needs source: robustbench")
    for key in ("name", "arch"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise UserError(f"{where} needs a non-empty string '{key}'")
    name = check_model_name(raw["name"].strip(), where)
    where = f"{source_name}: model {name!r}"
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise UserError(f"{where}: kwargs must be a mapping, got {type(kwargs).__name__}")
    _check_values(raw, where)
    return PoolEntry(
        name=name, arch=raw["arch"].strip(), kwargs=dict(kwargs), checkpoint=raw.get("checkpoint"),
        checkpoint_key=raw.get("checkpoint_key"), pretrained=bool(raw.get("pretrained", False)),
        pretrained_file=raw.get("pretrained_file"), num_classes=raw.get("num_classes"),
        input_size=_input_size(raw.get("input_size"), where),
        mean=None if raw.get("mean") is None else [float(c) for c in raw["mean"]],
        std=None if raw.get("std") is None else [float(c) for c in raw["std"]],
        interpolation=raw.get("interpolation"),
        crop_pct=None if raw.get("crop_pct") is None else float(raw["crop_pct"]), family=raw.get("family"),
        trust_checkpoint=bool(raw.get("trust_checkpoint", False)), training=raw.get("training"),
        eps=raw.get("eps"), notes=raw.get("notes"), source=kind, robustbench=rb,
    )


def parse_pool_entries(data: Any, source: str = "pool") -> list[PoolEntry]:
    """Validate the parsed YAML of a pool file and return its entries (relative paths unchanged).

    ``source`` names the file (or config section) in every error; it is never confused with an
    entry's own ``source:`` key.
    """
    if not isinstance(data, Mapping) or "models" not in data:
        raise UserError(f"{source}: expected a mapping with a 'models:' list of entries (name, arch, ...)")
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise UserError(f"{source}: 'models' must be a non-empty list of entries")
    entries: list[PoolEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(models):
        entry = _parse_entry(raw, i, source)
        if entry.name in seen:
            raise UserError(f"{source}: duplicate model name {entry.name!r}; every name must be unique")
        seen.add(entry.name)
        entries.append(entry)
    return entries


def map_entry_paths(entry: Any, fn: Callable[[str], str]) -> Any:
    """``entry`` (a :class:`PoolEntry` or a mapping of one) with ``fn`` applied to every file path it
    names: ``checkpoint``, ``pretrained_file``, the folder of a ``local-dir:`` arch and a RobustBench
    ``model_dir``. The one list of an entry's paths, for whoever rebases them (a pool file, a study
    config, a run directory). A mapping comes back as a new dict, an entry as a new entry.

    Example:
        >>> map_entry_paths({"name": "m", "arch": "local-dir:w/vit", "checkpoint": "c.pt"}, lambda p: "/x/" + p)
        {'name': 'm', 'arch': 'local-dir:/x/w/vit', 'checkpoint': '/x/c.pt'}
    """
    is_map = isinstance(entry, Mapping)
    get = entry.get if is_map else (lambda key: getattr(entry, key))
    changes: dict[str, Any] = {}
    for key in ("checkpoint", "pretrained_file"):
        if get(key):
            changes[key] = fn(get(key))
    arch = get("arch")
    if isinstance(arch, str) and arch.startswith("local-dir:") and arch[len("local-dir:"):]:
        changes["arch"] = "local-dir:" + fn(arch[len("local-dir:"):])
    rb = get("robustbench")
    if isinstance(rb, Mapping) and rb.get("model_dir"):
        changes["robustbench"] = {**rb, "model_dir": fn(rb["model_dir"])}
    return {**entry, **changes} if is_map else replace(entry, **changes)


def read_pool_config(path: str | os.PathLike) -> list[PoolEntry]:
    """Read a pool YAML file (safe loader); checkpoint paths and ``local-dir:`` folders become
    relative to the file's folder."""
    path = Path(path)
    data = read_yaml(path, "pool file")

    def rebase(value: str) -> str:
        return value if Path(os.path.expanduser(value)).is_absolute() else str(path.parent / value)

    return [map_entry_paths(e, rebase) for e in parse_pool_entries(data, str(path))]

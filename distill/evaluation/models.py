"""The model that ``darht evaluate`` evaluates, from a run directory, a weights file or a pool.

Where the model comes from (one of):

- ``pool`` and ``name``: pool model NAME (resize and normalization as in the pool);
- ``model`` = a ``darht distill`` run directory: its ``student.safetensors``, rebuilt from the spec
  in its metadata, or from ``config.yaml`` (``resolved.student``, else ``student``,
  ``student_kwargs``, ``num_teachers``) for weights without one;
- ``model`` = a weights file with ``arch`` (and ``model_kwargs``): a plain timm model (no
  normalization), or, without ``arch``, the pool entry ``W.yaml`` written beside the weights by
  ``darht train-teacher``;
- ``model`` = ``hf-hub:ORG/NAME[@rev]`` or ``local-dir:PATH``: that pretrained timm model, as the
  pool entry ``{arch: MODEL, pretrained: true}`` builds it (its own size and normalization inside).

Example:
    >>> check_model_source(None, None, "vit_a")
    Traceback (most recent call last):
    ...
    transfer_analysis.errors.UserError: `name` selects a model of a pool; give `pool` too
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transfer_analysis.errors import UserError
from transfer_analysis.files import read_yaml

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["load_model", "check_model_source", "is_model_name", "load_run_student", "load_weights_model"]

logger = logging.getLogger("distill.evaluation")


def load_model(model: str | Path | None, pool: str | Path | None, name: str | None, *, num_classes: int,
               in_chans: int, image_size: int, device: torch.device, arch: str | None = None,
               model_kwargs: Mapping[str, Any] | None = None, trust: bool = False,
               sources: Sequence[str] = ()) -> tuple[nn.Module, str, dict[str, nn.Module]]:
    """The model to evaluate (eval mode, frozen, on ``device``), how to name it, and the pool models
    that ``transfer:NAME`` attacks craft on (``sources``), each loaded once.

    Raises:
        UserError: no model or two, a missing file, ``arch``/``model_kwargs`` with a run
            directory, ``name`` or ``sources`` without ``pool``.
    """
    check_model_source(model, pool, name, arch=arch, model_kwargs=model_kwargs, sources=sources)
    from transfer_analysis.models import load_pool

    model_path = Path(model) if model is not None else None
    names = ([name] if name is not None else []) + [s for s in sources if s != name]
    models = load_pool(pool, num_classes, in_chans, image_size, device, names=names) \
        if pool is not None and names else {}
    if name is not None:
        net, described = models[name], f"{pool}:{name}"
    elif is_model_name(model):
        from transfer_analysis.models import PoolEntry, build_pool_model

        entry = PoolEntry(name="model", arch=str(model), kwargs=dict(model_kwargs or {}), pretrained=True)
        net, described = build_pool_model(entry, num_classes, in_chans, image_size, device), str(model)
    elif model_path is not None and model_path.is_dir():
        net, described = load_run_student(model_path, num_classes, in_chans), str(model_path)
    else:
        assert model_path is not None
        net = load_weights_model(model_path, arch, dict(model_kwargs or {}), num_classes, in_chans, image_size,
                                 device, trust=trust)
        described = str(model_path)
    net.to(device).eval().requires_grad_(False)
    return net, described, {s: models[s] for s in sources}


def is_model_name(model: str | Path | None) -> bool:
    """Whether ``model`` is a timm hub or folder name (``hf-hub:...``, ``local-dir:...``), not a path.

    Example:
        >>> is_model_name("hf-hub:timm/resnet18.a1_in1k"), is_model_name("runs/darht_r18")
        (True, False)
    """
    return isinstance(model, str) and model.startswith(("hf-hub:", "local-dir:"))


def check_model_source(model: str | Path | None, pool: str | Path | None, name: str | None, *,
                       arch: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
                       sources: Sequence[str] = ()) -> None:
    """Refuse an impossible choice of model before anything is loaded (see :func:`load_model`)."""
    if name is not None and pool is None:
        raise UserError("`name` selects a model of a pool; give `pool` too")
    if model is not None and name is not None:
        raise UserError("give either `model` (a run directory or weights) or `pool` with `name`, not both")
    if model is None and name is None:
        raise UserError("nothing to evaluate: give `model` (a run directory or weights) or `pool` with `name`")
    if sources and pool is None:
        raise UserError(f"attack transfer:{sources[0]} needs `pool` holding model {sources[0]!r}")
    if model is not None and is_model_name(model):
        if arch is not None:
            raise UserError(f"`model` {model} names its architecture itself; drop `arch`")
    elif model is not None:
        path = Path(model)
        if not path.exists():
            raise UserError(f"`model` {path} not found; give a 'darht distill' run directory or a weights file")
        if path.is_dir() and (arch is not None or model_kwargs):
            raise UserError("`arch` and `model_kwargs` apply to a weights file; a run directory's config.yaml "
                            "already names the student")


def _student_spec_from_config(cfg_path: Path) -> dict[str, Any]:
    """The student's spec from a run's ``config.yaml``: ``resolved.student``, else the top-level keys."""
    cfg = read_yaml(cfg_path)
    if not isinstance(cfg, Mapping):
        raise UserError(f"{cfg_path} is not a mapping of settings; re-run 'darht distill' or pass a weights file")
    resolved = cfg.get("resolved")
    spec = resolved.get("student") if isinstance(resolved, Mapping) else None
    if isinstance(spec, Mapping) and isinstance(spec.get("arch"), str):
        return dict(spec)
    arch, kwargs = cfg.get("student"), cfg.get("student_kwargs") or {}
    if isinstance(arch, Mapping):  # tolerate {arch: ..., kwargs: ...}
        arch, kwargs = arch.get("arch"), arch.get("kwargs") or kwargs
    if not isinstance(arch, str) or not arch:
        raise UserError(f"{cfg_path} names no student architecture (key 'student'); is this a 'darht distill' run?")
    if not isinstance(kwargs, Mapping):
        raise UserError(f"{cfg_path}: student_kwargs must be a mapping, got {kwargs!r}")
    num_teachers = cfg.get("num_teachers", 0)
    if not isinstance(num_teachers, int) or isinstance(num_teachers, bool) or num_teachers < 0:
        raise UserError(f"{cfg_path}: num_teachers must be a non-negative integer, got {num_teachers!r}")
    return {"arch": arch, "kwargs": dict(kwargs), "num_teachers": num_teachers}


def load_run_student(run_dir: Path, num_classes: int, in_chans: int) -> nn.Module:
    """Rebuild the student of a ``darht distill`` run directory and load ``student.safetensors``.

    The student's spec (architecture, kwargs, teachers, normalization) comes from the weights'
    metadata (:func:`distill.student.load_student`); for weights without it, from the run's
    ``config.yaml`` (``resolved.student``, else ``student``, ``student_kwargs``, ``num_teachers``),
    built with :func:`distill.student.build_student`.
    """
    from safetensors import safe_open

    from transfer_analysis.models import apply_state_dict, load_state_dict_file

    weights = run_dir / "student.safetensors"
    cfg_path = run_dir / "config.yaml"
    if not weights.is_file():
        if not cfg_path.is_file():
            raise UserError(f"{run_dir} holds neither student.safetensors nor config.yaml; `model` takes a "
                            "'darht distill' run directory or a weights file")
        raise UserError(f"{weights} not found; the run has not finished (resume it with 'darht distill --resume')")
    try:
        from distill.student import STUDENT_METADATA_KEY, build_student, load_student
    except ImportError as err:
        raise UserError(f"cannot rebuild the student of {run_dir}: distill.student is not available in this "
                        "installation; evaluate a weights file (`model` W.safetensors with `arch`)") from err
    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as err:  # noqa: BLE001 - corrupt headers come as several exception types
        raise UserError(f"{weights} is not a valid safetensors file ({err}); re-create it") from err
    if STUDENT_METADATA_KEY in meta:
        logger.info("student from %s (spec in its metadata)", weights)
        return load_student(weights)
    if not cfg_path.is_file():
        raise UserError(f"{weights} carries no student spec and {run_dir} has no config.yaml; evaluate it with "
                        "`model` W.safetensors with `arch` instead")
    spec = _student_spec_from_config(cfg_path)
    if spec.get("num_classes") not in (None, num_classes):
        raise UserError(f"the student of {run_dir} has {spec['num_classes']} classes but the dataset has "
                        f"{num_classes}; evaluate it on the dataset it was trained on")
    model = build_student(spec["arch"], num_classes, spec.get("num_teachers") or 0,
                          in_chans=int(spec.get("in_chans") or in_chans), image_size=spec.get("image_size"),
                          input_size=spec.get("input_size"), mean=spec.get("mean"), std=spec.get("std"),
                          **dict(spec.get("kwargs") or {}))
    apply_state_dict(model, load_state_dict_file(weights), what=f"{weights}")
    logger.info("student %s (%d teachers) from %s", spec["arch"], spec.get("num_teachers") or 0, cfg_path)
    return model


def _entry_beside(weights: Path, yaml_path: Path):
    """The pool entry in ``yaml_path`` (a single entry, a list of entries or a pool file)."""
    from transfer_analysis.models import parse_pool_entries

    data = read_yaml(yaml_path)
    if isinstance(data, Mapping) and "models" not in data:
        data = {"models": [data]}
    elif isinstance(data, list):
        data = {"models": data}
    entries = parse_pool_entries(data, str(yaml_path))
    if len(entries) > 1:
        same = [e for e in entries if e.checkpoint and Path(e.checkpoint).name == weights.name]
        if len(same) != 1:
            raise UserError(f"{yaml_path} holds {len(entries)} models and none (or several) use {weights.name}; "
                            "use `pool` with `name` instead")
        entries = same
    return entries[0]


def load_weights_model(weights: Path, arch: str | None, model_kwargs: dict[str, Any], num_classes: int,
                       in_chans: int, image_size: int, device: torch.device, trust: bool = False) -> nn.Module:
    """A weights file as a pixel-space model: with ``arch`` a plain timm model, else the entry beside it."""
    from transfer_analysis.models import (PixelSpaceModel, apply_state_dict, build_pool_model, create_timm_model,
                                        load_state_dict_file, merge_implied_kwargs)

    if not weights.is_file():
        raise UserError(f"model weights not found: {weights}")
    yaml_path = weights.with_suffix(".yaml")
    if arch is None:
        if not yaml_path.is_file():
            raise UserError(f"`model` {weights} needs `arch` (and `model_kwargs`), or the pool entry "
                            f"{yaml_path.name} beside it as written by 'darht train-teacher'")
        entry = _entry_beside(weights, yaml_path)
        entry.checkpoint = str(weights)
        entry.trust_checkpoint = entry.trust_checkpoint or trust
        entry.kwargs = {**entry.kwargs, **model_kwargs}
        logger.info("model %s (%s) from %s", entry.name, entry.arch, yaml_path)
        return build_pool_model(entry, num_classes, in_chans, image_size, device)
    model_kwargs = merge_implied_kwargs(model_kwargs, "model_kwargs", num_classes=num_classes, in_chans=in_chans)
    net = create_timm_model(arch, num_classes=num_classes, in_chans=in_chans, image_size=image_size, **model_kwargs)
    apply_state_dict(net, load_state_dict_file(weights, trust=trust), what=f"{weights}")
    logger.info("model %s from %s (no normalization)", arch, weights)
    return PixelSpaceModel(net, name=weights.stem)

"""Where a pool model comes from: timm (registry names, ``hf-hub:``, ``local-dir:``) or RobustBench's zoo.

Every name ``timm.create_model`` takes is a model name here:

- a registry name, with or without a pretrained tag (``resnet50``, ``vit_base_patch16_224.augreg_in21k``),
  or one of the toolkit's CIFAR architectures (registered into timm, see ``models.archs``);
- ``hf-hub:ORG/NAME[@rev]``: a Hugging Face Hub repository in timm's format (``config.json`` and
  ``model.safetensors``); offline (``HF_HUB_OFFLINE=1``, or no route to the Hub) it is read from the
  Hugging Face cache (``HF_HOME/hub``) without a single network retry;
- ``local-dir:PATH``: a folder as ``timm.models.save_for_hf`` writes it.

:func:`pretrained_config` reads a model's pretrained configuration (mean, std, input size,
interpolation, crop, class count) without building it; :func:`create_timm_model` builds it.

Example:
    >>> cfg = pretrained_config("resnet18_cifar")
    >>> cfg["num_classes"], cfg["source"]
    (None, 'timm')
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import os
import socket
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError
from . import archs as _archs  # noqa: F401  (registers the CIFAR architectures into timm)
from .weights import apply_state_dict, load_state_dict_file

__all__ = ["HUB_PREFIX", "LOCAL_PREFIX", "pretrained_config", "create_timm_model", "hub_offline",
           "robustbench_zoo", "robustbench_checkpoint_path", "build_zoo_model", "ROBUSTBENCH_INSTALL"]

logger = logging.getLogger("transfer_analysis.models")

HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
ROBUSTBENCH_INSTALL = 'pip install --no-deps "robustbench==1.1.1" geotorch torchdiffeq'


# --------------------------------------------------------------------------------------------
# the Hugging Face Hub, online or from its cache
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _hub_resolves() -> bool:
    """Whether the Hub's host name resolves (a cheap test that saves huggingface_hub's five
    retries, about 50 s, on a machine without a network)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def hub_offline() -> bool:
    """True when weights and configs must come from the Hugging Face cache: ``HF_HUB_OFFLINE`` is
    set, or the Hub cannot be reached."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or not _hub_resolves()


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _split_rev(model_id: str) -> tuple[str, str | None]:
    repo, _, rev = model_id.partition("@")
    return repo, rev or None


def _cached_hub_folder(model_id: str, need_weights: bool, what: str) -> Path:
    """The snapshot folder of ``model_id`` in the Hugging Face cache (``config.json`` there, and the
    weights when ``need_weights``), or one line saying what is missing and the ways out."""
    from huggingface_hub import try_to_load_from_cache

    repo, rev = _split_rev(model_id)
    cfg = try_to_load_from_cache(repo, "config.json", revision=rev)
    missing = "config.json"
    if isinstance(cfg, str):
        folder = Path(cfg).parent
        if not need_weights or any((folder / f).is_file() for f in _WEIGHT_FILES):
            return folder
        missing = "model.safetensors"
    raise UserError(f"{what}: {missing} of hub id {model_id} is not in the Hugging Face cache {_hub_cache()} and the "
                    "Hub cannot be reached (offline); download it where there is a network (same HF_HOME), or "
                    "point the entry's pretrained_file: at a local weights file, or use local-dir:PATH")


def _hub_weights_file(hf_hub_id: str, filename: str | None, what: str) -> str:
    """A cached weights file of a registry model's ``hf_hub_id`` (offline use), or one line."""
    from huggingface_hub import try_to_load_from_cache

    repo, rev = _split_rev(hf_hub_id)
    for name in ([filename] if filename else list(_WEIGHT_FILES)):
        found = try_to_load_from_cache(repo, name, revision=rev)
        if isinstance(found, str):
            return found
    raise UserError(f"{what}: the pretrained weights (hub id {hf_hub_id}) are not in the Hugging Face cache "
                    f"{_hub_cache()} and the Hub cannot be reached (offline); download them where there is a network "
                    "(same HF_HOME), or set pretrained_file: PATH in the pool entry, or give a checkpoint")


def _resolve_name(arch: str, pretrained: bool, what: str) -> str:
    """``arch`` as timm should be given it now: ``hf-hub:`` names become their cached snapshot
    folder (``local-dir:``) when offline; a ``local-dir:`` folder is checked."""
    if arch.startswith(LOCAL_PREFIX):
        folder = Path(os.path.expanduser(arch[len(LOCAL_PREFIX):]))
        if not (folder / "config.json").is_file():
            raise UserError(f"{what}: {folder} is not a timm model folder (no config.json); write one with "
                            "timm.models.save_for_hf(model, folder, safe_serialization=True)")
        if pretrained and not any((folder / f).is_file() for f in _WEIGHT_FILES):
            raise UserError(f"{what}: {folder} has no model.safetensors for pretrained: true")
        return f"{LOCAL_PREFIX}{folder}"
    if arch.startswith(HUB_PREFIX):
        model_id = arch[len(HUB_PREFIX):]
        if not model_id:
            raise UserError(f"{what}: {arch!r} names no repository; use hf-hub:ORG/NAME")
        if hub_offline():
            return f"{LOCAL_PREFIX}{_cached_hub_folder(model_id, pretrained, what)}"
        return arch
    import timm

    if not timm.is_model(arch):
        if "/" in arch:
            raise UserError(f"{what}: {arch!r} is not a timm registry name; use hf-hub:{arch} for a Hub repository "
                            f"or local-dir:{arch} for a folder")
        raise UserError(f"{what}: unknown timm architecture {arch!r}{_suggest_arch(arch)}")
    return arch


def _suggest_arch(arch: str) -> str:
    import timm

    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models(), or use hf-hub:/local-dir:"


def pretrained_config(arch: str, what: str | None = None) -> dict[str, Any]:
    """The pretrained configuration of a timm model name, without building the model.

    Keys used by the toolkit: ``num_classes`` (the pretrained head's classes, ``None`` when the
    name has no pretrained weights), ``input_size`` ``(C, H, W)``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``, ``fixed_input_size``, ``source`` (``timm``, ``hf-hub`` or
    ``local-dir``), ``hf_hub_id``, ``architecture``.

    Example:
        >>> cfg = pretrained_config("resnet18.a1_in1k")
        >>> cfg["num_classes"], cfg["input_size"], cfg["interpolation"], cfg["hf_hub_id"]
        (1000, (3, 224, 224), 'bicubic', 'timm/resnet18.a1_in1k')
    """
    what = what or f"model {arch}"
    name = _resolve_name(arch, False, what)
    if name.startswith((LOCAL_PREFIX, HUB_PREFIX)):
        from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

        try:
            if name.startswith(LOCAL_PREFIX):
                cfg, base, _ = load_model_config_from_path(name[len(LOCAL_PREFIX):])
            else:
                cfg, base, _ = load_model_config_from_hf(name[len(HUB_PREFIX):])
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - hub and JSON failures come as many types
            raise UserError(f"{what}: cannot read the config of {arch} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from err
        out = dict(cfg)
        out["architecture"] = base
        out.setdefault("source", "hf-hub" if name.startswith(HUB_PREFIX) else "local-dir")
    else:
        import timm

        cfg = timm.models.get_pretrained_cfg(arch)
        out = cfg.to_dict() if cfg is not None else {}
        has_weights = bool(out.get("hf_hub_id") or out.get("url") or out.get("file"))
        out["num_classes"] = out.get("num_classes") if has_weights else None
        out["architecture"] = arch.split(".")[0]
        out["source"] = "timm"
    if out.get("input_size") is not None:
        out["input_size"] = tuple(int(v) for v in out["input_size"])
    return out


def create_timm_model(arch: str, num_classes: int | None, in_chans: int, pretrained: bool = False,
                      pretrained_file: str | None = None, image_size: int | tuple[int, int] | None = None,
                      **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for every timm name, with the toolkit's errors (unknown names,
    offline hubs without the files, bad kwargs), never a network retry when offline.

    For architectures with a fixed input size (ViT, MLP-Mixer...), ``img_size`` is set to
    ``image_size`` unless ``kwargs`` give it. ``num_classes=None`` keeps the model's own head
    (the pretrained one).

    Example:
        >>> create_timm_model("resnet18_cifar", num_classes=3, in_chans=1, width=4).num_classes
        3
    """
    what = f"model {arch}"
    name = _resolve_name(arch, pretrained, what)
    cfg = pretrained_config(arch, what)
    if image_size is not None and "img_size" not in kwargs and cfg.get("fixed_input_size", False):
        kwargs["img_size"] = image_size
    extra: dict[str, Any] = {}
    if pretrained and pretrained_file:
        if name.startswith((LOCAL_PREFIX, HUB_PREFIX)):
            raise UserError(f"{what}: pretrained_file applies to timm registry names; an hf-hub:/local-dir: model's "
                            "weights are its model.safetensors (in the folder, or the Hugging Face cache)")
        if not Path(os.path.expanduser(pretrained_file)).is_file():
            raise UserError(f"pretrained_file not found: {pretrained_file}")
        extra["pretrained_cfg_overlay"] = {"file": os.path.expanduser(pretrained_file)}
    elif pretrained and not name.startswith((LOCAL_PREFIX, HUB_PREFIX)) and hub_offline():
        if not (cfg.get("hf_hub_id") or cfg.get("file")):
            raise UserError(f"{what}: timm has no pretrained weights for {arch!r} on the Hugging Face Hub and the "
                            "network cannot be reached; set pretrained_file: PATH in the pool entry")
        if not cfg.get("file"):
            extra["pretrained_cfg_overlay"] = {"file": _hub_weights_file(cfg["hf_hub_id"], cfg.get("hf_hub_filename"),
                                                                          what)}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return _quiet_create(name, pretrained=pretrained, in_chans=in_chans, **extra, **kwargs)
    except UserError:
        raise
    except TypeError as err:
        raise UserError(f"{arch}: bad kwargs {_short(kwargs)}: {_first_line(err)}") from err
    except (RuntimeError, ValueError, OverflowError, MemoryError) as err:
        if pretrained:
            raise UserError(f"could not load the pretrained weights of {arch} ({type(err).__name__}: "
                            f"{_first_line(err)}); check the entry's kwargs, or set pretrained_file: PATH") from err
        raise UserError(f"could not build {arch} with {_short(kwargs)}: {type(err).__name__}: {_first_line(err)}") \
            from err
    except Exception as err:  # noqa: BLE001 - hub failures come as many exception types
        if pretrained:
            raise UserError(f"could not load timm's pretrained weights for {arch} ({type(err).__name__}: "
                            f"{_first_line(err)}); offline, set 'pretrained_file: PATH' in the pool entry, or give a "
                            "checkpoint") from err
        raise UserError(f"could not build {arch} with {_short(kwargs)}: {type(err).__name__}: {_first_line(err)}") \
            from err


def _quiet_create(name: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(name, **kwargs)


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's text, cut to ``limit`` characters (C++ backtraces and
    huge repr's never reach the user's one line)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[:limit] + "..."


def _short(kwargs: Mapping[str, Any], limit: int = 120) -> str:
    text = repr(dict(kwargs))
    return text if len(text) <= limit else text[:limit] + "...}"


# --------------------------------------------------------------------------------------------
# RobustBench's model zoo
# --------------------------------------------------------------------------------------------
def robustbench_checkpoint_path(spec: Mapping[str, str]) -> Path:
    """``model_dir/<dataset>/<threat_model>/<name>.pt``: RobustBench's own layout.

    Example:
        >>> robustbench_checkpoint_path({"name": "Standard", "dataset": "cifar10", "threat_model": "Linf",
        ...                              "model_dir": "models"})
        PosixPath('models/cifar10/Linf/Standard.pt')
    """
    return Path(spec["model_dir"]) / spec["dataset"] / spec["threat_model"] / f"{spec['name']}.pt"


def robustbench_zoo() -> tuple[Any, Any, Any]:
    """``(model_dicts, BenchmarkDataset, ThreatModel)`` from ``robustbench.model_zoo``, imported
    without running RobustBench's package ``__init__`` (its autoattack, gdown and pkg_resources
    imports are not needed for the zoo).

    RobustBench 1.1.1 pins ``timm==1.0.9`` and imports ``autoattack``, ``gdown`` and
    ``pkg_resources`` at import; the toolkit needs only the zoo, so it installs without its pins
    (:data:`ROBUSTBENCH_INSTALL`).
    """
    if "robustbench.model_zoo" not in sys.modules:
        spec = importlib.util.find_spec("robustbench")
        if spec is None or spec.submodule_search_locations is None:
            raise UserError(f"a pool entry has source robustbench but RobustBench is not installed; "
                            f"{ROBUSTBENCH_INSTALL}")
        if "robustbench" not in sys.modules:
            skeleton = types.ModuleType("robustbench")
            skeleton.__path__ = list(spec.submodule_search_locations)
            skeleton.__spec__ = spec
            sys.modules["robustbench"] = skeleton
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as err:
        raise UserError(f"RobustBench's model zoo does not import ({err}); {ROBUSTBENCH_INSTALL}") from err
    return model_dicts, BenchmarkDataset, ThreatModel


def build_zoo_model(spec: Mapping[str, str], trust: bool = False, load_weights: bool = True) -> nn.Module:
    """The zoo's architecture for ``spec`` with the weights of :func:`robustbench_checkpoint_path`,
    read by the toolkit's safe loader (never RobustBench's ``torch.load``)."""
    model_dicts, dataset_enum, threat_enum = robustbench_zoo()
    models = model_dicts[dataset_enum(spec["dataset"])][threat_enum(spec["threat_model"])]
    if spec["name"] not in models:
        close = difflib.get_close_matches(spec["name"], list(models), n=3)
        raise UserError(f"RobustBench has no {spec['dataset']}/{spec['threat_model']} model {spec['name']!r}"
                        + (f"; did you mean {', '.join(close)}?" if close else ""))
    model = models[spec["name"]]["model"]()
    if load_weights:
        path = robustbench_checkpoint_path(spec)
        if not path.is_file():
            raise UserError(f"RobustBench checkpoint not found: {path}; put the file there (where there is a network, "
                            f"robustbench.utils.load_model(model_name={spec['name']!r}, dataset={spec['dataset']!r}, "
                            f"threat_model={spec['threat_model']!r}, model_dir={str(spec['model_dir'])!r}) downloads "
                            "it to that path)")
        apply_state_dict(model, load_state_dict_file(path, trust=trust), what=f"RobustBench checkpoint {path}")
    return model

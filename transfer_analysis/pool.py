"""The model pool: YAML entries -> frozen pixel-space models.

Every pool model takes images in [0, 1] at the dataset's resolution and returns logits; the
:class:`PixelSpaceModel` wrapper resizes to the architecture's own ``input_size`` and normalizes
*inside* ``forward``, so ε means the same thing for every architecture.

Schema (one entry per model; see DESIGN.md)::

    models:
      - name: vit_a                     # unique
        arch: vit_tiny_patch16_224      # any timm name or a registered CIFAR one
        kwargs: {img_size: 32, patch_size: 4}
        checkpoint: teachers/vit_a.safetensors   # relative to the YAML file
        pretrained: false               # true = timm's weights (hub, or pretrained_file)
        pretrained_file: null           # local weights for pretrained: true (offline use)
        input_size: 32                  # default: the dataset's size
        mean: [0.4914, 0.4822, 0.4465]  # default: identity (0 and 1), or timm's for pretrained
        std: [0.2471, 0.2435, 0.2616]
        family: transformer
        trust_checkpoint: false         # true = allow unpickling code for this file only

Example:
    >>> import torch, yaml, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "pool.yaml").write_text(yaml.safe_dump({"models": [
    ...     {"name": "r", "arch": "resnet18_cifar", "kwargs": {"width": 8}, "family": "cnn"}]}))
    >>> pool = load_pool(d / "pool.yaml", num_classes=10, in_chans=1, image_size=28)
    >>> pool["r"](torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import archs as _archs  # noqa: F401  (registers the CIFAR architectures into timm)
from .errors import UserError
from .utils import read_yaml, safe_torch_load

__all__ = [
    "PoolEntry",
    "PixelSpaceModel",
    "read_pool_config",
    "parse_pool_entries",
    "load_pool",
    "build_pool_model",
    "create_timm_model",
    "merge_implied_kwargs",
    "load_state_dict_file",
    "apply_state_dict",
    "model_fingerprint",
    "count_params",
    "init_seed_for",
]

logger = logging.getLogger(__name__)

_KNOWN_KEYS = {
    "name", "arch", "kwargs", "checkpoint", "pretrained", "pretrained_file", "input_size", "mean", "std",
    "family", "trust_checkpoint", "training", "eps", "notes", "source", "robustbench",
}
#: where a pool model comes from: a timm architecture (default) or RobustBench's model zoo
SOURCES = ("timm", "robustbench")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_PREFIXES = ("module.", "_orig_mod.")


#: largest input side a pool entry may resize to
MAX_INPUT_SIZE = 4096


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class PoolEntry:
    """One model of a pool file."""

    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool = False
    pretrained_file: str | None = None
    input_size: int | tuple[int, int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
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


def parse_pool_entries(data: Any, source: str = "pool") -> list[PoolEntry]:
    """Validate the parsed YAML of a pool file and return its entries (relative paths unchanged)."""
    if not isinstance(data, Mapping) or "models" not in data:
        raise UserError(f"{source}: expected a mapping with a 'models:' list (see DESIGN.md, The model pool)")
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise UserError(f"{source}: 'models' must be a non-empty list of entries")
    entries: list[PoolEntry] = []
    seen: set[str] = set()
    for i, raw in enumerate(models):
        where = f"{source}: model #{i + 1}"
        if not isinstance(raw, Mapping):
            raise UserError(f"{where} must be a mapping with at least name and arch")
        unknown = set(raw) - _KNOWN_KEYS
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, sorted(_KNOWN_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where} has unknown key {key!r}{hint}; allowed: {', '.join(sorted(_KNOWN_KEYS))}")
        source = raw.get("source", "timm")
        if source not in SOURCES:
            raise UserError(f"{where}: source must be one of {', '.join(SOURCES)}, got {source!r}")
        rb = None
        if source == "robustbench":
            from .robustbench_zoo import check_spec

            rb = check_spec(raw.get("robustbench"), where)
            raw = {"arch": f"robustbench:{rb['name']}", **raw}
            for key in ("kwargs", "pretrained", "pretrained_file", "checkpoint", "mean", "std"):
                if raw.get(key):
                    raise UserError(f"{where}: '{key}' does not apply to a RobustBench model (the zoo builds it, its "
                                    "weights are robustbench.model_dir/<dataset>/<threat_model>/<name>.pt, and it "
                                    "normalizes inside)")
        elif raw.get("robustbench") is not None:
            raise UserError(f"{where}: 'robustbench:' needs source: robustbench")
        for key in ("name", "arch"):
            if not isinstance(raw.get(key), str) or not raw[key].strip():
                raise UserError(f"{where} needs a non-empty string '{key}'")
        name = raw["name"].strip()
        where = f"{source}: model {name!r}"
        if name in seen:
            raise UserError(f"{source}: duplicate model name {name!r}; every name must be unique")
        seen.add(name)
        kwargs = raw.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise UserError(f"{where}: kwargs must be a mapping, got {type(kwargs).__name__}")
        input_size = raw.get("input_size")
        if input_size is not None:
            if _is_int(input_size) and 0 < input_size <= MAX_INPUT_SIZE:
                pass
            elif (isinstance(input_size, Sequence) and not isinstance(input_size, str) and len(input_size) == 2
                  and all(_is_int(v) and 0 < v <= MAX_INPUT_SIZE for v in input_size)):
                input_size = tuple(input_size)
            else:
                raise UserError(f"{where}: input_size must be a positive integer (at most {MAX_INPUT_SIZE}) or "
                                f"[height, width], got {input_size!r}")
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
        for key in ("checkpoint", "pretrained_file", "family", "training", "notes"):
            if raw.get(key) is not None and not (isinstance(raw[key], str) and raw[key].strip()):
                raise UserError(f"{where}: {key} must be a non-empty string, got {raw[key]!r}")
        if raw.get("eps") is not None:
            from .utils import parse_eps

            parse_eps(raw["eps"], f"{where}: eps")
        entries.append(PoolEntry(
            name=name, arch=raw["arch"].strip(), kwargs=dict(kwargs), checkpoint=raw.get("checkpoint"),
            pretrained=bool(raw.get("pretrained", False)), pretrained_file=raw.get("pretrained_file"),
            input_size=input_size, mean=None if raw.get("mean") is None else [float(c) for c in raw["mean"]],
            std=None if raw.get("std") is None else [float(c) for c in raw["std"]], family=raw.get("family"),
            trust_checkpoint=bool(raw.get("trust_checkpoint", False)), training=raw.get("training"),
            eps=raw.get("eps"), notes=raw.get("notes"), source=source, robustbench=rb,
        ))
    return entries


def read_pool_config(path: str | os.PathLike) -> list[PoolEntry]:
    """Read a pool YAML file (safe loader); checkpoint paths become relative to the file's folder."""
    path = Path(path)
    data = read_yaml(path, "pool file")
    entries = parse_pool_entries(data, str(path))
    for e in entries:
        for key in ("checkpoint", "pretrained_file"):
            value = getattr(e, key)
            if value and not Path(os.path.expanduser(value)).is_absolute():
                setattr(e, key, str(path.parent / value))
        if e.robustbench is not None and not Path(os.path.expanduser(e.robustbench["model_dir"])).is_absolute():
            e.robustbench = {**e.robustbench, "model_dir": str(path.parent / e.robustbench["model_dir"])}
    return entries


# --------------------------------------------------------------------------------------------
# the wrapper
# --------------------------------------------------------------------------------------------
class PixelSpaceModel(nn.Module):
    """Take [0, 1] images at any size; resize to ``input_size``, normalize, and call the model.

    ``mean``/``std`` are non-persistent buffers, so ``state_dict()`` holds only ``model.*``.
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.input_size = tuple(input_size) if input_size is not None else None
        self.identity_norm = mean is None and std is None
        mean_t = torch.tensor(list(mean) if mean is not None else [0.0], dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std) if std is not None else [1.0], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self.entry: PoolEntry | None = None
        self.fingerprint: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            down = x.shape[-1] > self.input_size[-1]
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=down)
        if not self.identity_norm:
            x = (x - self.mean) / self.std
        return self.model(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size}, identity_norm={self.identity_norm}"


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, safely.

    Torch files load with ``weights_only=True``; one that needs arbitrary unpickling is refused
    unless ``trust``. Nested ``state_dict``/``model`` keys and ``module.``/``_orig_mod.`` prefixes
    are unwrapped.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"checkpoint {path} is not a valid safetensors file ({err}); re-create it") from err
    else:
        obj = safe_torch_load(path, trust=trust)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if nested is None:
            break
        obj = obj[nested]
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"checkpoint {path} holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly; a mismatch names the missing, unexpected and misshapen keys."""
    own = model.state_dict()
    if not set(state) & set(own) and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # saved from a PixelSpaceModel
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        def show(items: list[str]) -> str:
            return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

        parts = []
        wrong_keys = [k for k in own if k in state and state[k].shape != own[k].shape]
        heads = {(int(state[k].shape[0]), int(own[k].shape[0])) for k in wrong_keys
                 if state[k].dim() >= 1 and state[k].shape[1:] == own[k].shape[1:]}
        if wrong_keys and len(wrong_keys) <= 2 and not missing and not unexpected and len(heads) == 1 \
                and len(heads) == len({k.rsplit(".", 1)[0] for k in wrong_keys}):
            n_ckpt, n_model = heads.pop()  # only the classifier differs: a class-count mismatch
            raise UserError(f"{what} was trained for {n_ckpt} classes but the data has {n_model} "
                            f"({', '.join(wrong_keys)}); use the dataset it was trained on, or a checkpoint "
                            f"for {n_model} classes")
        if wrong:
            parts.append(f"shape mismatch: {show(wrong)}")
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise UserError(f"{what} does not fit the model ({'; '.join(parts)}); check arch, kwargs and num_classes")
    model.load_state_dict(state, strict=False)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's content: every parameter and buffer (name, dtype, shape, bytes).

    Two models with the same fingerprint compute the same function, whatever their names, so it
    is the cache key for anything computed from a model.
    """
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict(keep_vars=False).items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if isinstance(model, PixelSpaceModel):
        h.update(json.dumps({"input_size": model.input_size, "mean": model.mean.flatten().tolist(),
                             "std": model.std.flatten().tolist(), "identity": model.identity_norm}).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------
def _suggest_arch(arch: str) -> str:
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"


def merge_implied_kwargs(kwargs: Mapping[str, Any], where: str, **implied: Any) -> dict[str, Any]:
    """``kwargs`` without the keys the data already implies (``in_chans``, ``num_classes``), after
    checking that any such key given agrees with the data; a conflict is a :class:`UserError`.

    Example:
        >>> merge_implied_kwargs({"width": 4, "in_chans": 1}, "student_kwargs", in_chans=1, num_classes=10)
        {'width': 4}
    """
    out = dict(kwargs)
    for key, value in implied.items():
        if key in out:
            given = out.pop(key)
            if given != value:
                raise UserError(f"{where} sets {key}={given!r} but the data has {key}={value}; remove {key} (it is "
                                "taken from the data)")
    return out


def create_timm_model(arch: str, num_classes: int, in_chans: int, pretrained: bool = False,
                      pretrained_file: str | None = None, image_size: int | tuple[int, int] | None = None,
                      **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with the toolkit's errors: unknown names, offline hubs, bad kwargs.

    For architectures with a fixed input size (ViT, MLP-Mixer...), ``img_size`` is set to
    ``image_size`` unless ``kwargs`` give it.
    """
    import timm

    if not timm.is_model(arch):
        raise UserError(f"unknown timm architecture {arch!r}{_suggest_arch(arch)}")
    if image_size is not None and "img_size" not in kwargs:
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is not None and getattr(cfg, "fixed_input_size", False):
            kwargs["img_size"] = image_size
    extra: dict[str, Any] = {}
    if pretrained and pretrained_file:
        if not Path(os.path.expanduser(pretrained_file)).is_file():
            raise UserError(f"pretrained_file not found: {pretrained_file}")
        extra["pretrained_cfg_overlay"] = {"file": os.path.expanduser(pretrained_file)}
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                 **extra, **kwargs)
    except TypeError as err:
        raise UserError(f"{arch}: bad kwargs {kwargs}: {err}") from err
    except Exception as err:  # noqa: BLE001 - hub failures come as many exception types
        if pretrained:
            raise UserError(f"could not load timm's pretrained weights for {arch} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); offline, download them elsewhere and "
                            "set 'pretrained_file: PATH' in the pool entry, or give a checkpoint") from err
        raise UserError(f"could not build {arch} with {kwargs}: {type(err).__name__}: {err}") from err


def init_seed_for(seed: int, name: str) -> int:
    """The seed of a pool model's random initialization: a function of (seed, name) only."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def build_pool_model(entry: PoolEntry, num_classes: int, in_chans: int, image_size: int | tuple[int, int],
                     device: torch.device | str = "cpu", check_forward: bool = True,
                     init_seed: int | None = None) -> PixelSpaceModel:
    """Build one pool entry as a frozen :class:`PixelSpaceModel` (eval mode, no parameter gradients).

    With ``init_seed``, the random initialization (what a model without checkpoint or pretrained
    weights keeps) is seeded from ``(init_seed, entry.name)``: the same weights whichever other
    models are built, and in whatever order, so results cached per model stay valid.
    """
    if init_seed is not None:
        from .runtime import seeded

        with seeded(init_seed_for(init_seed, entry.name)):
            return build_pool_model(entry, num_classes, in_chans, image_size, device, check_forward)
    size = entry.input_size if entry.input_size is not None else image_size
    size_hw = (size, size) if isinstance(size, int) else tuple(size)
    if entry.source == "robustbench":  # the zoo's architecture and its file, through the safe loader
        from .robustbench_zoo import build_zoo_model

        model = build_zoo_model(entry.robustbench, trust=entry.trust_checkpoint)
    else:
        kwargs = merge_implied_kwargs(entry.kwargs, f"model {entry.name!r} kwargs", num_classes=num_classes,
                                      in_chans=in_chans)
        model = create_timm_model(entry.arch, num_classes=num_classes, in_chans=in_chans,
                                  pretrained=entry.pretrained, pretrained_file=entry.pretrained_file,
                                  image_size=size_hw[0] if size_hw[0] == size_hw[1] else size_hw, **kwargs)
    if entry.checkpoint:
        state = load_state_dict_file(entry.checkpoint, trust=entry.trust_checkpoint)
        apply_state_dict(model, state, what=f"checkpoint {entry.checkpoint} of model {entry.name!r}")
    mean, std = entry.mean, entry.std
    if mean is None and std is None and entry.pretrained:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
    if (mean is None) != (std is None):
        raise UserError(f"model {entry.name!r}: give both mean and std, or neither")
    if mean is not None:
        mean, std = _fit_channels(list(mean), in_chans), _fit_channels(list(std), in_chans)
        if mean is None or std is None:
            raise UserError(f"model {entry.name!r}: mean/std need one value per channel (the data has {in_chans}) "
                            f"or a single value, got {entry.mean} / {entry.std}")
    wrapped = PixelSpaceModel(model, None if size_hw == _hw(image_size) and entry.input_size is None else size_hw,
                              mean, std, name=entry.name)
    wrapped.entry = entry
    wrapped.eval().requires_grad_(False)
    wrapped.to(device)
    if check_forward:
        probe = torch.rand(1, in_chans, *_hw(image_size), device=device)
        try:
            with torch.inference_mode():
                out = wrapped(probe)
        except Exception as err:  # noqa: BLE001 - report any forward failure as a config problem
            raise UserError(f"model {entry.name!r} ({entry.arch}) fails on {tuple(probe.shape)} images: "
                            f"{type(err).__name__}: {str(err).splitlines()[0]}; check input_size and kwargs "
                            "(e.g. img_size, patch_size)") from err
        if out.ndim != 2 or out.shape[1] != num_classes:
            raise UserError(f"model {entry.name!r} returns shape {tuple(out.shape)} but the data has {num_classes} "
                            "classes; check num_classes in kwargs and the checkpoint")
    wrapped.fingerprint = model_fingerprint(wrapped)
    return wrapped


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _fit_channels(values: list[float], in_chans: int) -> list[float] | None:
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1 and len(values) == 3:
        return [sum(values) / 3]  # an RGB-pretrained model on grayscale data
    return None


def load_pool(path: str | os.PathLike, num_classes: int, in_chans: int, image_size: int | tuple[int, int],
              device: torch.device | str = "cpu", names: Sequence[str] | None = None,
              init_seed: int | None = 0) -> dict[str, nn.Module]:
    """Build every model of a pool file (or only ``names``, in that order), frozen.

    Models without weights are randomly initialized from ``(init_seed, name)`` (see
    :func:`build_pool_model`); ``init_seed=None`` uses the global RNG instead.

    Example: see the module docstring.
    """
    entries = read_pool_config(path)
    if names is not None:
        known = {e.name for e in entries}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"model(s) {', '.join(unknown)} not in {path}; the pool has {', '.join(sorted(known))}")
        order = {n: i for i, n in enumerate(names)}
        entries = sorted((e for e in entries if e.name in order), key=lambda e: order[e.name])
    pool: dict[str, nn.Module] = {}
    for entry in entries:
        logger.debug("building pool model %s (%s)", entry.name, entry.arch)
        pool[entry.name] = build_pool_model(entry, num_classes, in_chans, image_size, device, init_seed=init_seed)
    return pool

"""A pool entry meets the data: built from its source, weights loaded, checked and wrapped.

The road of an entry is one way: parsed (``models.entry``) -> built (``models.sources``) ->
weights (``models.weights``) -> wrapped (``models.wrapper``); this module walks it and checks,
once, every constant the model is given against the data it meets (classes, channels, mean/std).

**The classifier is never replaced silently.** A pretrained head whose class count equals the
data's is kept; a mismatch is refused unless the entry says ``num_classes: N`` (a new head, for
fine-tuning), which is logged and recorded (``new_head``). An entry with neither pretrained
weights nor a checkpoint keeps seeded random weights and says so with one warning; every model
records where its weights came from (``weights``: ``pretrained``, ``checkpoint`` or ``random``).

**The pretrained config is honoured.** With ``pretrained: true``, mean, std, input size and
interpolation come from the model's pretrained config unless the entry gives them; on an image
folder whose pixel space was centre-cropped at ``crop_pct`` c_data, a model pretrained with a
narrower crop c_model < c_data centre-crops ``c_model / c_data`` more inside (its own field of view);
an entry's ``crop_pct`` is applied as given. An RGB-pretrained model on 1-channel data sees the
gray channel replicated to RGB (its own three-channel mean and std, exactly as pretrained).

Example:
    >>> import torch
    >>> from transfer_analysis.models import PoolEntry
    >>> m = build_pool_model(PoolEntry("r", "resnet18_cifar", {"width": 4}), 10, 1, 28, warn_random=False)
    >>> m(torch.rand(2, 1, 28, 28)).shape, m.weights
    (torch.Size([2, 10]), 'random')
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .entry import PoolEntry, read_pool_config
from .sources import build_zoo_model, create_timm_model, pretrained_config
from .weights import apply_state_dict, load_state_dict_file
from .wrapper import PixelSpaceModel, count_params, model_fingerprint

__all__ = ["build_pool_model", "load_pool", "open_pool", "LazyPool", "ModelInfo", "merge_implied_kwargs",
           "init_seed_for", "fit_constants", "warn_random_weights"]

logger = logging.getLogger("transfer_analysis.models")


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


def init_seed_for(seed: int, name: str) -> int:
    """The seed of a pool model's random initialization: a function of (seed, name) only."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def fit_constants(values: Sequence[float] | None, channels: int, key: str, where: str) -> list[float] | None:
    """A normalization constant checked against the channels the model takes: one value per
    channel, or a single value for all; anything else is refused naming the entry.

    Example:
        >>> fit_constants([0.5], 3, "mean", "model 'a'")
        [0.5, 0.5, 0.5]
        >>> fit_constants([0.4, 0.5, 0.6], 1, "mean", "model 'a'")
        Traceback (most recent call last):
        ...
        transfer_analysis.errors.UserError: model 'a': mean has 3 values but the model takes 1-channel images; give 1 value (or a single one)
    """
    if values is None:
        return None
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise UserError(f"{where}: {key} has {len(values)} values but the model takes {channels}-channel images; give "
                    f"{channels} value{'s' if channels > 1 else ''} (or a single one)")


def _head(entry: PoolEntry, cfg: Mapping[str, Any], num_classes: int, where: str) -> bool:
    """Whether a pretrained entry gets a new head: kept when it fits the data, replaced only when
    the entry asks (``num_classes``); a mismatch otherwise is refused. With a checkpoint, the
    checkpoint's head is what counts (checked when it is applied)."""
    if entry.num_classes is not None and entry.num_classes != num_classes:
        raise UserError(f"{where}: num_classes: {entry.num_classes} but the data has {num_classes} classes; a new head "
                        "must fit the data")
    pre = cfg.get("num_classes")
    if entry.checkpoint is not None or pre is None or pre == num_classes:
        return False
    if entry.num_classes is None:
        raise UserError(f"{where}: its pretrained head has {pre} classes but the data has {num_classes}; set "
                        f"num_classes: {num_classes} in the entry for a new head (fine-tuning), or use data with "
                        f"{pre} classes")
    return True


def _build_timm(entry: PoolEntry, cfg: Mapping[str, Any], num_classes: int, in_chans: int, size_hw: tuple[int, int],
                where: str) -> tuple[nn.Module, int, bool]:
    """``(model, channels the model takes, new_head)`` of a timm entry (``cfg``: its pretrained config)."""
    kwargs = merge_implied_kwargs(entry.kwargs, f"model {entry.name!r} kwargs", num_classes=num_classes,
                                  in_chans=in_chans)
    chans, new_head = in_chans, False
    if entry.pretrained:
        new_head = _head(entry, cfg, num_classes, where)
        pre_chans = int(cfg.get("input_size", (in_chans,))[0])
        if in_chans == 1 and pre_chans == 3:
            chans = 3  # replicate gray to RGB inside the wrapper: the pretrained filters, unchanged
        elif pre_chans != in_chans:
            raise UserError(f"{where}: pretrained for {pre_chans}-channel images but the data has {in_chans} "
                            "channels")
    elif entry.num_classes is not None and entry.num_classes != num_classes:
        raise UserError(f"{where}: num_classes: {entry.num_classes} but the data has {num_classes} classes")
    model = create_timm_model(entry.arch, num_classes=num_classes, in_chans=chans, pretrained=entry.pretrained,
                              pretrained_file=entry.pretrained_file,
                              image_size=size_hw[0] if size_hw[0] == size_hw[1] else size_hw, **kwargs)
    if new_head:
        logger.info("model %s: a new %d-class head on the %d-class pretrained weights of %s (num_classes in its "
                    "entry)", entry.name, num_classes, cfg.get("num_classes"), entry.arch)
    return model, chans, new_head


def _size(entry: PoolEntry, cfg: Mapping[str, Any], image_size: int | tuple[int, int]) -> tuple[int, int]:
    """The model's own input size: the entry's, else the pretrained one, else the data's."""
    if entry.input_size is not None:
        return _hw(entry.input_size)
    if cfg.get("input_size") is not None:
        return _hw(tuple(cfg["input_size"][-2:]))
    return _hw(image_size)


def build_pool_model(entry: PoolEntry, num_classes: int, in_chans: int, image_size: int | tuple[int, int],
                     device: torch.device | str = "cpu", check_forward: bool = True, init_seed: int | None = None,
                     data_crop_pct: float | None = None, warn_random: bool = True) -> PixelSpaceModel:
    """Build one pool entry as a frozen :class:`PixelSpaceModel` (eval mode, no parameter gradients).

    Args:
        entry: the parsed entry.
        num_classes, in_chans, image_size: the data the model meets.
        device: where the model goes.
        check_forward: run one probe image through it (a config mistake is one line, here).
        init_seed: seed the random initialization (what a model without checkpoint or pretrained
            weights keeps) from ``(init_seed, entry.name)``: the same weights whichever other models
            are built, and in whatever order, so results cached per model stay valid.
        data_crop_pct: the centre crop the data's pixel space was made with (image folders), so a
            pretrained model with a narrower crop crops the rest inside.
        warn_random: warn when the model keeps random weights.
    """
    if init_seed is not None:
        from ..runtime import seeded

        with seeded(init_seed_for(init_seed, entry.name)):
            return build_pool_model(entry, num_classes, in_chans, image_size, device, check_forward,
                                    data_crop_pct=data_crop_pct, warn_random=warn_random)
    where = f"model {entry.name!r} ({entry.arch})"
    cfg: dict[str, Any] = {}
    new_head = False
    chans = in_chans
    if entry.source == "robustbench":  # the zoo's architecture and its file, through the safe loader
        size_hw = _hw(entry.input_size) if entry.input_size is not None else _hw(image_size)
        model = build_zoo_model(entry.robustbench, trust=entry.trust_checkpoint)
    else:
        cfg = pretrained_config(entry.arch, where) if entry.pretrained else {}
        size_hw = _size(entry, cfg, image_size)
        model, chans, new_head = _build_timm(entry, cfg, num_classes, in_chans, size_hw, where)
    if entry.checkpoint:
        state = load_state_dict_file(entry.checkpoint, trust=entry.trust_checkpoint, key=entry.checkpoint_key)
        apply_state_dict(model, state, what=f"checkpoint {entry.checkpoint} of model {entry.name!r}")
    weights = "checkpoint" if entry.checkpoint else "pretrained" if entry.pretrained or entry.source == "robustbench" \
        else "random"
    if weights == "random" and warn_random:
        warn_random_weights(entry.name)
    mean, std = entry.mean, entry.std
    if mean is None and std is None and entry.pretrained:
        mean, std = cfg.get("mean"), cfg.get("std")
    if (mean is None) != (std is None):
        raise UserError(f"model {entry.name!r}: give both mean and std, or neither")
    mean = fit_constants(mean, chans, "mean", f"model {entry.name!r}")
    std = fit_constants(std, chans, "std", f"model {entry.name!r}")
    interpolation = entry.interpolation or (cfg.get("interpolation") if entry.pretrained else None) or "bilinear"
    if interpolation not in ("bilinear", "bicubic", "nearest", "area"):
        interpolation = "bicubic" if "cubic" in str(interpolation) else "bilinear"
    crop = entry.crop_pct
    if crop is None and entry.pretrained and data_crop_pct and cfg.get("crop_pct"):
        crop = min(1.0, float(cfg["crop_pct"]) / float(data_crop_pct))
    data_hw = _hw(image_size)
    resize = None if (size_hw == data_hw and (crop is None or crop >= 1)) else size_hw
    wrapped = PixelSpaceModel(model, resize, mean, std, name=entry.name, interpolation=interpolation, crop_pct=crop,
                              channels=chans if chans != in_chans else None)
    wrapped.entry, wrapped.weights, wrapped.new_head = entry, weights, new_head
    wrapped.eval().requires_grad_(False)
    wrapped.to(device)
    if check_forward:
        _probe(wrapped, entry, num_classes, in_chans, data_hw, device)
    wrapped.fingerprint = model_fingerprint(wrapped)
    return wrapped


def warn_random_weights(name: str) -> None:
    """The one warning of a model that keeps random weights (neither pretrained nor a checkpoint)."""
    logger.warning("model %s has neither pretrained weights nor a checkpoint: it keeps seeded random weights "
                   "(models.csv says weights=random)", name)


def _probe(wrapped: PixelSpaceModel, entry: PoolEntry, num_classes: int, in_chans: int, data_hw: tuple[int, int],
           device: torch.device | str) -> None:
    probe = torch.rand(1, in_chans, *data_hw, device=device)
    try:
        with torch.inference_mode():
            out = wrapped(probe)
    except Exception as err:  # noqa: BLE001 - report any forward failure as a config problem
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise UserError(f"model {entry.name!r} ({entry.arch}) fails on {tuple(probe.shape)} images: "
                        f"{type(err).__name__}: {text}; check input_size and kwargs (e.g. img_size, patch_size)") from err
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise UserError(f"model {entry.name!r} returns shape {tuple(out.shape)} but the data has {num_classes} "
                        "classes; check num_classes in kwargs and the checkpoint")


def _select(entries: list[PoolEntry], names: Sequence[str] | None, where: str) -> list[PoolEntry]:
    if names is None:
        return entries
    known = {e.name for e in entries}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"model(s) {', '.join(unknown)} not in {where}; the pool has {', '.join(sorted(known))}")
    order = {n: i for i, n in enumerate(names)}
    return sorted((e for e in entries if e.name in order), key=lambda e: order[e.name])


def load_pool(path: str | os.PathLike, num_classes: int, in_chans: int, image_size: int | tuple[int, int],
              device: torch.device | str = "cpu", names: Sequence[str] | None = None,
              init_seed: int | None = 0, data_crop_pct: float | None = None) -> dict[str, nn.Module]:
    """Build every model of a pool file (or only ``names``, in that order), frozen.

    Models without weights are randomly initialized from ``(init_seed, name)`` (see
    :func:`build_pool_model`); ``init_seed=None`` uses the global RNG instead.

    Example:
        >>> import torch, yaml, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "pool.yaml").write_text(yaml.safe_dump({"models": [
        ...     {"name": "r", "arch": "resnet18_cifar", "kwargs": {"width": 8}, "family": "cnn"}]}))
        >>> pool = load_pool(d / "pool.yaml", num_classes=10, in_chans=1, image_size=28)
        >>> pool["r"](torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    entries = _select(read_pool_config(path), names, str(path))
    pool: dict[str, nn.Module] = {}
    for entry in entries:
        logger.debug("building pool model %s (%s)", entry.name, entry.arch)
        pool[entry.name] = build_pool_model(entry, num_classes, in_chans, image_size, device, init_seed=init_seed,
                                            data_crop_pct=data_crop_pct)
    return pool


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@dataclass(frozen=True)
class ModelInfo:
    """What is known of a pool model without holding it: fingerprint, size, where its weights came from."""

    name: str
    fingerprint: str
    params: int
    nbytes: int
    entry: PoolEntry | None
    weights: str | None
    new_head: bool


class LazyPool(Mapping[str, nn.Module]):
    """A pool whose models are built when used and dropped when more would be held than ``max_bytes``.

    ``pool[name]`` builds the model (through ``build``, e.g. :func:`build_pool_model`) unless it is
    held, and then lets go of the least recently used others while the models held exceed
    ``max_bytes`` (the one just asked for is always kept): peak memory is bounded by the largest
    few models, not by the pool. ``info(name)`` (fingerprint, parameter count, weights) is kept
    for every model ever built. ``max_bytes=None`` holds everything (an ordinary pool).

    Example:
        >>> from transfer_analysis.models import PoolEntry
        >>> entries = [PoolEntry(n, "resnet18_cifar", {"width": 2}) for n in ("a", "b", "c")]
        >>> pool = LazyPool(entries, lambda e: build_pool_model(e, 4, 1, 8, init_seed=0, warn_random=False),
        ...                 max_bytes=1)
        >>> _ = pool["a"], pool["b"]
        >>> list(pool), pool.held(), pool.builds
        (['a', 'b', 'c'], ['b'], 2)
    """

    def __init__(self, entries: Sequence[PoolEntry], build: Callable[[PoolEntry], nn.Module],
                 max_bytes: int | None = None) -> None:
        self._entries = {e.name: e for e in entries}
        self._build = build
        self.max_bytes = max_bytes
        self._held: OrderedDict[str, nn.Module] = OrderedDict()
        self._info: dict[str, ModelInfo] = {}
        self.builds = 0
        self.peak_held_bytes = 0

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self._entries:
            raise KeyError(name)
        if name in self._held:
            self._held.move_to_end(name)
            return self._held[name]
        model = self._build(self._entries[name])
        self.builds += 1
        nbytes = _model_bytes(model)
        if name not in self._info:
            fp = getattr(model, "fingerprint", None) or model_fingerprint(model)
            self._info[name] = ModelInfo(name, fp, count_params(model), nbytes, getattr(model, "entry", None),
                                         getattr(model, "weights", None), bool(getattr(model, "new_head", False)))
        self._held[name] = model
        if self.max_bytes is not None:
            while len(self._held) > 1 and self._held_bytes() > self.max_bytes:
                self._held.popitem(last=False)
        self.peak_held_bytes = max(self.peak_held_bytes, self._held_bytes())
        return model

    def _held_bytes(self) -> int:
        return sum(self._info[n].nbytes for n in self._held)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def held(self) -> list[str]:
        """Names of the models held now, least recently used first."""
        return list(self._held)

    def info(self, name: str) -> ModelInfo:
        """:class:`ModelInfo` of ``name`` (building it once if it never was)."""
        if name not in self._info:
            self[name]
        return self._info[name]

    def release(self) -> None:
        """Let go of every held model (their :meth:`info` stays)."""
        self._held.clear()


def open_pool(path: str | os.PathLike, num_classes: int, in_chans: int, image_size: int | tuple[int, int],
              names: Sequence[str] | None = None, init_seed: int | None = 0, data_crop_pct: float | None = None,
              max_bytes: int | None = None, device: torch.device | str = "cpu", warn_random: bool = True) -> LazyPool:
    """A :class:`LazyPool` over a pool file (or only ``names``): nothing is built until used.

    ``warn_random=False`` leaves the random-weights warning to the caller (who may first refuse
    its input in one line): :func:`warn_random_weights` for each model whose ``info`` says so.
    """
    entries = _select(read_pool_config(Path(path)), names, str(path))
    built: set[str] = set()

    def build(entry: PoolEntry) -> nn.Module:
        model = build_pool_model(entry, num_classes, in_chans, image_size, device, init_seed=init_seed,
                                 data_crop_pct=data_crop_pct, warn_random=warn_random and entry.name not in built)
        built.add(entry.name)  # a rebuilt model warns (and logs its new head) once only
        return model

    return LazyPool(entries, build, max_bytes)

"""What every training method shares: the registry, the base class, and frozen teachers.

A method is one small module (one dataclass) that owns its loss and its inner attack. The trainer
calls, per batch, ``parts = method.step(student, x, y)`` inside autocast, and backpropagates
``parts["loss"]``; every other scalar in ``parts`` is a named loss part that it logs (``logits``,
detached, gives the training accuracy). Hyperparameters are the dataclass fields, so
``create_method("trades", beta=6.0)`` validates them and ``method.config()`` is what ``config.yaml``
records.

Example:
    >>> from distill.methods import create_method, list_methods
    >>> "darht" in list_methods()
    True
    >>> m = create_method("pgd-at", eps="8/255", steps=10)
    >>> round(m.alpha * 255, 3)   # default step: eps / 4
    2.0
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from transfer_analysis.attacks import default_step_size, pgd_attack
from transfer_analysis.checks import as_fraction, as_number
from transfer_analysis.errors import UserError
from transfer_analysis.utils import parse_eps

__all__ = [
    "Method",
    "AdversarialMethod",
    "FrozenTeachers",
    "register_method",
    "create_method",
    "get_method_class",
    "list_methods",
    "canonical_method_name",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`Method` subclass under ``name`` (lower case, e.g. ``pgd-at``)."""

    def deco(cls: M) -> M:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"method {key!r} is already registered by {_REGISTRY[key].__qualname__}")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of the registered methods, sorted.

    Example:
        >>> list_methods()[:3]
        ['ard', 'darht', 'fast-at']
    """
    return sorted(_REGISTRY)


def canonical_method_name(name: str) -> str:
    """``PGD_AT`` -> ``pgd-at``; an unknown name is a :class:`UserError` with the closest match."""
    key = str(name).strip().lower().replace("_", "-")
    if key in _REGISTRY:
        return key
    close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(f"unknown method {name!r}; {hint}choose one of {', '.join(list_methods())}")


def get_method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (case and ``_``/``-`` insensitive)."""
    return _REGISTRY[canonical_method_name(name)]


def create_method(name: str, **cfg: Any) -> Method:
    """Build a registered method with hyperparameters ``cfg``; unknown keys are a :class:`UserError`.

    Example:
        >>> create_method("darht", p_adv=0.5).weighting
        'exp_ce'
    """
    cls = get_method_class(name)
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in cfg if k not in allowed]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"method {cls.name!r} has no option {unknown[0]!r}{hint}; its options: {', '.join(allowed)}")
    return cls(**cfg)


class FrozenTeachers:
    """Teachers as a frozen, ordered ensemble: eval mode, no parameter gradients, no_grad forwards.

    Not an ``nn.Module``: teachers are never registered under the student, so ``student.train()``,
    the optimizer and the student's ``state_dict`` never reach them. Every call puts them (back)
    in eval mode, so even a stray ``teacher.train()`` cannot update their BatchNorm statistics.
    Forwards run under ``torch.no_grad()`` (not inference mode: the logits are used as targets of
    differentiable losses) and return float32.

    Example:
        >>> t = FrozenTeachers({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)})
        >>> t.logits(torch.rand(2, 4)).shape, t.names
        (torch.Size([2, 2, 3]), ['a', 'b'])
    """

    def __init__(self, teachers: Mapping[str, nn.Module]) -> None:
        self._models: dict[str, nn.Module] = dict(teachers)
        for model in self._models.values():
            model.eval().requires_grad_(False)

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._models.values())

    def __getitem__(self, key: int | str) -> nn.Module:
        return self._models[self.names[key]] if isinstance(key, int) else self._models[key]

    def one(self, key: int | str, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C)`` of one teacher (float32, no graph)."""
        model = self[key]
        model.eval()
        with torch.no_grad():
            return model(x).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every teacher on the same inputs, stacked ``(N, K, C)`` (float32, no graph)."""
        return torch.stack([self.one(k, x) for k in range(len(self))], dim=1)


@dataclass(kw_only=True)
class Method:
    """Base class: a training objective with its inner attack.

    Subclasses are dataclasses whose fields are their hyperparameters and override :meth:`step`.
    Class attributes say what they need: ``min_teachers``/``max_teachers`` (``None`` = no upper
    bound), ``uses_feature_map`` (the student needs DARHT's map with one slice per teacher), and
    ``training_defaults`` (the reference protocol's epochs, LR milestones as fractions of training,
    weight decay...; the trainer uses them unless the user sets them).
    """

    name: ClassVar[str] = ""
    min_teachers: ClassVar[int] = 0
    max_teachers: ClassVar[int | None] = 0
    uses_feature_map: ClassVar[bool] = False
    training_defaults: ClassVar[dict[str, Any]] = {}

    #: L∞ radius of the inner attack (a number or a fraction such as ``"8/255"``).
    eps: float | str = 8 / 255

    def __post_init__(self) -> None:
        self.eps = parse_eps(self.eps, "eps")
        self.teachers: FrozenTeachers | None = None
        self.epoch = 0
        self.epochs = 1

    # -- configuration --------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The resolved hyperparameters (plain types, for ``config.yaml``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def _require(self, condition: bool, message: str) -> None:
        if not condition:
            raise UserError(f"method {self.name!r}: {message}")

    # -- lifecycle ------------------------------------------------------------------------
    def bind(self, teachers: FrozenTeachers | Mapping[str, nn.Module] | None) -> None:
        """Attach the (frozen) teachers; checks their number."""
        if teachers is not None and not isinstance(teachers, FrozenTeachers):
            teachers = FrozenTeachers(teachers)
        k = 0 if teachers is None else len(teachers)
        if k < self.min_teachers:
            raise UserError(f"method {self.name!r} needs at least {self.min_teachers} teacher(s), got {k}; "
                            "give `pool` and `teachers`")
        if self.max_teachers is not None and k > self.max_teachers:
            if self.max_teachers == 0:
                raise UserError(f"method {self.name!r} uses no teachers, got {k}; drop `teachers`")
            raise UserError(f"method {self.name!r} takes at most {self.max_teachers} teacher(s), got {k}")
        self.teachers = teachers if k else None

    def on_epoch_start(self, epoch: int, epochs: int, lr: float, base_lr: float) -> None:
        """Called before each epoch (0-based ``epoch`` of ``epochs``) with the current and initial LR."""
        self.epoch, self.epochs = epoch, epochs

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch: return ``{"loss": scalar with graph, "logits": detached (N, C), part: scalar...}``."""
        raise NotImplementedError

    # -- resumable state (plain types only) -----------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State that changes during training (empty for stateless methods)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    # -- helpers --------------------------------------------------------------------------
    @property
    def _teachers(self) -> FrozenTeachers:
        if self.teachers is None:
            raise RuntimeError(f"method {self.name!r} has no teachers bound; call bind() first")
        return self.teachers


@dataclass(kw_only=True)
class AdversarialMethod(Method):
    """A method with an inner L∞ PGD (``transfer_analysis.attacks.pgd_attack``, student in eval mode, fp32)."""

    #: step size; ``None`` = ε/4 (2/255 at ε = 8/255).
    alpha: float | str | None = None
    #: attack steps.
    steps: int = 10
    #: random start: ``uniform`` in [-ε, ε] (Madry) or ``normal`` (x + 0.001 N(0, I)).
    start: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = default_step_size(self.eps) if self.alpha is None else parse_eps(self.alpha, "alpha")
        self._require(isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 0,
                      f"steps must be an integer >= 0, got {self.steps!r}")
        self._require(self.start in ("uniform", "normal", "zero"),
                      f"start must be uniform, normal or zero, got {self.start!r}")

    def attack(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
               **kwargs: Any) -> torch.Tensor:
        """Adversarial examples for ``student`` (crafted in eval mode; mode restored after)."""
        return pgd_attack(student, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, start=self.start, **kwargs)


def check_reduction(method: Method, value: str) -> None:
    """Validate a KL reduction option (``batchmean`` or ``mean``)."""
    method._require(value in ("batchmean", "mean"), f"reduction must be batchmean or mean, got {value!r}")


def check_positive(method: Method, **values: float) -> None:
    """Validate that numeric options are > 0 (:func:`transfer_analysis.checks.as_number`)."""
    for key, value in values.items():
        as_number(value, f"method {method.name!r}: {key}", strict=True, text=False)


def check_fraction(method: Method, **values: float) -> None:
    """Validate that numeric options lie in [0, 1] (:func:`transfer_analysis.checks.as_fraction`)."""
    for key, value in values.items():
        as_fraction(value, f"method {method.name!r}: {key}")

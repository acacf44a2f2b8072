"""L∞ attacks by name: the registry behind ``AttackConfig``, over the toolkit's PGD and torchattacks.

Built-ins (``list_attacks()``):

- ``pgd``: PGD with a uniform random start; 10 steps of ε/4 by default (Madry et al.).
- ``fgsm``: one signed-gradient step of ε from the clean image (steps and step size do not apply).
- ``cw``: CW∞, PGD on the margin loss ``max_{j != y} z_j - z_y`` (κ = 50); 30 steps of ε/4 by default.
- ``mifgsm``: momentum iterative FGSM (torchattacks); 10 steps of ε/4, decay 1.0 by default.
- ``apgd``: APGD-CE (torchattacks), Linf, 10 iterations by default (adaptive step, so none applies).

``pgd``, ``fgsm`` and ``cw`` are :class:`~transfer_analysis.attacks.pgd.LinfPGD`, the PGD that the
training methods and evaluation run (the same examples as torchattacks' PGD for the same seed,
tested). Any other torchattacks L∞ attack can be named too (``bim``, ``tpgd``, ``difgsm``,
``apgdt``...): the class is looked up in torchattacks' namespace (only subclasses of
``torchattacks.Attack``, never ``eval``), ε, steps and step size are mapped onto its own
arguments, and ``norm`` is set to ``"Linf"``. When no step size is given, a generic attack gets its
torchattacks default step scaled to ε (torchattacks' defaults assume ε = 8/255, so PGD-like
attacks get ε/4 and FFGSM 1.25 ε).

Pool models normalize inside ``forward``, so attacks run in pixel space ([0, 1] images) and
``set_normalization_used`` is never called.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    >>> cfg = AttackConfig("pgd", eps=0.1)
    >>> cfg.resolved().steps, round(cfg.resolved().step_size, 3)
    (10, 0.025)
    >>> atk = build_attack("pgd", model, eps=0.1)
    >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> bool(((atk(x, y) - x).abs() <= 0.1 + 1e-6).all())
    True
    >>> list_attacks()
    ['apgd', 'cw', 'fgsm', 'mifgsm', 'pgd']
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from ..errors import UserError
from .pgd import LinfPGD
from .threat import DEFAULT_STEP_FRACTION, default_step_size

__all__ = [
    "attack_record",
    "AttackConfig",
    "AttackSpec",
    "DEFAULT_STEPS",
    "build_attack",
    "list_attacks",
    "register_attack",
    "get_attack_spec",
    "canonical_attack_name",
]

DEFAULT_STEPS = 10
"""Iterations of every iterative attack unless ``steps`` is given (the CIFAR protocol's PGD-10)."""

_EPS_PARAMS = ("eps", "max_epsilon")
_STEPS_PARAMS = ("steps", "num_iter_set", "nb_iter")
_STEP_SIZE_PARAMS = ("alpha",)
# torchattacks classes whose defaults differ from the standard AutoAttack that their names promise:
# refused in this registry (the matrix), which would run them as they are
_NOT_STANDARD = {"autoattack": "10 APGD iterations, not 100, and no version='standard' checks",
                 "square": "torchattacks' rescaled Square schedule, not AutoAttack's 5000-query Square"}
# torchattacks classes with an ε that is not an L∞ radius, and wrappers that take no model/ε.
_NOT_LINF = {"pgdl2": "an L2 attack", "pgdrsl2": "an L2 attack", "multiattack": "a wrapper of attacks",
             "lgv": "a wrapper that trains surrogate models"}


@dataclass
class AttackSpec:
    """What the registry knows about one attack: how to build it and which settings apply.

    Attributes:
        name: canonical (lower-case) name.
        builder: ``builder(model, eps, steps, step_size, random_start, num_classes, seed, **kwargs)``.
        cls: the torchattacks class behind it (used to check extra kwargs), or its name in
            torchattacks' namespace (looked up when needed, so importing this module stays cheap).
        takes_steps: whether ``steps`` applies (else it is dropped from the resolved config).
        takes_step_size: whether ``step_size`` applies.
        takes_random_start: whether ``random_start`` applies.
        step_fraction: default step size as a fraction of ε.
        default_steps: iterations when none are given.
        description: one line for ``--help`` and error messages.
        reserved: the class's arguments set from ε/steps/step size, refused as extra kwargs.
    """

    name: str
    builder: Callable[..., Any]
    cls: type | str | None = None
    takes_steps: bool = True
    takes_step_size: bool = True
    takes_random_start: bool = False
    step_fraction: float = DEFAULT_STEP_FRACTION
    description: str = ""
    reserved: frozenset[str] = frozenset()
    default_steps: int = 10

    def attack_class(self) -> type | None:
        """The torchattacks class (resolved from its name on first use)."""
        if isinstance(self.cls, str):
            self.cls = _ta_class(self.cls)
        return self.cls


_REGISTRY: dict[str, AttackSpec] = {}


def canonical_attack_name(name: str) -> str:
    """Lower-case, without ``-``, ``_`` and spaces: ``MI-FGSM`` -> ``mifgsm``.

    Example:
        >>> canonical_attack_name("MI-FGSM")
        'mifgsm'
    """
    return "".join(ch for ch in str(name).strip().lower() if ch not in "-_ ")


def register_attack(name: str, *, cls: type | str | None = None, takes_steps: bool = True,
                    takes_step_size: bool = True, takes_random_start: bool = False,
                    step_fraction: float = DEFAULT_STEP_FRACTION, description: str = "",
                    reserved: tuple[str, ...] = (), default_steps: int = 10) -> Callable[[Callable], Callable]:
    """Decorator: register an attack builder under ``name``.

    The builder is called as ``builder(model, eps=..., steps=..., step_size=..., random_start=...,
    num_classes=..., seed=..., **kwargs)`` with settings already resolved (defaults filled in).

    Example:
        >>> import torchattacks
        >>> @register_attack("bimdemo", cls=torchattacks.BIM, description="BIM (demo)")
        ... def _bim(model, eps, steps, step_size, random_start, num_classes, seed, **kw):
        ...     return torchattacks.BIM(model, eps=eps, alpha=step_size, steps=steps, **kw)
        >>> "bimdemo" in list_attacks()
        True
        >>> _ = _REGISTRY.pop("bimdemo")
    """
    key = canonical_attack_name(name)

    def decorator(fn: Callable) -> Callable:
        _REGISTRY[key] = AttackSpec(name=key, builder=fn, cls=cls, takes_steps=takes_steps,
                                    takes_step_size=takes_step_size, takes_random_start=takes_random_start,
                                    step_fraction=step_fraction, description=description,
                                    reserved=frozenset(reserved), default_steps=default_steps)
        return fn

    return decorator


def list_attacks(include_torchattacks: bool = False) -> list[str]:
    """Names of the registered attacks (sorted); optionally every torchattacks L∞ attack too.

    Example:
        >>> "bim" in list_attacks(include_torchattacks=True)
        True
    """
    names = set(_REGISTRY)
    if include_torchattacks:
        names |= set(_torchattacks_linf_classes())
    return sorted(names)


# --------------------------------------------------------------------------------------------
# built-ins
# --------------------------------------------------------------------------------------------
#: how torchattacks is installed: without its dependencies (every release pins requests~=2.25.1)
TORCHATTACKS_INSTALL = 'pip install --no-deps "torchattacks==3.5.1"'


def _ta():
    """The torchattacks module, or one line saying how to install it."""
    try:
        import torchattacks
    except ImportError as err:
        raise UserError(f"torchattacks is not installed; {TORCHATTACKS_INSTALL} (without its dependencies: its "
                        "requests~=2.25.1 pin would downgrade requests)") from err
    return torchattacks


def _ta_class(attr: str) -> type:
    """A class from torchattacks' namespace by attribute name; only ``Attack`` subclasses."""
    ta = _ta()
    obj = getattr(ta, attr, None)
    if not (isinstance(obj, type) and issubclass(obj, ta.attack.Attack)):
        raise UserError(f"torchattacks has no attack class {attr!r}")
    return obj


@register_attack("pgd", cls=LinfPGD, takes_random_start=True,
                 reserved=("eps", "alpha", "steps", "start", "loss"),
                 description="PGD, uniform random start, 10 steps of eps/4 by default")
def _build_pgd(model: nn.Module, eps: float, steps: int, step_size: float, random_start: bool,
               num_classes: int | None, seed: int | None, **kwargs: Any):
    return LinfPGD(model, eps=eps, alpha=step_size, steps=steps, start="uniform" if random_start else "zero",
                   **kwargs)


@register_attack("fgsm", cls=LinfPGD, takes_steps=False, takes_step_size=False,
                 reserved=("eps", "alpha", "steps", "start", "loss"), description="FGSM, one step of eps")
def _build_fgsm(model: nn.Module, eps: float, steps: int | None, step_size: float | None, random_start: bool,
                num_classes: int | None, seed: int | None, **kwargs: Any):
    return LinfPGD(model, eps=eps, alpha=eps, steps=1, start="zero", **kwargs)


@register_attack("cw", cls=LinfPGD, takes_random_start=True, default_steps=30,
                 reserved=("eps", "alpha", "steps", "start", "loss"),
                 description="CW-inf: PGD on the margin loss (kappa 50), 30 steps of eps/4 by default")
def _build_cw(model: nn.Module, eps: float, steps: int, step_size: float, random_start: bool,
              num_classes: int | None, seed: int | None, **kwargs: Any):
    return LinfPGD(model, eps=eps, alpha=step_size, steps=steps, loss="margin",
                   start="uniform" if random_start else "zero", **kwargs)


@register_attack("mifgsm", cls="MIFGSM", reserved=("eps", "alpha", "steps"),
                 description="MI-FGSM, 10 steps of eps/4, decay 1.0 by default")
def _build_mifgsm(model: nn.Module, eps: float, steps: int, step_size: float, random_start: bool,
                  num_classes: int | None, seed: int | None, **kwargs: Any):
    return _ta().MIFGSM(model, eps=eps, alpha=step_size, steps=steps, **kwargs)


@register_attack("apgd", cls="APGD", takes_step_size=False, reserved=("eps", "steps", "norm"),
                 description="APGD-CE (Linf), 10 iterations by default")
def _build_apgd(model: nn.Module, eps: float, steps: int, step_size: float | None, random_start: bool,
                num_classes: int | None, seed: int | None, **kwargs: Any):
    kwargs.setdefault("verbose", False)
    if seed is not None:
        kwargs.setdefault("seed", seed)
    return _ta().APGD(model, norm="Linf", eps=eps, steps=steps, **kwargs)



# --------------------------------------------------------------------------------------------
# any torchattacks L∞ attack
# --------------------------------------------------------------------------------------------
def _torchattacks_linf_classes() -> dict[str, type]:
    """Canonical name -> class for every torchattacks ``Attack`` subclass with an L∞ ε."""
    ta = _ta()
    base = ta.attack.Attack
    out: dict[str, type] = {}
    for attr in getattr(ta, "__all__", dir(ta)):
        obj = getattr(ta, attr, None)
        if not (isinstance(obj, type) and issubclass(obj, base)) or obj is base:
            continue
        key = canonical_attack_name(attr)
        if key in _NOT_LINF or key in _NOT_STANDARD:
            continue
        params = _init_params(obj)
        if not any(p in params for p in _EPS_PARAMS):
            continue  # no ε budget: L0/L2/unbounded attacks (CW, DeepFool, JSMA, OnePixel...)
        norm = params.get("norm")
        if norm is not None and norm.default not in (inspect.Parameter.empty, "Linf"):
            continue
        out[key] = obj
    return out


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in sig.parameters.items() if k not in ("self", "model")}


def _first(params: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in params), None)


def _generic_spec(key: str, cls: type) -> AttackSpec:
    params = _init_params(cls)
    eps_p = _first(params, _EPS_PARAMS)
    steps_p = _first(params, _STEPS_PARAMS)
    step_p = _first(params, _STEP_SIZE_PARAMS)
    fraction = DEFAULT_STEP_FRACTION
    if step_p is not None and eps_p is not None:
        a, e = params[step_p].default, params[eps_p].default
        if isinstance(a, (int, float)) and isinstance(e, (int, float)) and e > 0:
            fraction = float(a) / float(e)

    def builder(model: nn.Module, eps: float, steps: int | None, step_size: float | None, random_start: bool,
                num_classes: int | None, seed: int | None, **kwargs: Any):
        args: dict[str, Any] = {eps_p: eps}
        if steps_p is not None and steps is not None:
            args[steps_p] = steps
        if step_p is not None and step_size is not None:
            args[step_p] = step_size
        if "random_start" in params:
            args["random_start"] = random_start
        if "norm" in params:
            args["norm"] = "Linf"
        if "verbose" in params:
            args["verbose"] = False
        if "n_classes" in params and num_classes is not None:
            args["n_classes"] = num_classes
        if "seed" in params and seed is not None:
            args["seed"] = seed
        args.update(kwargs)
        return cls(model, **args)

    reserved = {p for p in (eps_p, steps_p, step_p, "random_start", "norm") if p is not None}
    return AttackSpec(name=key, builder=builder, cls=cls, takes_steps=steps_p is not None,
                      takes_step_size=step_p is not None, takes_random_start="random_start" in params,
                      step_fraction=fraction, description=f"torchattacks.{cls.__name__}",
                      reserved=frozenset(reserved))


def get_attack_spec(name: str) -> AttackSpec:
    """The :class:`AttackSpec` for ``name`` (a built-in or a torchattacks L∞ attack).

    Raises:
        UserError: unknown or non-L∞ name, with close matches and the built-ins.

    Example:
        >>> get_attack_spec("MI-FGSM").name
        'mifgsm'
        >>> get_attack_spec("bim").takes_step_size
        True
    """
    key = canonical_attack_name(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _NOT_STANDARD:
        raise UserError(f"attack {name!r} here would be torchattacks' {key} class with its own defaults "
                        f"({_NOT_STANDARD[key]}), a weaker attack under the standard name; for the standard "
                        "AutoAttack evaluate a model with 'darht evaluate --attacks autoattack', and for a "
                        "matrix use apgd (APGD-CE) or pgd")
    if key in _NOT_LINF:
        raise UserError(f"attack {name!r} is {_NOT_LINF[key]}, not an L-inf attack; "
                        f"use one of {', '.join(list_attacks())} or another torchattacks L-inf attack")
    classes = _torchattacks_linf_classes()
    if key in classes:
        return _generic_spec(key, classes[key])
    every = {canonical_attack_name(a) for a in getattr(_ta(), "__all__", ())}
    if key in every:
        raise UserError(f"torchattacks attack {name!r} has no L-inf eps budget (an L0, L2 or unbounded attack); "
                        f"use one of {', '.join(list_attacks())} or another torchattacks L-inf attack")
    known = list_attacks(include_torchattacks=True)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    others = ", ".join(n for n in known if n not in _REGISTRY)
    raise UserError(f"unknown attack {name!r}; {hint}built-ins: {', '.join(list_attacks())}; "
                    f"other torchattacks L-inf attacks: {others}")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class AttackConfig:
    """An attack and its budget: name, ε, steps, step size, random start and extra kwargs.

    ``None`` for ``steps`` / ``step_size`` means the default (10 steps; ε/4 for the built-ins).
    :meth:`resolved` fills defaults in and drops settings that do not apply, so two configs that
    run the same attack have the same :meth:`key`.

    Example:
        >>> AttackConfig("fgsm", eps=8/255, steps=10).key() == AttackConfig("FGSM", eps=8/255).key()
        True
        >>> AttackConfig("pgd", eps=8/255).key() == AttackConfig("pgd", eps=8/255, steps=20).key()
        False
    """

    name: str = "pgd"
    eps: float = 8 / 255
    steps: int | None = None
    step_size: float | None = None
    random_start: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> AttackConfig:
        """A copy with the canonical name, defaults filled in, inapplicable settings set to None.

        Raises:
            UserError: unknown attack, bad ε/steps/step size, or kwargs the attack does not take.
        """
        spec = get_attack_spec(self.name)
        eps = float(self.eps)
        if not math.isfinite(eps) or eps < 0:
            raise UserError(f"`eps` must be a finite number >= 0, got {self.eps!r}")
        steps = None
        if spec.takes_steps:
            steps = spec.default_steps if self.steps is None else self.steps
            if isinstance(steps, bool) or int(steps) != steps or steps < 1:
                raise UserError(f"`steps` must be a positive integer, got {self.steps!r}")
            steps = int(steps)
        step_size = None
        if spec.takes_step_size:
            step_size = default_step_size(eps, spec.step_fraction) if self.step_size is None else float(self.step_size)
            if not math.isfinite(step_size) or step_size < 0:
                raise UserError(f"`step_size` must be a finite number >= 0, got {self.step_size!r}")
        random_start = bool(self.random_start) if spec.takes_random_start else None
        kwargs = dict(self.kwargs or {})
        _check_kwargs(spec, kwargs)
        return replace(self, name=spec.name, eps=eps, steps=steps, step_size=step_size,
                       random_start=random_start, kwargs=kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``config.yaml`` and the cache key)."""
        return {"name": self.name, "eps": self.eps, "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start, "kwargs": dict(self.kwargs)}

    def key(self) -> str:
        """Stable hex SHA-256 of the resolved settings: equal keys run the same attack."""
        blob = json.dumps(self.resolved().to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        """One line for logs, e.g. ``pgd eps=0.031373 (8/255) steps=10 step=0.007843``."""
        from ..utils import format_eps

        r = self.resolved()
        parts = [r.name, f"eps={format_eps(r.eps)}"]
        if r.steps is not None:
            parts.append(f"steps={r.steps}")
        if r.step_size is not None:
            parts.append(f"step={format_eps(r.step_size)}")
        if r.random_start is not None:
            parts.append(f"random_start={r.random_start}")
        if r.kwargs:
            parts.append(json.dumps(r.kwargs, sort_keys=True))
        return " ".join(parts)


def attack_record(attack: AttackConfig) -> dict[str, Any]:
    """What an attack runs, for ``config.yaml``: its resolved settings plus the torchattacks class
    and every default of that class the settings leave as they are (so the record is the whole run,
    not the part the user typed).

    Example:
        >>> rec = attack_record(AttackConfig("mifgsm", eps=8 / 255))
        >>> rec["class"], rec["class_defaults"]["decay"]
        ('torchattacks.MIFGSM', 1.0)
    """
    cfg = attack.resolved()
    spec = get_attack_spec(cfg.name)
    cls = spec.attack_class()
    out = {**cfg.to_dict(), "class": _class_name(cls) if cls is not None else spec.description,
           "class_defaults": {}}
    if cls is not None:
        given = set(cfg.kwargs) | set(spec.reserved) | {"model", "eps", "steps", "alpha", "random_start", "seed",
                                                          "verbose", "n_classes", "norm", "device"}
        for name, p in _init_params(cls).items():
            if name not in given and p.default is not inspect.Parameter.empty and \
                    (p.default is None or isinstance(p.default, (bool, int, float, str))):
                out["class_defaults"][name] = p.default
    return out


def _class_name(cls: type) -> str:
    """``torchattacks.PGD`` for a torchattacks class, else its module path (``transfer_analysis.attacks.LinfPGD``)."""
    if cls.__module__.split(".")[0] == "torchattacks":
        return f"torchattacks.{cls.__name__}"
    return f"transfer_analysis.attacks.{cls.__name__}"


def _check_kwargs(spec: AttackSpec, kwargs: Mapping[str, Any]) -> None:
    try:
        json.dumps(dict(kwargs), sort_keys=True)
    except (TypeError, ValueError) as err:
        raise UserError(f"attack kwargs must be plain JSON values, got {kwargs!r}") from err
    cls = spec.attack_class()
    if cls is None:
        return
    params = _init_params(cls)
    for k in kwargs:
        if k in spec.reserved:
            raise UserError(f"attack kwarg {k!r} is set by `eps`/`steps`/`step_size` for {spec.name}; "
                            "use those options instead")
        if k not in params:
            allowed = sorted(p for p in params if p not in spec.reserved)
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"attack {spec.name} takes no argument {k!r}{hint}; "
                            f"it takes {', '.join(allowed) or 'no extra arguments'}")


def build_attack(name: str | AttackConfig, model: nn.Module, eps: float | None = None, steps: int | None = None,
                 step_size: float | None = None, random_start: bool = True, *, num_classes: int | None = None,
                 seed: int | None = None, **kwargs: Any):
    """Build a torchattacks attack on ``model`` (pixel space, no normalization inside the attack).

    Args:
        name: a registered name (``pgd``, ``fgsm``, ``mifgsm``, ``apgd``), any torchattacks L∞
            attack name, or an :class:`AttackConfig` (then the other settings come from it).
        model: a module taking [0, 1] images; build the attack after moving it to its device.
        eps: L∞ radius (default 8/255).
        steps: iterations (default 10 where they apply).
        step_size: step (default ε/4 for the built-ins).
        random_start: uniform random start where the attack supports one.
        num_classes: passed as ``n_classes`` to attacks that need it (APGDT, FAB, AutoAttack).
        seed: passed to attacks that seed themselves (APGD, Square, FAB) unless kwargs set it.
        **kwargs: extra arguments of the torchattacks class (e.g. ``decay`` for MI-FGSM).

    Returns:
        A ``torchattacks.Attack``; call it as ``attack(x, y)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> atk = build_attack("mifgsm", nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), eps=0.1, decay=0.5)
        >>> type(atk).__name__, atk.steps, atk.decay
        ('MIFGSM', 10, 0.5)
    """
    if isinstance(name, AttackConfig):
        cfg = name
        if kwargs:
            cfg = replace(cfg, kwargs={**cfg.kwargs, **kwargs})
    else:
        cfg = AttackConfig(name=name, eps=8 / 255 if eps is None else eps, steps=steps, step_size=step_size,
                           random_start=random_start, kwargs=dict(kwargs))
    r = cfg.resolved()
    spec = get_attack_spec(r.name)
    return spec.builder(model, eps=r.eps, steps=r.steps, step_size=r.step_size,
                        random_start=bool(r.random_start), num_classes=num_classes, seed=seed, **dict(r.kwargs))

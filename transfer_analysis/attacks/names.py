"""The evaluation vocabulary (``clean``, ``fgsm``, ``pgd20``, ``cw``, ``transfer:NAME``, AutoAttack)
as :class:`~transfer_analysis.attacks.AttackConfig` objects of the registry.

One vocabulary for the whole toolkit: ``fgsm`` in evaluation is the registry's ``fgsm`` that the
matrix runs, ``pgdN`` is ``AttackConfig("pgd", steps=N)``, ``cwN`` is ``AttackConfig("cw",
steps=N)``, and ``transfer:NAME`` is the matrix's PGD-20 crafted on pool model NAME. What
``metrics.json`` records under ``settings`` is read off the same config object that runs.

Example:
    >>> parse_attacks("clean, PGD20,cw,transfer:vit_a,pgd20")
    ['clean', 'pgd20', 'cw', 'transfer:vit_a']
    >>> cfg = attack_config("pgd20", 8 / 255)
    >>> cfg.name, cfg.steps, cfg.step_size * 255
    ('pgd', 20, 2.0)
    >>> attack_config("cw", 8 / 255).steps
    30
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ..errors import UserError
from .autoattack import AUTOATTACK_VERSIONS, AutoAttackConfig, autoattack_config_for
from .pgd import CW_KAPPA
from .registry import AttackConfig, build_attack, get_attack_spec

__all__ = ["VALID_ATTACKS_TEXT", "CW_KAPPA", "CW_STEPS", "TRANSFER_STEPS", "parse_attacks", "attack_kind",
           "attack_config", "attack_settings", "transfer_source_name"]

VALID_ATTACKS_TEXT = ("clean, fgsm, pgd20 (pgdN for N steps), cw (cwN for N steps), autoattack, "
                      "autoattack-rand, autoattack-fast, transfer:NAME")

#: steps of ``cw`` without a number (the registry's default for ``cw``)
CW_STEPS = get_attack_spec("cw").default_steps
#: PGD steps that craft the black-box examples of ``transfer:NAME``
TRANSFER_STEPS = 20

_PGD_RE = re.compile(r"^pgd(\d+)$")
_CW_RE = re.compile(r"^cw(\d+)$")


def parse_attacks(spec: str | Iterable[str]) -> list[str]:
    """Validate attack names (a comma-separated string or a sequence) and return them canonical.

    Names are lower-cased (except the pool model name of ``transfer:NAME``); duplicates are
    dropped, order kept. Unknown names are a :class:`UserError` listing the valid ones.

    Example:
        >>> parse_attacks(["FGSM", "cw050"])
        ['fgsm', 'cw50']
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        if not isinstance(raw, str):
            raise UserError(f"attack names must be strings, got {raw!r}; valid: {VALID_ATTACKS_TEXT}")
        item = raw.strip()
        if not item:
            continue
        head, sep, tail = item.partition(":")
        if sep:
            if head.strip().lower() != "transfer":
                raise UserError(f"unknown attack {item!r}; valid: {VALID_ATTACKS_TEXT}")
            source = tail.strip()
            if not source:
                raise UserError(f"attack {item!r} needs a pool model name, e.g. transfer:vit_a")
            name = f"transfer:{source}"
        else:
            name = item.lower()
            m = _PGD_RE.match(name) or _CW_RE.match(name)
            if m:
                if int(m.group(1)) < 1:
                    raise UserError(f"attack {item!r} needs at least one step, e.g. pgd20")
                name = f"{name[:-len(m.group(1))]}{int(m.group(1))}"
            elif name not in ("clean", "fgsm", "cw", *AUTOATTACK_VERSIONS):
                raise UserError(f"unknown attack {item!r}; valid: {VALID_ATTACKS_TEXT}")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(f"no attack given; valid: {VALID_ATTACKS_TEXT}")
    return out


def attack_kind(name: str) -> str:
    """Family of a canonical attack name: clean, fgsm, pgd, cw, autoattack or transfer."""
    if name.startswith("transfer:"):
        return "transfer"
    if name.startswith("autoattack"):
        return "autoattack"
    if _PGD_RE.match(name):
        return "pgd"
    if name == "cw" or _CW_RE.match(name):
        return "cw"
    return name


def transfer_source_name(name: str) -> str:
    """The pool model of ``transfer:NAME``."""
    return name.split(":", 1)[1]


def attack_config(name: str, eps: float) -> AttackConfig | None:
    """The registry attack that the evaluation name ``name`` runs (resolved), or ``None`` for
    ``clean`` and AutoAttack (which is not one registry attack but an ensemble).

    Example:
        >>> attack_config("fgsm", 0.1).name, attack_config("transfer:resnet", 0.1).steps
        ('fgsm', 20)
    """
    kind = attack_kind(name)
    if kind in ("clean", "autoattack"):
        return None
    if kind == "fgsm":
        cfg = AttackConfig("fgsm", eps=eps)
    elif kind == "transfer":
        cfg = AttackConfig("pgd", eps=eps, steps=TRANSFER_STEPS)
    else:
        m = _PGD_RE.match(name) or _CW_RE.match(name)
        cfg = AttackConfig(kind, eps=eps, steps=int(m.group(1)) if m else None)
    return cfg.resolved()


def attack_settings(name: str, eps: float, autoattack_config: AutoAttackConfig | None = None,
                    eot_iter: int | None = None) -> dict[str, Any]:
    """The settings one attack runs with (what ``metrics.json`` records under ``settings``), read
    off the object that runs: the :class:`AttackConfig` of :func:`attack_config` (its loss, start
    and step), or the AutoAttack version's :class:`AutoAttackConfig`.

    Example:
        >>> attack_settings("pgd20", 8 / 255)["alpha"] == 2 / 255
        True
        >>> attack_settings("fgsm", 0.1)
        {'attack': 'fgsm', 'loss': 'ce', 'steps': 1, 'alpha': 0.1, 'start': 'zero'}
    """
    kind = attack_kind(name)
    if kind == "clean":
        return {"perturbation": "none"}
    if kind == "autoattack":
        cfg = autoattack_config_for(name, autoattack_config, eot_iter)
        return {"version": cfg.name, "library": "torchattacks components", **cfg.to_dict()}
    from torch import nn

    cfg = attack_config(name, eps)
    pgd = build_attack(cfg, nn.Identity())  # a LinfPGD: its settings are what runs
    out: dict[str, Any] = {"attack": cfg.name, "loss": pgd.loss}
    if pgd.loss == "margin":
        out["kappa"] = pgd.kappa
    out.update({"steps": pgd.steps, "alpha": pgd.alpha, "start": pgd.start})
    if kind == "transfer":
        out = {"source": transfer_source_name(name), "crafted_with": f"pgd{TRANSFER_STEPS}", **out}
    return out

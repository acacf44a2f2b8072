"""AutoAttack's versions as settings objects, and the ensemble built from torchattacks' components.

``AutoAttackConfig`` is both what runs and what ``metrics.json`` records: ``standard`` (the
official settings: APGD-CE and APGD-T with 100 iterations, FAB-T with 100, Square with 5000
queries), ``rand`` (APGD-CE and APGD-DLR with 20 EOT samples per step) and a ``fast``
non-standard variant. torchattacks' own ``AutoAttack`` class defaults to 10 iterations, so the
components are configured here explicitly.

Example:
    >>> autoattack_config_for("autoattack").apgd_steps, autoattack_config_for("autoattack-rand").eot_iter
    (100, 20)
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..runtime import model_device, resolve_device

__all__ = ["AutoAttackConfig", "AUTOATTACK_STANDARD", "AUTOATTACK_FAST", "AUTOATTACK_RAND", "AUTOATTACK_VERSIONS",
           "autoattack_config_for", "build_autoattack"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoAttackConfig:
    """Settings of the AutoAttack ensemble; the defaults are the official *standard* version.

    ``apgdt_targets`` and ``fab_targets`` are capped at ``n_classes - 1`` when the data has fewer
    classes. Pass a reduced copy (``dataclasses.replace``) only for quick checks; results with
    non-default settings are not AutoAttack numbers.

    Example:
        >>> cfg = AutoAttackConfig()
        >>> cfg.components, cfg.apgd_steps, cfg.apgdt_targets, cfg.fab_targets, cfg.square_queries
        (('apgd-ce', 'apgd-t', 'fab-t', 'square'), 100, 9, 9, 5000)
    """

    name: str = "standard"
    components: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
    apgd_steps: int = 100
    apgd_restarts: int = 1
    apgd_rho: float = 0.75
    apgdt_steps: int = 100
    apgdt_targets: int = 9
    apgdt_restarts: int = 1
    fab_steps: int = 100
    fab_targets: int = 9
    fab_restarts: int = 1
    fab_alpha_max: float = 0.1
    fab_eta: float = 1.05
    fab_beta: float = 0.9
    square_queries: int = 5000
    square_p_init: float = 0.8
    square_restarts: int = 1
    square_rescale_schedule: bool = False
    #: gradient samples averaged per APGD step (expectation over transformation); 1 = deterministic model
    eot_iter: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["components"] = list(self.components)
        return d


AUTOATTACK_STANDARD = AutoAttackConfig()
AUTOATTACK_FAST = AutoAttackConfig(name="fast (non-standard: APGD-CE + APGD-T only)",
                                   components=("apgd-ce", "apgd-t"))
#: AutoAttack's version="rand" for randomized defenses: APGD-CE and APGD-DLR, 20 EOT samples per step
AUTOATTACK_RAND = AutoAttackConfig(name="rand", components=("apgd-ce", "apgd-dlr"), eot_iter=20)
#: attack name -> its AutoAttack version
AUTOATTACK_VERSIONS = {"autoattack": AUTOATTACK_STANDARD, "autoattack-fast": AUTOATTACK_FAST,
                       "autoattack-rand": AUTOATTACK_RAND}


def autoattack_config_for(name: str, override: AutoAttackConfig | None = None,
                          eot_iter: int | None = None) -> AutoAttackConfig:
    """The AutoAttack settings that ``name`` runs: the one rule behind evaluation and its record.

    ``override`` replaces the version's settings (quick tests only); ``eot_iter`` sets the EOT
    samples of ``autoattack-rand`` (default 20, AutoAttack's).

    Example:
        >>> autoattack_config_for("autoattack-rand", eot_iter=5).eot_iter, autoattack_config_for("autoattack").name
        (5, 'standard')
    """
    cfg = override or AUTOATTACK_VERSIONS[name]
    if name == "autoattack-rand" and eot_iter is not None:
        cfg = replace(cfg, eot_iter=int(eot_iter))
    return cfg


_AA_COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr")


def build_autoattack(model: nn.Module, eps: float, n_classes: int,
                     config: AutoAttackConfig = AUTOATTACK_STANDARD, seed: int = 0,
                     device: torch.device | str | None = None) -> list[tuple[str, Any]]:
    """The AutoAttack components, configured explicitly, as ``[(name, torchattacks attack), ...]``.

    Targets are ``min(config targets, n_classes - 1)``; APGD-T is left out below 4 classes (its
    targeted DLR loss needs them). torchattacks takes the number of targets as ``n_classes - 1``,
    so it is given ``targets + 1``.

    Example:
        >>> from torch import nn
        >>> comps = build_autoattack(nn.Sequential(nn.Flatten(), nn.Linear(4, 10)), 8 / 255, n_classes=10)
        >>> [(name, getattr(a, "steps", None)) for name, a in comps]
        [('apgd-ce', 100), ('apgd-t', 100), ('fab-t', 100), ('square', None)]
    """
    from .registry import _ta

    torchattacks = _ta()
    unknown = [c for c in config.components if c not in _AA_COMPONENTS]
    if unknown:
        raise ValueError(f"unknown AutoAttack component(s) {unknown}; use {', '.join(_AA_COMPONENTS)}")
    dev = resolve_device(device) if device is not None else model_device(model)
    comps: list[tuple[str, Any]] = []
    # torchattacks prints when it cannot guess the device (a model without parameters): keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for name in config.components:
            if name in ("apgd-ce", "apgd-dlr"):
                atk = torchattacks.APGD(model, norm="Linf", eps=eps, steps=config.apgd_steps,
                                        n_restarts=config.apgd_restarts, seed=seed, loss=name.split("-")[1],
                                        eot_iter=config.eot_iter, rho=config.apgd_rho, verbose=False)
            elif name == "apgd-t":
                targets = min(config.apgdt_targets, n_classes - 1)
                if n_classes < 4 or targets < 1:
                    logger.warning("APGD-T skipped: its targeted DLR loss needs at least 4 classes (the data has %d)",
                                   n_classes)
                    continue
                atk = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=config.apgdt_steps,
                                         n_restarts=config.apgdt_restarts, seed=seed, eot_iter=config.eot_iter,
                                         rho=config.apgd_rho, verbose=False, n_classes=targets + 1)
            elif name == "fab-t":
                targets = min(config.fab_targets, n_classes - 1)
                if targets < 1:
                    continue
                atk = torchattacks.FAB(model, norm="Linf", eps=eps, steps=config.fab_steps,
                                       n_restarts=config.fab_restarts, alpha_max=config.fab_alpha_max,
                                       eta=config.fab_eta, beta=config.fab_beta, verbose=False, seed=seed,
                                       multi_targeted=True, n_classes=targets + 1)
            else:  # square
                atk = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=config.square_queries,
                                          n_restarts=config.square_restarts, p_init=config.square_p_init,
                                          loss="margin", resc_schedule=config.square_rescale_schedule,
                                          seed=seed, verbose=False)
            atk.set_device(dev)
            comps.append((name, atk))
    if out.getvalue().strip():
        logger.debug("torchattacks: %s", out.getvalue().strip())
    return comps

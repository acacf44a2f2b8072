"""Per-sample correctness under one attack: the unit every evaluation number is built from.

A sample is correct under an attack only if it is correct clean *and* on the attack's output.
Samples are processed in fixed groups of ``batch_size`` positions; each group is seeded by its
index (:func:`_group_seed`), so every sample's result is the same whatever the number of
processes under ``torchrun`` (every ``world``-th group per process).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
    >>> robust_accuracy(model, x, y, "fgsm", eps=0.1) <= accuracy(model, x, y)
    True
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from transfer_analysis.attacks import (
    AttackConfig,
    AutoAttackConfig,
    attack_config,
    attack_kind,
    autoattack_config_for,
    build_attack,
    build_autoattack,
    clip_attack_output,
    eval_mode,
    parse_attacks,
    transfer_source_name,
)
from transfer_analysis.errors import UserError
from transfer_analysis.runtime import model_device, resolve_device, seeded
from transfer_analysis.utils import parse_eps, progress

__all__ = ["per_sample_correct", "accuracy", "robust_accuracy"]

logger = logging.getLogger("distill.evaluation")


def _resolve_eval_device(model: nn.Module, x: torch.Tensor, device: str | torch.device | None) -> torch.device:
    """The device to evaluate on; a model elsewhere is moved there (in place)."""
    if device is None:
        return model_device(model, x.device)
    dev = resolve_device(device)
    here = model_device(model, dev)
    if here != dev:
        logger.debug("moving the model from %s to %s for evaluation", here, dev)
        model.to(dev)
    return dev


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x).detach()
    y = torch.as_tensor(y).detach().long()
    if x.ndim != 4:
        raise UserError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise UserError(f"labels must have shape ({x.shape[0]},) to match the images, got {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise UserError("no images to evaluate; give at least one sample")
    if not x.is_floating_point():
        raise UserError(f"images must be floats in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise UserError(f"images must lie in [0, 1] (pixel space; models normalize inside forward), found "
                        f"values in [{lo:.3g}, {hi:.3g}]; do not normalize the inputs")
    return x, y


def _chunks(indices: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def _my_groups(n: int, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """This process's fixed groups of sample positions: ``(g, positions)`` for group ``g`` of
    ``[g * batch_size, (g + 1) * batch_size)``, every ``world``-th group under ``torchrun``.

    A group is the unit of seeding and of sharding: each attack call sees the points of one group
    (those still to attack) and is seeded from the group's index, so the result of every sample
    is the same whatever the number of processes.
    """
    from transfer_analysis import distributed as dist_utils

    world, rank = dist_utils.world_size(), dist_utils.rank()
    return [(g, idx) for g, idx in enumerate(_chunks(torch.arange(n), batch_size)) if g % world == rank]


def _group_seed(seed: int, group: int) -> int:
    return int(seed) * 1_000_003 + int(group)


def _gather_groups(values: torch.Tensor, groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Every process's results on its groups, merged into one vector (the input for one process)."""
    from transfer_analysis import distributed as dist_utils

    if dist_utils.world_size() == 1:
        return values
    pos = torch.cat([idx for _, idx in groups]) if groups else torch.zeros(0, dtype=torch.long)
    out = values.clone()
    for their_pos, their_values in dist_utils.all_gather_object((pos, values[pos].cpu())):
        out[their_pos] = their_values.to(out.device)
    return out


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


@torch.no_grad()
def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """Per-sample clean correctness (CPU bool) and the number of logits the model returns."""
    out = torch.zeros(len(y), dtype=torch.bool)
    n_logits = 0
    all_idx = torch.arange(len(y))
    with eval_mode(model):
        for idx in progress(list(_chunks(all_idx, batch_size)), desc="clean"):
            logits = model(x[idx].to(device))
            if logits.ndim != 2 or logits.shape[0] != len(idx):
                raise UserError(f"the model returns shape {tuple(logits.shape)} for {len(idx)} images; "
                                "expected logits of shape (N, classes)")
            n_logits = int(logits.shape[1])
            out[idx] = (logits.argmax(1) == y[idx].to(device)).cpu()
    return out, n_logits


def _autoattack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, eps: float,
                        n_classes: int, config: AutoAttackConfig, batch_size: int, seed: int,
                        device: torch.device, details: dict[str, Any], state: Any = None,
                        attack_name: str = "autoattack") -> torch.Tensor:
    """AutoAttack per sample: each component on the points still robust; worst case per point.

    With a ``state`` (:class:`distill.eval_state.EvalState`), the points still robust are saved
    after every component, and components finished before an interruption are skipped.
    """
    robust = clean.clone()
    comps = build_autoattack(model, eps, n_classes, config, seed=seed, device=device)
    details["components_run"] = [name for name, _ in comps]
    details["apgd_t_targets"] = min(config.apgdt_targets, n_classes - 1) if "apgd-t" in details["components_run"] \
        else 0
    details["fab_t_targets"] = min(config.fab_targets, n_classes - 1) if "fab-t" in details["components_run"] else 0
    if "apgd-t" in config.components and "apgd-t" not in details["components_run"]:
        details["skipped"] = f"apgd-t (needs >= 4 classes, the data has {n_classes})"
    after: dict[str, float] = {}
    finished: list[str] = []
    if state is not None and attack_name in state.partial:
        part = state.partial[attack_name]
        robust, after, finished = part["robust"].to(robust.device).clone(), dict(part["after"]), \
            list(part["components_done"])
    groups = _my_groups(len(y), batch_size)
    for name, atk in comps:
        if name in finished:
            continue
        for _, group in progress(groups, desc=f"autoattack {name}"):
            chunk = group[robust[group]]  # each component on the points of the group still robust
            if not len(chunk):
                continue
            xb, yb = x[chunk].to(device), y[chunk].to(device)
            with contextlib.redirect_stdout(io.StringIO()):
                x_adv = atk(xb, yb)  # torchattacks seeds every call with the component's seed
            x_adv = clip_attack_output(x_adv.detach().to(device), xb, eps, name)
            fooled = (_predict(model, x_adv) != yb).cpu()
            robust[chunk[fooled]] = False
        robust = _gather_groups(robust, groups)
        after[name] = int(robust.sum()) / len(robust)
        logger.debug("autoattack: accuracy %.4f after %s", after[name], name)
        if state is not None:
            state.component_done(attack_name, name, robust, after)
    details["accuracy_after"] = after
    return robust


def _pgd_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, *, attack: AttackConfig,
                 batch_size: int, device: torch.device, desc: str, source: nn.Module | None = None,
                 seed: int = 0) -> torch.Tensor:
    """Correct under the registry attack ``attack`` crafted on ``source`` (default: the model
    itself), only clean-correct points; each fixed group of samples seeded by itself (:func:`_my_groups`)."""
    robust = clean.clone()
    attacker = source if source is not None else model
    atk = build_attack(attack, attacker)
    groups = _my_groups(len(y), batch_size)
    with eval_mode(attacker):
        for g, group in progress(groups, desc=desc):
            chunk = group[clean[group]]
            if not len(chunk):
                continue
            xb, yb = x[chunk].to(device), y[chunk].to(device)
            with seeded(_group_seed(seed, g), device):
                x_adv = atk(xb, yb)
            robust[chunk] = (_predict(model, x_adv) == yb).cpu()
    return _gather_groups(robust, groups)


def _attack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, name: str,
                    eps: float, batch_size: int, pool: Mapping[str, nn.Module] | None, seed: int,
                    n_classes: int, device: torch.device, autoattack_config: AutoAttackConfig | None,
                    details: dict[str, Any], eot_iter: int | None = None, state: Any = None) -> torch.Tensor:
    kind = attack_kind(name)
    if kind == "clean":
        return clean.clone()
    with seeded(seed, device):
        if kind in ("fgsm", "pgd", "cw", "transfer"):
            source = _transfer_source(name, pool) if kind == "transfer" else None
            if source is not None and model_device(source, device) != device:
                source.to(device)
            return _pgd_correct(model, x, y, clean, attack=attack_config(name, eps), batch_size=batch_size,
                                device=device, desc=name, source=source, seed=seed)
        # AutoAttack
        if eps == 0:
            details["components_run"] = []
            return clean.clone()
        cfg = autoattack_config_for(name, autoattack_config, eot_iter)
        with eval_mode(model):
            return _autoattack_correct(model, x, y, clean, eps, n_classes, cfg, batch_size, seed, device, details,
                                       state=state, attack_name=name)


def _transfer_source(name: str, pool: Mapping[str, nn.Module] | None) -> nn.Module:
    """The pool model that crafts the examples of ``transfer:NAME``; a clear error when missing."""
    source_name = transfer_source_name(name)
    if pool is None:
        raise UserError(f"attack {name!r} needs a pool of source models (`pool`)")
    if source_name not in pool:
        raise UserError(f"attack {name!r}: no model {source_name!r} in the pool; it has "
                        f"{', '.join(sorted(pool)) or 'no models'}")
    return pool[source_name]


def per_sample_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "pgd20",
                       eps: float | str = 8 / 255, batch_size: int = 256,
                       pool: Mapping[str, nn.Module] | None = None, seed: int = 0, n_classes: int | None = None,
                       device: str | torch.device | None = None,
                       autoattack_config: AutoAttackConfig | None = None) -> torch.Tensor:
    """Which samples the model classifies correctly under one attack (a CPU ``BoolTensor`` of length N).

    A sample is correct only if it is correct clean *and* on the attack's output (see the module
    docstring). ``pool`` maps names to models for ``transfer:NAME``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> bool((per_sample_correct(model, x, y, "pgd20", eps=0.0) == per_sample_correct(model, x, y, "clean")).all())
        True
    """
    (name,) = parse_attacks([attack])
    eps_f = parse_eps(eps)
    x, y = _check_inputs(x, y)
    dev = _resolve_eval_device(model, x, device)
    with eval_mode(model):
        clean, n_logits = _clean_correct(model, x, y, batch_size, dev)
        return _attack_correct(model, x, y, clean, name, eps_f, batch_size, pool, seed, n_classes or n_logits, dev,
                               autoattack_config, {})


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Clean accuracy (a fraction in [0, 1]), in eval mode and without gradients.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.eye(2)); _ = lin.bias.zero_()
        >>> accuracy(nn.Sequential(nn.Flatten(), lin), torch.tensor([[[[0.9, 0.1]]], [[[0.2, 0.7]]]]),
        ...          torch.tensor([0, 0]))
        0.5
    """
    x, y = _check_inputs(x, y)
    dev = model_device(model, x.device)
    clean, _ = _clean_correct(model, x, y, batch_size, dev)
    return int(clean.sum()) / len(clean)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "pgd20",
                    eps: float | str = 8 / 255, batch_size: int = 256,
                    pool: Mapping[str, nn.Module] | None = None, seed: int = 0) -> float:
    """Accuracy under one attack (a fraction in [0, 1]); see :func:`per_sample_correct`.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> robust_accuracy(model, x, y, "fgsm", eps=0.1) <= accuracy(model, x, y)
        True
    """
    correct = per_sample_correct(model, x, y, attack, eps, batch_size, pool, seed)
    return int(correct.sum()) / len(correct)

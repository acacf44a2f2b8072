"""The entry point: :func:`evaluate_robustness` runs every attack, the masking checks, and returns
the ``metrics.json`` dict (see the package docstring for the attacks).

Example:
    >>> check_attack_samples({"AutoAttack": 200}, ["clean", "pgd20", "autoattack"])
    {'autoattack': 200}
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from transfer_analysis.attacks import AutoAttackConfig, attack_kind, attack_settings, eval_mode, parse_attacks
from transfer_analysis.errors import UserError
from transfer_analysis.utils import format_eps, parse_eps

from .checks import (
    UPPER_BOUND_NOTE,
    _eps_sweep,
    _randomness_check,
    _zero_gradient_check,
    masking_flags,
    noise_tolerance,
)
from .correct import (
    _attack_correct,
    _check_inputs,
    _clean_correct,
    _my_groups,
    _resolve_eval_device,
    _transfer_source,
)

__all__ = ["DEFAULT_ATTACKS", "evaluate_robustness", "check_attack_samples"]

logger = logging.getLogger("distill.evaluation")

DEFAULT_ATTACKS: tuple[str, ...] = ("clean", "fgsm", "pgd20", "cw", "autoattack")


def evaluate_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        attacks: str | Sequence[str] = DEFAULT_ATTACKS, eps: float | str = 8 / 255,
                        batch_size: int = 256, pool: Mapping[str, nn.Module] | None = None, seed: int = 0,
                        device: str | torch.device | None = None, n_classes: int | None = None,
                        check_eps_sweep: bool = True, *,
                        autoattack_config: AutoAttackConfig | None = None,
                        attack_samples: Mapping[str, int] | None = None,
                        subset_seed: int | None = None, eot_iter: int | None = None,
                        state_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate ``model`` under every attack in ``attacks``; return the ``metrics.json`` dict.

    Args:
        model: maps [0, 1] images to logits; evaluated in eval mode (its mode is restored after).
        x, y: images (N, C, H, W) in [0, 1] and labels (N,), on any device (moved per batch).
        attacks: names (see the module docstring) or a comma-separated string. ``clean`` is always
            reported.
        eps: L∞ radius, a number or a fraction string such as ``"8/255"``.
        batch_size: samples per attack batch.
        pool: name -> model, for ``transfer:NAME``.
        seed: seeds every attack (the caller's RNG state is left untouched).
        device: where to evaluate (default: the model's device); the model is moved if needed.
        n_classes: classes of the data (default: the width of the model's logits).
        check_eps_sweep: also run PGD-20 at a large ε on a subset (a gradient-masking check).
        autoattack_config: override AutoAttack's settings (default: the official standard ones;
            ``autoattack-fast`` uses :data:`AUTOATTACK_FAST`). For quick tests only.
        attack_samples: attack -> number of samples, to run an expensive attack (AutoAttack) on a
            seeded class-balanced subset of ``x`` only; the subsets are nested (a smaller one is
            inside a larger one). Its accuracy is then over its subset, and ``worst_case`` and the
            masking flags use the samples every attack ran on, so they compare like with like.
        subset_seed: seeds those subsets (default: ``seed``); fix it to evaluate several models on
            the same samples while their attacks are seeded differently.
        eot_iter: EOT gradient samples per step of ``autoattack-rand`` (AutoAttack's rand version for
            randomized models; default 20).
        state_path: keep a resumable state there (:mod:`distill.eval_state`): every finished attack
            and AutoAttack component is saved, and a later call with the same model, data and
            settings continues from it and returns exactly the same metrics. The caller deletes it
            once the result is written (:meth:`~distill.eval_state.EvalState.remove`).

    Returns:
        ``{"n", "eps", "accuracy": {attack: fraction}, "n_per_attack": {attack: samples},
        "worst_case", "worst_case_n", "flags": [...], "settings": {...}, "diagnostics": {...}}``;
        ``worst_case`` is the fraction of the ``worst_case_n`` samples every attack ran on that
        are correct under every attack (clean included).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> m = evaluate_robustness(model, x, y, attacks="clean,pgd20", eps=0.0, check_eps_sweep=False)
        >>> m["accuracy"]["pgd20"] == m["accuracy"]["clean"] == m["worst_case"]
        True
    """
    names = parse_attacks(attacks)
    eps_f = parse_eps(eps)
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise UserError(f"`batch_size` must be a positive integer, got {batch_size}")
    batch_size = int(batch_size)
    x, y = _check_inputs(x, y)
    for name in names:
        if attack_kind(name) == "transfer":
            _transfer_source(name, pool)  # fail before any attack runs
    dev = _resolve_eval_device(model, x, device)
    if "clean" not in names:
        names = ["clean", *names]
    subsets = _attack_subsets(attack_samples, names, y, seed if subset_seed is None else subset_seed)
    logger.info("evaluating %d samples at eps %s: %s", len(y), format_eps(eps_f),
                ", ".join(f"{k} ({len(subsets[k])})" if k in subsets else k for k in names))
    run = _Run(model=model, x=x, y=y, names=names, eps=eps_f, batch_size=batch_size, pool=pool, seed=int(seed),
               device=dev, subsets=subsets, autoattack_config=autoattack_config, eot_iter=eot_iter)
    with eval_mode(model):
        t0 = time.perf_counter()
        clean, n_logits = _clean_correct(model, x, y, batch_size, dev)
        run.seconds["clean"] = time.perf_counter() - t0
        if n_classes is not None and int(n_classes) != n_logits:
            raise UserError(f"the model returns {n_logits} logits but the data has {n_classes} classes; "
                            "check num_classes of the model")
        run.classes = int(n_classes) if n_classes is not None else n_logits
        run.results["clean"] = clean
        _run_attacks(run, _open_state(run, state_path))
        t0 = time.perf_counter()
        diagnostics = _run_checks(run, check_eps_sweep)
        run.seconds["checks"] = time.perf_counter() - t0
    return _metrics(run, diagnostics, check_eps_sweep)


@dataclass
class _Run:
    """One evaluation's inputs and what it has found so far."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    names: list[str]
    eps: float
    batch_size: int
    pool: Mapping[str, nn.Module] | None
    seed: int
    device: torch.device
    subsets: dict[str, torch.Tensor]
    autoattack_config: AutoAttackConfig | None
    eot_iter: int | None
    classes: int = 0
    results: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings_of(self, name: str) -> dict[str, Any]:
        return attack_settings(name, self.eps, self.autoattack_config, self.eot_iter)


def _open_state(run: _Run, state_path: str | os.PathLike | None) -> Any:
    """The resumable state of this evaluation (:mod:`distill.eval_state`), or None."""
    if state_path is None:
        return None
    from distill.eval_state import EvalState, evaluation_key
    from transfer_analysis import distributed as dist_utils

    defining = {"attacks": run.names, "eps": run.eps, "seed": run.seed, "batch_size": run.batch_size,
                "classes": run.classes, "subsets": {k: v.tolist() for k, v in run.subsets.items()},
                "settings": {k: run.settings_of(k) for k in run.names}}
    # every process reads the state; rank 0 alone writes it
    return EvalState(state_path, evaluation_key(run.model, run.x, run.y, defining), write=dist_utils.rank() == 0)


def _run_attacks(run: _Run, state: Any) -> None:
    """Every attack but clean, each on its subset; finished ones come from ``state``."""
    clean = run.results["clean"]
    for name in run.names:
        if name == "clean":
            continue
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        pos = run.subsets.get(name)
        xs, ys, cs = (run.x, run.y, clean) if pos is None else (run.x[pos], run.y[pos], clean[pos])
        if state is not None and name in state.done:  # finished before an interruption
            run.results[name], info = state.done[name].to(clean.device), dict(state.details[name])
        else:
            run.results[name] = _attack_correct(run.model, xs, ys, cs, name, run.eps, run.batch_size, run.pool,
                                                run.seed, run.classes, run.device, run.autoattack_config, info,
                                                run.eot_iter, state)
            if state is not None:
                state.finish(name, run.results[name], info)
        run.seconds[name] = time.perf_counter() - t0
        if attack_kind(name) == "autoattack":
            run.details[name] = info
        done, correct = len(run.results[name]), int(run.results[name].sum())
        logger.info("%-16s accuracy %.4f (%d/%d, %.1f s)", name, correct / done, correct, done, run.seconds[name])


def _run_checks(run: _Run, check_eps_sweep: bool) -> dict[str, Any]:
    """The gradient-masking checks' diagnostics (zero gradients, randomness, the ε sweep)."""
    model, x, y, dev = run.model, run.x, run.y, run.device
    diagnostics: dict[str, Any] = {}
    if len(run.names) > 1:
        zero, checked = _zero_gradient_check(model, x, y, run.batch_size, dev, eps=run.eps, seed=run.seed)
        diagnostics.update(zero_gradient_count=zero, zero_gradient_checked=checked,
                           zero_gradient_fraction=zero / checked)
    rnd, probs, distinct, changed = _randomness_check(model, x, run.batch_size, dev)
    diagnostics.update(randomness_max_diff=rnd, randomness_predictions_changed=changed,
                       outputs_are_probabilities=probs, predicted_classes=distinct)
    has_white = any(attack_kind(k) in ("fgsm", "pgd", "cw", "autoattack") for k in run.names)
    if check_eps_sweep and has_white and run.eps > 0:
        full = {k: v for k, v in run.results.items() if k not in run.subsets}
        diagnostics["eps_sweep"] = _eps_sweep(model, x, y, run.results["clean"], run.eps, full, run.batch_size,
                                              run.seed, dev)
    if run.details:
        diagnostics["autoattack"] = run.details
    return diagnostics


def _metrics(run: _Run, diagnostics: dict[str, Any], check_eps_sweep: bool) -> dict[str, Any]:
    """The ``metrics.json`` dict: accuracies, the worst case on the common samples, flags, settings."""
    from transfer_analysis import distributed as dist_utils

    names, results, subsets, n = run.names, run.results, run.subsets, len(run.y)
    acc = {name: int(results[name].sum()) / len(results[name]) for name in names}
    # the samples every attack ran on: the smallest subset (they are nested), else all
    common = min(subsets.values(), key=len) if subsets else torch.arange(n)
    on_common = {}
    for name in names:
        full = torch.zeros(n, dtype=torch.bool)
        full[subsets.get(name, torch.arange(n))] = results[name].cpu()
        on_common[name] = full[common]
    n_common = len(common)
    worst = torch.stack(list(on_common.values())).all(0)
    # how the fixed groups of samples were shared out (under torchrun: every world-th group per process)
    diagnostics["groups_per_process"] = [int(k) for k in
                                         dist_utils.all_gather_object(len(_my_groups(n, run.batch_size)))]
    diagnostics["correct"] = {name: int(results[name].sum()) for name in names}
    diagnostics["worst_case_correct"] = int(worst.sum())
    diagnostics["seconds"] = run.seconds
    acc_common = {name: int(v.sum()) / n_common for name, v in on_common.items()}
    if subsets:
        diagnostics["subsets"] = {"n_common": n_common, "accuracy_common": acc_common,
                                  "positions": {k: [int(i) for i in v] for k, v in subsets.items()}}
    flags = masking_flags(acc_common, n_common, diagnostics)
    for flag in flags:
        logger.warning("gradient-masking check: %s", flag)
    settings = {
        "attacks": names, "eps": run.eps, "eps_text": format_eps(run.eps), "norm": "Linf",
        "batch_size": run.batch_size, "seed": run.seed, "n_classes": run.classes, "device": str(run.device),
        "check_eps_sweep": bool(check_eps_sweep),
        "attack_settings": {name: run.settings_of(name) for name in names},
        "attack_samples": {k: len(v) for k, v in subsets.items()},
        "noise_tolerance": noise_tolerance(n_common),
    }
    return {"n": n, "eps": run.eps, "accuracy": acc, "n_per_attack": {k: len(results[k]) for k in names},
            "worst_case": int(worst.sum()) / n_common, "worst_case_n": n_common, "flags": flags,
            "upper_bound": bool(flags), "upper_bound_note": UPPER_BOUND_NOTE if flags else None,
            "settings": settings, "diagnostics": diagnostics}


def check_attack_samples(attack_samples: Mapping[str, int] | None, attacks: Sequence[str]) -> dict[str, int]:
    """Validate an ``attack -> sample count`` mapping against the attacks run; canonical names.

    The one check behind ``evaluate_robustness(attack_samples=...)``, ``final_attack_samples``,
    ``darht evaluate --attack-samples`` and a study's ``evaluation.attack_samples``.

    Example:
        >>> check_attack_samples({"AutoAttack": 200}, ["clean", "pgd20", "autoattack"])
        {'autoattack': 200}
    """
    if attack_samples is None:
        return {}
    if not isinstance(attack_samples, Mapping):
        raise UserError("attack samples: expected a mapping that maps attack names to sample counts "
                        f"(e.g. {{'autoattack': 200}}), got {attack_samples!r}")
    canonical = parse_attacks(attacks)
    out: dict[str, int] = {}
    for key, value in attack_samples.items():
        parsed = parse_attacks([key])
        name = parsed[0] if parsed else key
        if name == "clean":
            raise UserError("clean accuracy is always measured on every sample; attack samples cannot limit it")
        if name not in canonical:
            raise UserError(f"attack samples given for {key!r}, which is not among the attacks run "
                            f"({', '.join(canonical)})")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"attack samples for {key!r} must be a positive integer, got {value!r}")
        out[name] = value
    return out


def _attack_subsets(attack_samples: Mapping[str, int] | None, names: Sequence[str], y: torch.Tensor,
                    seed: int) -> dict[str, torch.Tensor]:
    """attack -> positions in ``y`` (sorted) for the attacks limited to fewer samples than ``y`` has.

    The subsets are seeded, class-balanced and nested: the largest is drawn from all samples, each
    smaller one from the one before.
    """
    from transfer_analysis.data import balanced_subset

    limits = {name: m for name, m in check_attack_samples(attack_samples, names).items() if m < len(y)}
    subsets: dict[str, torch.Tensor] = {}
    pool = torch.arange(len(y))
    for name, m in sorted(limits.items(), key=lambda kv: -kv[1]):
        pool = pool[balanced_subset(y.cpu()[pool], m, seed=seed)]
        subsets[name] = pool
    return subsets

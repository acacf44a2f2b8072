"""Gradient-masking checks, in the spirit of AutoAttack's ``checks.py`` and at its sensitivity or
stricter: when one fires, the robust accuracies are upper bounds, not estimates.

Example:
    >>> masking_flags({"clean": 0.9, "fgsm": 0.3, "pgd20": 0.6}, n=1000)[0].split(":")[0]
    'pgd-weaker-than-fgsm'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transfer_analysis.attacks import attack_config, attack_kind, eval_mode, margin_loss
from transfer_analysis.runtime import seeded

from .correct import _chunks, _pgd_correct

__all__ = ["masking_flags", "noise_tolerance", "UPPER_BOUND_NOTE"]

# Gradient-masking checks.
NOISE_TOLERANCE = 0.01      # accuracy differences below max(this, 1.5 / n) are noise
SWEEP_EPS = 0.5             # the large ε of the sweep (or 4 ε if larger, at most 1)
SWEEP_SAMPLES = 200         # points of the sweep subset
SWEEP_MAX_ACCURACY = 0.1    # PGD accuracy above this at the large ε is flagged
GRADIENT_SAMPLES = 512      # points whose input gradient is checked for all-zeros
RANDOMNESS_TOLERANCE = 1e-4  # max L2 difference of L2-normalized logits between forwards (AutoAttack's alpha)
RANDOMNESS_FORWARDS = 5      # forwards compared by the randomness check (AutoAttack's check_randomized: 5)
SQUARE_TOLERANCE = 0.002     # AutoAttack's check_square_sr: Square may lower accuracy by at most 0.2%
UPPER_BOUND_NOTE = ("a gradient-masking check fired: the robust accuracies are upper bounds, not estimates "
                    "(see flags)")


def noise_tolerance(n: int) -> float:
    """Accuracy difference below which two attacks are "the same" on ``n`` samples.

    ``max(NOISE_TOLERANCE, 1.5 / n)``: one sample never raises a flag.

    Example:
        >>> noise_tolerance(1000), noise_tolerance(50)
        (0.01, 0.03)
    """
    return max(NOISE_TOLERANCE, 1.5 / max(int(n), 1))


def _zero_gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                         device: torch.device, eps: float = 0.0, seed: int = 0) -> tuple[int, int]:
    """(samples with an all-zero input gradient, samples checked).

    Stricter than AutoAttack's ``check_zero_gradients`` (the CE gradient at the clean points): a
    sample counts when the gradient of the cross-entropy *or* of the margin loss is all zero at the
    clean point *or* at a seeded uniform point of the ε-ball, where a quantized or saturated model
    that happens to have a gradient at the clean point has none.
    """
    idx = torch.arange(min(len(y), GRADIENT_SAMPLES))
    g = torch.Generator().manual_seed(int(seed) + 7)
    zero = 0
    with eval_mode(model), torch.enable_grad():
        for chunk in _chunks(idx, batch_size):
            x0, yb = x[chunk].to(device), y[chunk].to(device)
            noise = (torch.rand(x0.shape, generator=g) * 2 - 1).to(device) * eps
            bad = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for start in ((x0,) if eps <= 0 else (x0, (x0 + noise).clamp(0, 1))):
                for loss_name in ("ce", "margin"):
                    xb = start.clone().requires_grad_(True)
                    logits = model(xb).float()
                    loss = F.cross_entropy(logits, yb, reduction="sum") if loss_name == "ce" else \
                        margin_loss(logits, yb, kappa=float("inf"))
                    grad = torch.autograd.grad(loss, xb, allow_unused=True)[0] if loss.requires_grad else None
                    bad |= True if grad is None else grad.flatten(1).abs().amax(1) == 0
            zero += int(bad.sum())
    return zero, len(idx)


@torch.no_grad()
def _randomness_check(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
                      ) -> tuple[float, bool, int, bool]:
    """(max L2 difference of normalized logits over every pair of :data:`RANDOMNESS_FORWARDS`
    forwards, outputs look like probabilities, distinct predicted classes, predictions changed):
    AutoAttack's ``check_randomized``, which also uses 5 forwards."""
    xb = x[:batch_size].to(device)
    with eval_mode(model):
        outs = [model(xb).float() for _ in range(RANDOMNESS_FORWARDS)]
    normed = [o / (o.norm(dim=1, keepdim=True) + 1e-10) for o in outs]
    diff = max(float((normed[i] - normed[j]).norm(dim=1).max())
               for i in range(len(outs)) for j in range(i + 1, len(outs)))
    preds_changed = any(not torch.equal(outs[0].argmax(1), o.argmax(1)) for o in outs[1:])
    a = outs[0]
    probs = bool(a.max() < 1 + 1e-5 and a.min() > -1e-5 and ((a.sum(1) - 1).abs() < 1e-5).all())
    return diff, probs, int(a.argmax(1).unique().numel()), preds_changed


def _eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, eps: float,
               results: Mapping[str, torch.Tensor], batch_size: int, seed: int,
               device: torch.device) -> dict[str, Any]:
    """PGD-20 at a large ε on a seeded subset: accuracy should be near 0 and below that at ε."""
    big = min(1.0, max(SWEEP_EPS, 4 * eps))
    g = torch.Generator().manual_seed(int(seed))
    sub = torch.sort(torch.randperm(len(y), generator=g)[:SWEEP_SAMPLES]).values
    xs, ys, cs = x[sub], y[sub], clean[sub]
    with seeded(seed, device):
        large = _pgd_correct(model, xs, ys, cs, attack=attack_config("pgd20", big), batch_size=batch_size,
                             device=device, desc="eps sweep", seed=seed)
        if "pgd20" in results:
            at_eps = results["pgd20"][sub]
        else:
            at_eps = _pgd_correct(model, xs, ys, cs, attack=attack_config("pgd20", eps), batch_size=batch_size,
                                  device=device, desc="eps sweep (eps)", seed=seed)
    return {"attack": "pgd20", "eps": big, "n": int(len(sub)), "accuracy": int(large.sum()) / len(sub),
            "accuracy_at_eps": int(at_eps.sum()) / len(sub)}


def masking_flags(accuracy: Mapping[str, float], n: int, diagnostics: Mapping[str, Any] | None = None,
                  ) -> list[str]:
    """Gradient-masking flags from per-attack accuracies and the checks' diagnostics.

    Each flag is ``"name: reason"``. Rules (a difference counts when it exceeds
    :func:`noise_tolerance`): ``zero-gradients`` (some samples have an all-zero input gradient),
    ``pgd-weaker-than-fgsm``, ``blackbox-stronger-than-whitebox`` (a transfer attack beats every
    white-box attack), ``stronger-than-autoattack`` (PGD or CW beats AutoAttack, which contains a
    stronger PGD), ``square-stronger`` (inside AutoAttack, the black-box Square attack still fools
    points the gradient-based components missed), ``eps-sweep`` (accuracy does not fall toward 0
    at a large ε, or rises with ε), ``randomized`` (logits change between two forwards in eval
    mode), ``probabilities`` (the model seems to return probabilities, not logits).

    Example:
        >>> masking_flags({"clean": 0.9, "fgsm": 0.3, "pgd20": 0.6}, n=1000)[0].split(":")[0]
        'pgd-weaker-than-fgsm'
        >>> masking_flags({"clean": 0.9, "fgsm": 0.5, "pgd20": 0.4}, n=1000)
        []
    """
    diag = diagnostics or {}
    tol = noise_tolerance(n)
    flags: list[str] = []

    zero, checked = diag.get("zero_gradient_count"), diag.get("zero_gradient_checked")
    if zero and checked:
        flags.append(f"zero-gradients: {zero}/{checked} samples ({zero / checked:.1%}) have an all-zero input "
                     "gradient of the loss, so gradient-based attacks cannot move them (gradient masking, "
                     "e.g. a non-differentiable or saturated input layer?)")

    fgsm = accuracy.get("fgsm")
    for name, acc in accuracy.items():
        if attack_kind(name) == "pgd" and fgsm is not None and acc > fgsm + tol:
            flags.append(f"pgd-weaker-than-fgsm: {name} accuracy {acc:.4f} > fgsm {fgsm:.4f}; a multi-step attack "
                         "should be at least as strong as one step (gradient masking or a bad step size?)")

    white = {k: v for k, v in accuracy.items() if attack_kind(k) in ("fgsm", "pgd", "cw", "autoattack")}
    if white:
        best_white = min(white, key=lambda k: white[k])
        for name, acc in accuracy.items():
            if attack_kind(name) == "transfer" and acc < white[best_white] - tol:
                flags.append(f"blackbox-stronger-than-whitebox: {name} accuracy {acc:.4f} < strongest white-box "
                             f"{best_white} {white[best_white]:.4f}; white-box gradients are unreliable "
                             "(gradient masking?)")

    for aa in ("autoattack", "autoattack-fast"):
        if aa not in accuracy:
            continue
        for name, acc in accuracy.items():
            if attack_kind(name) in ("pgd", "cw") and acc < accuracy[aa] - tol:
                flags.append(f"stronger-than-autoattack: {name} accuracy {acc:.4f} < {aa} {accuracy[aa]:.4f}; "
                             "AutoAttack should be the strongest attack (check its settings)")

    for aa, comp in (diag.get("autoattack") or {}).items():
        after = comp.get("accuracy_after") or {}
        order = [c for c in comp.get("components_run", []) if c in after]
        if "square" in order and order.index("square") > 0:
            # AutoAttack's check_square_sr: the lowest accuracy before Square, and its 0.2% threshold
            before = min(after[c] for c in order[:order.index("square")])
            if before - after["square"] > SQUARE_TOLERANCE:
                flags.append(f"square-stronger: in {aa}, the black-box Square attack lowered accuracy from "
                             f"{before:.4f} to {after['square']:.4f} after the gradient-based components "
                             f"(more than AutoAttack's {SQUARE_TOLERANCE:.1%}: gradient masking?)")

    sweep = diag.get("eps_sweep")
    if sweep:
        if sweep["accuracy"] > SWEEP_MAX_ACCURACY or sweep["accuracy"] > sweep["accuracy_at_eps"] + tol:
            hint = (" or a model that predicts one class for every input (degenerate, not robust)"
                    if diag.get("predicted_classes") == 1 else "")
            flags.append(f"eps-sweep: PGD-20 accuracy is {sweep['accuracy']:.4f} at eps {sweep['eps']:g} (vs "
                         f"{sweep['accuracy_at_eps']:.4f} at the evaluated eps) on {sweep['n']} samples; accuracy "
                         f"should fall toward 0 as eps grows (gradient masking?{hint})")

    rnd = diag.get("randomness_max_diff")
    if (rnd is not None and rnd > RANDOMNESS_TOLERANCE) or diag.get("randomness_predictions_changed"):
        flags.append(f"randomized: logits differ between {RANDOMNESS_FORWARDS} forwards in eval mode (normalized "
                     f"difference {rnd:.2g}"
                     + ("; predictions changed" if diag.get("randomness_predictions_changed") else "")
                     + "); a randomized defense needs EOT attacks (AutoAttack's rand version)")

    if diag.get("outputs_are_probabilities"):
        flags.append("probabilities: the outputs look like probabilities (in [0, 1], summing to 1), not logits; "
                     "attacks on the loss of probabilities are weak")
    return flags

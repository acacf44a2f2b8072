"""The L∞ threat model: the ε-ball projection and the one default step-size rule.

Every attack of the toolkit (the matrix, the training methods' inner maximization, evaluation) takes
images in [0, 1] and perturbations inside ``||δ||∞ <= ε``; this module is the only place that
writes the projection and the default step ``α = ε/4`` (2/255 at ε = 8/255, Madry et al.'s and
every method's reference setting). ε itself is parsed by :func:`transfer_analysis.utils.parse_eps`.

Example:
    >>> import torch
    >>> default_step_size(8 / 255) * 255
    2.0
    >>> x = torch.tensor([0.5, 0.0])
    >>> project_linf(torch.tensor([0.9, -0.3]), x, 0.1).tolist()
    [0.6000000238418579, 0.0]
"""

from __future__ import annotations

import logging

import torch

__all__ = ["DEFAULT_STEP_FRACTION", "default_step_size", "project_linf", "clip_attack_output"]

logger = logging.getLogger(__name__)

#: the default step of every iterative L∞ attack, as a fraction of ε
DEFAULT_STEP_FRACTION = 0.25


def default_step_size(eps: float, fraction: float = DEFAULT_STEP_FRACTION) -> float:
    """The step size an attack takes when none is given: ``fraction * eps`` (ε/4 by default)."""
    return float(fraction) * float(eps)


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_adv`` clipped into the L∞ ball of radius ``eps`` around ``x`` and into [0, 1].

    Written as torchattacks writes it (``x + clamp(x_adv - x, -eps, eps)``), so that the
    toolkit's PGD gives torchattacks' PGD examples bit for bit."""
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)


def clip_attack_output(x_adv: torch.Tensor, x: torch.Tensor, eps: float, what: str) -> torch.Tensor:
    """An external attack's output made valid: NaN -> the clean pixel, then :func:`project_linf`;
    a warning when it had left the ball (a bug of the attack, or of its ε)."""
    x_adv = torch.where(torch.isnan(x_adv), x, x_adv)
    excess = float((x_adv - x).abs().amax()) - eps if x.numel() else 0.0
    if excess > 1e-5:
        logger.warning("%s returned points outside the eps-ball (by %.2e); projecting them back", what, excess)
    return project_linf(x_adv, x, eps)

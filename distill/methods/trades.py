"""``trades``: TRADES (Zhang et al. 2019), ``CE(f(x), y) + β KL(f(x) || f(x'))``.

Inner attack: maximize ``KL(f(x) || f(x'))`` (the clean prediction, computed once in eval mode,
as the target) from ``x + 0.001 N(0, I)``, K = 10 steps, α = ε/4 by default (the reference code
uses 0.007 with ε = 0.031: pass ``alpha: 0.007`` to reproduce it), student in eval mode.

Outer loss, reproducing the reference's reduction: ``CE`` is a batch mean; the KL is
``KLDivLoss(size_average=False) / batch_size``, i.e. ``batchmean`` (the true KL). As in the
reference, gradients flow through both ``f(x)`` and ``f(x')`` in the KL term. β = 6 (the robust
setting; 1 in some scripts). ``logits`` (training accuracy) are the *clean* ones; ``kl`` is the
unweighted robust term.

Reference protocol (CIFAR-10): SGD lr 0.1, momentum 0.9, weight decay 2e-4, 100 epochs with LR
x0.1 at 75% and 90%.

Example:
    >>> from distill.methods import create_method
    >>> create_method("trades", beta=1.0).start
    'normal'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transfer_analysis.attacks import eval_mode
from distill.losses import kl_divergence

from .base import AdversarialMethod, check_positive, register_method

__all__ = ["TRADES"]


@register_method("trades")
@dataclass(kw_only=True)
class TRADES(AdversarialMethod):
    """Clean cross-entropy plus β times the KL between clean and adversarial predictions."""

    training_defaults = {"epochs": 100, "milestones": [0.75, 0.9], "weight_decay": 2e-4}

    start: str = "normal"
    #: weight of the robust KL term.
    beta: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, beta=self.beta)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with eval_mode(student), torch.no_grad():
            target = student(x).float()
        x_adv = self.attack(student, x, loss="kl", target_logits=target)
        logits = student(x).float()
        logits_adv = student(x_adv).float()
        ce = F.cross_entropy(logits, y)
        kl = kl_divergence(logits_adv, logits, reduction="batchmean")  # KL(f(x) || f(x')), no detach
        loss = ce + self.beta * kl
        return {"loss": loss, "logits": logits.detach(), "ce": ce.detach(), "kl": kl.detach()}

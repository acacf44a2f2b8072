"""``pgd-at``: Madry et al.'s adversarial training, ``min E[max_{|δ|<=ε} CE(f(x+δ), y)]``.

Inner attack: PGD on the student's cross-entropy, uniform random start in [-ε, ε], K = 10 steps,
α = ε/4 (2/255 at ε = 8/255), crafted with the student in eval mode. Outer loss:
``CE(S(x'), y)``, batch mean (the reference's ``nn.CrossEntropyLoss()``; no KL, so no reduction
question). ``logits`` (training accuracy) are the adversarial ones.

Reference protocol: SGD lr 0.1, momentum 0.9, weight decay 5e-4 (2e-4 in some papers), LR x0.1 at
50% and 75% of training.

Example:
    >>> from distill.methods import create_method
    >>> create_method("pgd-at").config()["steps"]
    10
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdversarialMethod, register_method

__all__ = ["PGDAT"]


@register_method("pgd-at")
@dataclass(kw_only=True)
class PGDAT(AdversarialMethod):
    """Adversarial training on PGD examples of the student's cross-entropy."""

    training_defaults = {"epochs": 200, "milestones": [0.5, 0.75], "weight_decay": 5e-4}

    start: str = "uniform"

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x_adv = self.attack(student, x, y, loss="ce")
        logits = student(x_adv).float()
        ce = F.cross_entropy(logits, y)
        return {"loss": ce, "logits": logits.detach(), "ce_adv": ce.detach()}

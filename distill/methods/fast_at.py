"""``fast-at``: "fast is better than free" (Wong et al. 2020): FGSM from a random start.

Inner attack: one signed-gradient step of α = 1.25 ε on the student's cross-entropy from a uniform
start in [-ε, ε], projected to the ε-ball and [0, 1] (``pgd_attack`` with ``steps=1``). The
reference crafts in train mode; we craft in eval mode (BatchNorm statistics untouched by attack
passes), like every method here. Outer loss: ``CE(S(x'), y)``, batch mean. ``logits`` are the
adversarial ones.

Reference protocol: cyclic LR (0 -> max at 40% of training -> 0), max lr 0.2, weight decay 5e-4,
about 15 epochs on CIFAR-10. Watch for catastrophic overfitting: PGD accuracy collapsing to 0 in
the middle of training (the per-epoch ``test_pgd_acc`` column shows it).

Example:
    >>> from distill.methods import create_method
    >>> m = create_method("fast-at", eps="8/255")
    >>> round(m.alpha / m.eps, 2), m.steps
    (1.25, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdversarialMethod, register_method

__all__ = ["FastAT"]


@register_method("fast-at")
@dataclass(kw_only=True)
class FastAT(AdversarialMethod):
    """FGSM adversarial training with a uniform random start and step 1.25 ε."""

    training_defaults = {"epochs": 15, "lr": 0.2, "lr_schedule": "cyclic", "weight_decay": 5e-4}

    steps: int = 1
    start: str = "uniform"
    #: step size as a multiple of ε when ``alpha`` is not given.
    alpha_factor: float = 1.25

    def __post_init__(self) -> None:
        if self.alpha is None:
            from transfer_analysis.utils import parse_eps

            self.alpha = self.alpha_factor * parse_eps(self.eps, "eps")
        super().__post_init__()

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x_adv = self.attack(student, x, y, loss="ce")
        logits = student(x_adv).float()
        ce = F.cross_entropy(logits, y)
        return {"loss": ce, "logits": logits.detach(), "ce_adv": ce.detach()}

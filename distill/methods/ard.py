"""``ard``: Adversarially Robust Distillation (Goldblum et al., AAAI 2020).

Loss: ``a τ² KL(T^τ(x) || S^τ(x')) + (1 - a) CE(S(x), y)``: the teacher sees the *clean* input, the
student its adversarial example. Inner attack: PGD on the student's cross-entropy, uniform start,
K = 10, α = ε/4 (2/255 at 8/255). Deviation from the reference, on purpose: the reference crafted
x' with the student in *train* mode (attack passes updated BatchNorm statistics); we craft in eval
mode. As in the reference, the clean forward ``S(x)`` runs in train mode on every batch, even
when a = 1 makes its CE weightless (so BatchNorm sees the same batches as in the reference).

Reduction: reproduces the reference's ``nn.KLDivLoss()`` default ``reduction="mean"`` (sum over
classes divided by batch x classes, i.e. the true KL divided by C) by default; ``reduction:
batchmean`` gives the true KL (then divide ``kd_weight``'s effect by C to compare). Defaults
a = 1, τ = 30 (the reference's). With K > 1 teachers the KD term is the average of the
per-teacher terms (K = 1 is the paper). ``logits`` are the adversarial ones; ``kd`` is the
unweighted τ²-scaled term, ``ce`` the clean cross-entropy.

Reference protocol: 200 epochs, SGD lr 0.1, momentum 0.9, weight decay 2e-4, LR x0.1 at epochs
100 and 150.

Example:
    >>> from distill.methods import create_method
    >>> m = create_method("ard")
    >>> m.temperature, m.reduction
    (30.0, 'mean')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import soft_kl

from .base import AdversarialMethod, check_fraction, check_positive, check_reduction, register_method

__all__ = ["ARD"]


@register_method("ard")
@dataclass(kw_only=True)
class ARD(AdversarialMethod):
    """KL from the teacher's clean output to the student's adversarial output, plus clean CE."""

    min_teachers = 1
    max_teachers = None
    training_defaults = {"epochs": 200, "milestones": [0.5, 0.75], "weight_decay": 2e-4}

    start: str = "uniform"
    #: a: weight of the KD term (1 - a on the clean cross-entropy).
    kd_weight: float = 1.0
    #: τ.
    temperature: float = 30.0
    #: KL reduction: mean (the reference's) or batchmean.
    reduction: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self, kd_weight=self.kd_weight)
        check_positive(self, temperature=self.temperature)
        check_reduction(self, self.reduction)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self._teachers.logits(x)
        x_adv = self.attack(student, x, y, loss="ce")
        logits_adv = student(x_adv).float()
        logits_nat = student(x).float()
        kd = torch.stack([soft_kl(logits_adv, t[:, k], self.temperature, self.reduction)
                          for k in range(t.shape[1])]).mean()
        ce = F.cross_entropy(logits_nat, y)
        loss = self.kd_weight * kd + (1 - self.kd_weight) * ce
        return {"loss": loss, "logits": logits_adv.detach(), "kd": kd.detach(), "ce": ce.detach()}

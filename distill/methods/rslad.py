"""``rslad``: Robust Soft Label Adversarial Distillation (Zi et al., ICCV 2021).

Loss: ``(5/6) KL(T(x) || S(x')) + (1/6) KL(T(x) || S(x))``, τ = 1: the teacher's *clean* soft
labels are the targets of both terms. Inner attack: maximize ``KL(T(x) || S(x'))`` from
``x + 0.001 N(0, I)``, K = 10, α = ε/4 (2/255 at 8/255), student in eval mode. Both student
forwards run in train mode, adversarial first, as in the reference.

Reduction: reproduces the reference's CIFAR-10 ``KLDivLoss(reduce=False)`` followed by
``torch.mean`` (= ``reduction="mean"``: the true KL divided by the number of classes) by default.
The reference multiplies its CIFAR-100 loss by 10 to compensate; here, set
``reduction: batchmean`` (the true KL) or scale with ``loss_scale``, and say which you used.
With K > 1 teachers both terms (and the inner objective) average the per-teacher KLs (K = 1 is
the paper). ``logits`` are the adversarial ones; ``kl_adv``/``kl_nat`` are the unweighted terms.

Reference protocol: 300 epochs, SGD lr 0.1, momentum 0.9, weight decay 2e-4, LR x0.1 at epochs
215, 260 and 285.

Example:
    >>> from distill.methods import create_method
    >>> m = create_method("rslad")
    >>> round(m.adv_weight + m.nat_weight, 6), m.reduction
    (1.0, 'mean')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transfer_analysis.attacks import kl_to_soft_labels
from distill.losses import kl_divergence

from .base import AdversarialMethod, check_positive, check_reduction, register_method

__all__ = ["RSLAD"]


@register_method("rslad")
@dataclass(kw_only=True)
class RSLAD(AdversarialMethod):
    """Distillation with the teacher's clean soft labels on adversarial and clean inputs."""

    min_teachers = 1
    max_teachers = None
    training_defaults = {"epochs": 300, "milestones": [215 / 300, 260 / 300, 285 / 300], "weight_decay": 2e-4}

    start: str = "normal"
    #: weight of KL(T(x) || S(x')).
    adv_weight: float = 5 / 6
    #: weight of KL(T(x) || S(x)).
    nat_weight: float = 1 / 6
    #: τ (1 in the paper).
    temperature: float = 1.0
    #: KL reduction: mean (the reference's) or batchmean.
    reduction: str = "mean"
    #: factor on the whole loss (the reference uses 10 on CIFAR-100).
    loss_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, temperature=self.temperature, loss_scale=self.loss_scale)
        check_reduction(self, self.reduction)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self._teachers.logits(x)
        k = t.shape[1]

        def inner(logits: torch.Tensor) -> torch.Tensor:
            return sum(kl_to_soft_labels(logits, t[:, j]) for j in range(k)) / k

        x_adv = self.attack(student, x, y, loss=inner)
        logits_adv = student(x_adv).float()
        logits_nat = student(x).float()
        tau = self.temperature
        kl_adv = torch.stack([kl_divergence(logits_adv, t[:, j], tau, self.reduction) for j in range(k)]).mean()
        kl_nat = torch.stack([kl_divergence(logits_nat, t[:, j], tau, self.reduction) for j in range(k)]).mean()
        loss = self.loss_scale * (self.adv_weight * kl_adv + self.nat_weight * kl_nat)
        return {"loss": loss, "logits": logits_adv.detach(), "kl_adv": kl_adv.detach(), "kl_nat": kl_nat.detach()}

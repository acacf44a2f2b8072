"""``kd``: Hinton et al.'s knowledge distillation on clean inputs (no adversarial examples).

Loss: ``(1 - a) CE(S(x), y) + a τ² KL(T^τ(x) || S^τ(x))``, CE a batch mean, KL with ``batchmean``
reduction (the true KL, as in Hinton's formulation and timm/torchdistill; pass
``reduction: mean`` for ``nn.KLDivLoss()``'s default, which also divides by the classes).
With K > 1 teachers, the KD term is the plain average of the K per-teacher terms (K = 1 is
exactly Hinton's loss). Defaults a = 0.9, τ = 4. ``logits`` are the clean ones; ``kd`` is the
unweighted τ²-scaled term.

Example:
    >>> from distill.methods import create_method
    >>> m = create_method("kd")
    >>> m.kd_weight, m.temperature
    (0.9, 4.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import soft_kl

from .base import Method, check_fraction, check_positive, check_reduction, register_method

__all__ = ["KD"]


@register_method("kd")
@dataclass(kw_only=True)
class KD(Method):
    """Clean-input distillation from one teacher or the average of several."""

    min_teachers = 1
    max_teachers = None
    training_defaults = {"epochs": 200, "milestones": [0.5, 0.75], "weight_decay": 5e-4}

    #: a: weight of the KD term (1 - a on the cross-entropy).
    kd_weight: float = 0.9
    #: τ.
    temperature: float = 4.0
    #: KL reduction: batchmean (true KL) or mean (also divided by the classes).
    reduction: str = "batchmean"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self, kd_weight=self.kd_weight)
        check_positive(self, temperature=self.temperature)
        check_reduction(self, self.reduction)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self._teachers.logits(x)
        logits = student(x).float()
        ce = F.cross_entropy(logits, y)
        kd = torch.stack([soft_kl(logits, t[:, k], self.temperature, self.reduction)
                          for k in range(t.shape[1])]).mean()
        loss = (1 - self.kd_weight) * ce + self.kd_weight * kd
        return {"loss": loss, "logits": logits.detach(), "ce": ce.detach(), "kd": kd.detach()}

"""``mtard``: Multi-Teacher Adversarial Robustness Distillation (Zhao et al., ECCV 2022).

Two teachers, in this order: ``--teachers ROBUST,CLEAN`` (an adversarially trained teacher and a
naturally trained one). Loss: ``w_adv KL(T_adv(x') || S(x')) + w_nat KL(T_nat(x) || S(x))``: the
robust teacher on the student's adversarial examples, the clean teacher on clean inputs.
Inner attack: PGD on the student's cross-entropy from ``x + 0.001 N(0, I)``, K = 10, α = ε/4,
student in eval mode.

Adaptive weights: start at 0.5/0.5. After each batch, with ``r_k = L_k / L_k(first batch)``,
``w_nat <- w_nat - η (w_nat - r_nat / (r_adv + r_nat))`` and ``w_adv = 1 - w_nat``; the batch's loss
uses the weights from before its update. η = 0.025 is divided by 10 at each LR milestone:
implemented as ``η = η0 * lr / base_lr`` at the start of each epoch, which is exactly that under
the step schedule. The first-batch losses and the weights are resumable state.

Reduction: reproduces the reference's ``reduction="mean"`` (the true KL divided by the classes) by
default; ``reduction: batchmean`` gives the true KL. τ = 1 (τ² scaling applies when changed).
``logits`` are the adversarial ones; ``kl_adv``/``kl_nat`` are the unweighted terms and
``w_adv``/``w_nat`` the weights used on the batch.

Reference protocol: 300 epochs, SGD lr 0.1, momentum 0.9, weight decay 2e-4, LR x0.1 at epochs
215, 260 and 285.

Example:
    >>> from distill.methods import create_method
    >>> m = create_method("mtard")
    >>> m.state_dict()["w_nat"], m.weight_lr
    (0.5, 0.025)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distill.losses import soft_kl

from .base import AdversarialMethod, check_fraction, check_positive, check_reduction, register_method

__all__ = ["MTARD"]


@register_method("mtard")
@dataclass(kw_only=True)
class MTARD(AdversarialMethod):
    """A robust teacher on adversarial inputs and a clean teacher on clean inputs, adaptively weighted."""

    min_teachers = 2
    max_teachers = 2
    training_defaults = {"epochs": 300, "milestones": [215 / 300, 260 / 300, 285 / 300], "weight_decay": 2e-4}

    start: str = "normal"
    #: η, the learning rate of the adaptive weights.
    weight_lr: float = 0.025
    #: initial w_nat (w_adv = 1 - w_nat).
    initial_nat_weight: float = 0.5
    #: τ.
    temperature: float = 1.0
    #: KL reduction: mean (the reference's) or batchmean.
    reduction: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self, initial_nat_weight=self.initial_nat_weight, weight_lr=self.weight_lr)
        check_positive(self, temperature=self.temperature)
        check_reduction(self, self.reduction)
        self.w_nat = float(self.initial_nat_weight)
        self.init_adv: float | None = None
        self.init_nat: float | None = None
        self.eta = float(self.weight_lr)

    def on_epoch_start(self, epoch: int, epochs: int, lr: float, base_lr: float) -> None:
        super().on_epoch_start(epoch, epochs, lr, base_lr)
        self.eta = self.weight_lr * (lr / base_lr if base_lr > 0 else 1.0)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        teachers = self._teachers
        t_nat = teachers.one(1, x)
        x_adv = self.attack(student, x, y, loss="ce")
        t_adv = teachers.one(0, x_adv)
        logits_adv = student(x_adv).float()
        logits_nat = student(x).float()
        kl_adv = soft_kl(logits_adv, t_adv, self.temperature, self.reduction)
        kl_nat = soft_kl(logits_nat, t_nat, self.temperature, self.reduction)
        w_nat = self.w_nat
        w_adv = 1.0 - w_nat
        loss = w_adv * kl_adv + w_nat * kl_nat
        self._update_weights(float(kl_adv.detach()), float(kl_nat.detach()))
        return {"loss": loss, "logits": logits_adv.detach(), "kl_adv": kl_adv.detach(), "kl_nat": kl_nat.detach(),
                "w_adv": torch.tensor(w_adv), "w_nat": torch.tensor(w_nat)}

    def _update_weights(self, loss_adv: float, loss_nat: float) -> None:
        if self.init_adv is None or self.init_nat is None:
            self.init_adv, self.init_nat = loss_adv, loss_nat
        r_adv = loss_adv / self.init_adv if self.init_adv > 0 else 1.0
        r_nat = loss_nat / self.init_nat if self.init_nat > 0 else 1.0
        if r_adv + r_nat > 0:
            self.w_nat = self.w_nat - self.eta * (self.w_nat - r_nat / (r_adv + r_nat))

    def state_dict(self) -> dict[str, Any]:
        return {"w_nat": self.w_nat, "init_adv": self.init_adv, "init_nat": self.init_nat}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.w_nat = float(state["w_nat"])
        self.init_adv = None if state.get("init_adv") is None else float(state["init_adv"])
        self.init_nat = None if state.get("init_nat") is None else float(state["init_nat"])

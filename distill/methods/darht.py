"""``darht``: Distilling Adversarial Robustness from Heterogeneous Teachers (Deng et al., 2024).

The student carries the student-teacher feature map (``distill.student``): slice k of the map
stands for teacher k's logits. Per batch ``(x, y)``:

1. With probability ``p_adv`` (0.5) the batch is replaced by adversarial examples: PGD on the
   student's *final-logit* cross-entropy, ε, α = ε/4 by default (2/255 at 8/255; the reference
   used 0.003: pass ``alpha: 0.003``), 10 steps, start ``x + 0.001 N(0, I)``, student in eval mode.
   The coin is drawn from torch's global RNG, so it is seeded and resumable.
2. The frozen teachers give logits on the same batch the student trains on (clean or adversarial).
3.-4. :func:`distill.losses.darht_loss`: teacher weights ``exp(-CE_k)`` (batch-mean CE, detached,
   not normalized; ``uniform`` and ``softmax`` selectable), KD = weighted sum of
   ``τ² KL(softmax(t_k/τ) || softmax(m_k/τ))`` with **batchmean** reduction (the DARHT reference
   code's; the true KL), or MSE between ``m_k`` and ``t_k``.
5. Phases by epoch: ``[0, e1)`` CE on the final logits, ``[e1, e2)`` CE + KD, ``[e2, E)`` KD only,
   with ``e1 = round(0.25 E)``, ``e2 = round(0.59 E)`` (the reference's 50 and 118 of 200), or
   explicit ``phase_epochs: [e1, e2]``.

In the CE phase the loss needs no teacher, so their forwards are skipped (``kd`` is logged as 0 and
the weights as NaN); ``teachers_in_ce_phase: true`` runs them anyway to log ``kd`` and the weights
(detached) from the start, at the cost of K forwards per batch. Parts: ``loss``, ``ce``, ``kd`` (unweighted by phase), ``adv_batch`` (1 for an adversarial
batch: its epoch mean is the adversarial fraction), ``w_<teacher>`` (the teacher weights).
``logits`` are the final logits on the batch trained on.

Reference protocol: 200 epochs, SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 256, LR x0.1 at
epochs 115, 160, 185. Reference bugs not copied: teachers in train mode, an LR warm-up that zeroed
the LR for the first epochs, unseeded ``random``.

Example:
    >>> from distill.methods import create_method
    >>> m = create_method("darht", eps="8/255")
    >>> m.phase_bounds(200)
    (50, 118)
    >>> [m.phase_for(e, 200) for e in (0, 50, 117, 118)]
    ['ce', 'ce+kd', 'ce+kd', 'kd']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distill.losses import KD_LOSSES, WEIGHTINGS, darht_loss

from .base import AdversarialMethod, check_fraction, check_positive, register_method

__all__ = ["DARHT"]


@register_method("darht")
@dataclass(kw_only=True)
class DARHT(AdversarialMethod):
    """Multi-teacher robust distillation through the student-teacher feature map."""

    min_teachers = 1
    max_teachers = None
    uses_feature_map = True
    training_defaults = {"epochs": 200, "milestones": [115 / 200, 160 / 200, 185 / 200], "weight_decay": 5e-4,
                         "batch_size": 256}

    start: str = "normal"
    #: probability that a batch is replaced by its adversarial examples.
    p_adv: float = 0.5
    #: τ of the KD term.
    temperature: float = 1.0
    #: teacher weighting: exp_ce (paper), uniform (1/K) or softmax (softmax of -CE).
    weighting: str = "exp_ce"
    #: KD distance: kl (paper) or mse.
    kd: str = "kl"
    #: phase boundaries as fractions of the epochs: CE until the first, CE+KD until the second.
    phases: list[float] = field(default_factory=lambda: [0.25, 0.59])
    #: explicit phase boundaries in epochs (overrides ``phases``).
    phase_epochs: list[int] | None = None
    #: run the teachers in the CE phase too, to log kd and the weights.
    teachers_in_ce_phase: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self, p_adv=self.p_adv)
        check_positive(self, temperature=self.temperature)
        self._require(self.weighting in WEIGHTINGS, f"weighting must be one of {', '.join(WEIGHTINGS)}, "
                      f"got {self.weighting!r}")
        self._require(self.kd in KD_LOSSES, f"kd must be one of {', '.join(KD_LOSSES)}, got {self.kd!r}")
        self.phases = [float(v) for v in self.phases]
        self._require(len(self.phases) == 2 and 0 <= self.phases[0] <= self.phases[1] <= 1,
                      f"phases must be two fractions 0 <= e1 <= e2 <= 1, got {self.phases!r}")
        if self.phase_epochs is not None:
            self.phase_epochs = [int(v) for v in self.phase_epochs]
            self._require(len(self.phase_epochs) == 2 and 0 <= self.phase_epochs[0] <= self.phase_epochs[1],
                          f"phase_epochs must be two epochs 0 <= e1 <= e2, got {self.phase_epochs!r}")
        self.phase = "ce"

    def phase_bounds(self, epochs: int) -> tuple[int, int]:
        """``(e1, e2)`` for a run of ``epochs`` epochs."""
        if self.phase_epochs is not None:
            return self.phase_epochs[0], self.phase_epochs[1]
        return int(self.phases[0] * epochs + 0.5), int(self.phases[1] * epochs + 0.5)

    def phase_for(self, epoch: int, epochs: int) -> str:
        """The phase of 0-based ``epoch``: ``ce``, ``ce+kd`` or ``kd``."""
        e1, e2 = self.phase_bounds(epochs)
        return "ce" if epoch < e1 else ("ce+kd" if epoch < e2 else "kd")

    def on_epoch_start(self, epoch: int, epochs: int, lr: float, base_lr: float) -> None:
        super().on_epoch_start(epoch, epochs, lr, base_lr)
        self.phase = self.phase_for(epoch, epochs)

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        teachers = self._teachers
        adversarial = bool(torch.rand(()) < self.p_adv)
        x_in = self.attack(student, x, y, loss="ce") if adversarial else x
        need_teachers = self.phase != "ce" or self.teachers_in_ce_phase
        t = teachers.logits(x_in) if need_teachers else None
        logits, fmap = student.forward_with_map(x_in)
        parts = darht_loss(logits, fmap if need_teachers else None, t, y, phase=self.phase,
                           temperature=self.temperature, weighting=self.weighting, kd=self.kd)
        out = {"loss": parts["loss"], "logits": logits.detach().float(), "ce": parts["ce"], "kd": parts["kd"],
               "adv_batch": torch.tensor(float(adversarial))}
        if need_teachers:
            for name, w in zip(teachers.names, parts["teacher_weights"]):
                out[f"w_{name}"] = w
        else:
            for name in teachers.names:
                out[f"w_{name}"] = torch.tensor(float("nan"))
        return out

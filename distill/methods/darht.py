"""``darht``: Distilling Adversarial Robustness from Heterogeneous Teachers (Deng et al., 2024).

The student carries the student-teacher feature map (``distill.student``): slice k of the map
stands for teacher k's logits. Per batch ``(x, y)``:

1. With probability ``p_adv`` the batch is replaced by adversarial examples: PGD on the
   student's *final-logit* cross-entropy, ε, α = ε/4 by default (2/255 at 8/255; the reference
   used 0.003: pass ``alpha: 0.003``), 10 steps, start ``x + 0.001 N(0, I)``, student in eval mode.
   The coin is drawn from torch's global RNG, so it is seeded and resumable.
2. The frozen teachers give logits on the same batch the student trains on (clean or adversarial).
3.-4. :func:`distill.losses.darht_loss`: teacher weights ``exp(-CE_k)`` (batch-mean CE, detached,
   not normalized; ``uniform`` and ``softmax`` selectable), KD = weighted sum of
   ``τ² KL(softmax(t_k/τ) || softmax(m_k/τ))`` with **batchmean** reduction (the DARHT reference
   code's; the true KL), or MSE between ``m_k`` and ``t_k``.
5. Phases by epoch: ``[0, e1)`` CE on the final logits, ``[e1, e2)`` CE + KD, ``[e2, E)`` KD only,
   with ``e1 = round(phases[0] E)``, ``e2 = round(phases[1] E)``, or explicit ``phase_epochs: [e1, e2]``.

**Two schedules** (``schedule``), which set the defaults of ``phases`` and ``p_adv``:

- ``reference`` (the default): the paper's, ``phases [0.25, 0.59]`` (its 50 and 118 of 200 epochs)
  and ``p_adv 0.5``. Those boundaries sit relative to the reference's 200-epoch LR schedule
  (KD-only starts just after its first decay, at 115); compressed into a short run they leave the
  first quarter teacher-free and a KD-only tail in which the *final* classifier (the evaluated
  logits) gets no gradient, since the KD loss depends on the map only.
- ``budget``: CE + KD in every epoch (``phases [0, 1]``) and every batch adversarial (``p_adv 1``),
  so the evaluated classifier is trained at every LR. The loss, the weights, the map and the inner
  attack are the paper's.

Which is better was measured, not assumed (``results/fashion-mnist-darht-ablation/``: the
Fashion-MNIST study's protocol, 8 epochs, its low-transfer set, 3 seeds, PGD-20 on 1000 test
images): reference 0.579 ± 0.014, budget 0.507 ± 0.111 (seed 2 collapsed to 0.382; seed 1 did not
converge), budget with uniform weights 0.562 ± 0.028, teacher-free 0.545 ± 0.027, against RSLAD
0.575 ± 0.029 and PGD-AT 0.574 ± 0.037. So the reference schedule stays the default, even at 8 epochs.
With stronger teachers and 20 epochs one tuning run went the other way (budget 0.646, reference 0.578
validation PGD-20 on 500 held-out images, ``results/fashion-mnist-strong/study/tuning.json``): a
study should tune ``schedule`` (``students.tune``) rather than trust either default.

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
    >>> m.schedule, m.phase_bounds(200), m.p_adv
    ('reference', (50, 118), 0.5)
    >>> [m.phase_for(e, 200) for e in (0, 50, 117, 118)]
    ['ce', 'ce+kd', 'ce+kd', 'kd']
    >>> b = create_method("darht", eps="8/255", schedule="budget")
    >>> b.phase_bounds(8), b.p_adv, [b.phase_for(e, 8) for e in (0, 7)]
    ((0, 8), 1.0, ['ce+kd', 'ce+kd'])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.losses import KD_LOSSES, WEIGHTINGS, darht_loss

from .base import AdversarialMethod, check_fraction, check_positive, register_method

__all__ = ["DARHT", "SCHEDULES"]

#: the defaults each schedule gives ``phases`` and ``p_adv`` (see the module docstring)
SCHEDULES: dict[str, dict[str, object]] = {
    "reference": {"phases": [0.25, 0.59], "p_adv": 0.5},
    "budget": {"phases": [0.0, 1.0], "p_adv": 1.0},
}


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
    #: ``reference`` (default) or ``budget``: the defaults of ``phases`` and ``p_adv``.
    schedule: str = "reference"
    #: probability that a batch is replaced by its adversarial examples (default: the schedule's).
    p_adv: float | None = None
    #: τ of the KD term.
    temperature: float = 1.0
    #: teacher weighting: exp_ce (paper), uniform (1/K) or softmax (softmax of -CE).
    weighting: str = "exp_ce"
    #: KD distance: kl (paper) or mse.
    kd: str = "kl"
    #: phase boundaries as fractions of the epochs: CE until the first, CE+KD until the second
    #: (default: the schedule's).
    phases: list[float] | None = None
    #: explicit phase boundaries in epochs (overrides ``phases``).
    phase_epochs: list[int] | None = None
    #: run the teachers in the CE phase too, to log kd and the weights.
    teachers_in_ce_phase: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got "
                      f"{self.schedule!r}")
        if self.p_adv is None:
            self.p_adv = float(SCHEDULES[self.schedule]["p_adv"])
        if self.phases is None:
            self.phases = list(SCHEDULES[self.schedule]["phases"])
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

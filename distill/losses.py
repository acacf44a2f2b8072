"""Distillation losses: DARHT's multi-teacher loss and the KL helpers the baselines share.

Conventions (docs/methods.md, "Reduction conventions"):

- ``KL(P || Q) = sum_c P_c log(P_c / Q_c)``, what ``F.kl_div(log_softmax(q), softmax(p))`` computes.
- ``batchmean``: the KL summed over classes, averaged over the batch (the true KL). DARHT uses it.
- ``mean``: summed over classes, divided by batch x classes, i.e. ``batchmean / C``. ARD, RSLAD and
  MTARD used it on CIFAR-10; their modules reproduce it by default and say so.

Example:
    >>> import torch
    >>> logits, fmap = torch.randn(4, 3), torch.randn(4, 2, 3, requires_grad=True)
    >>> teacher_logits, y = torch.randn(4, 2, 3), torch.tensor([0, 1, 2, 0])
    >>> parts = darht_loss(logits, fmap, teacher_logits, y, phase="kd")
    >>> sorted(parts), parts["teacher_weights"].shape
    (['ce', 'kd', 'loss', 'teacher_ce', 'teacher_weights'], torch.Size([2]))
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "PHASES",
    "WEIGHTINGS",
    "KD_LOSSES",
    "REDUCTIONS",
    "Phase",
    "Weighting",
    "KDLoss",
    "Reduction",
    "darht_loss",
    "teacher_weights",
    "per_teacher_ce",
    "kl_divergence",
    "soft_kl",
]

Phase = Literal["ce", "ce+kd", "kd"]
Weighting = Literal["exp_ce", "uniform", "softmax"]
KDLoss = Literal["kl", "mse"]
Reduction = Literal["batchmean", "mean"]

PHASES: tuple[str, ...] = ("ce", "ce+kd", "kd")
WEIGHTINGS: tuple[str, ...] = ("exp_ce", "uniform", "softmax")
KD_LOSSES: tuple[str, ...] = ("kl", "mse")
REDUCTIONS: tuple[str, ...] = ("batchmean", "mean")


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  reduction: Reduction = "batchmean") -> torch.Tensor:
    """``KL(softmax(t/τ) || softmax(s/τ))`` over the last dimension, reduced over the rest.

    ``batchmean`` averages the per-sample KL over every leading dimension (the batch); ``mean``
    additionally divides by the number of classes (``nn.KLDivLoss()``'s default, used by ARD, RSLAD
    and MTARD). No τ² factor here: callers apply their own.

    Example:
        >>> s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])
        >>> kl_divergence(s, t).item()
        0.0
    """
    _check(reduction, REDUCTIONS, "KL reduction")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.softmax(teacher_logits.float() / temperature, dim=-1)
    per_sample = F.kl_div(log_q, p, reduction="none").sum(-1)
    out = per_sample.mean()
    return out / student_logits.shape[-1] if reduction == "mean" else out


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            reduction: Reduction = "batchmean") -> torch.Tensor:
    """Hinton's distillation term ``τ² KL(softmax(t/τ) || softmax(s/τ))`` (teacher logits detached)."""
    return kl_divergence(student_logits, teacher_logits.detach(), temperature, reduction) * temperature ** 2


def per_teacher_ce(teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy of each teacher: ``(N, K, C)`` logits -> ``(K,)`` (detached).

    Example:
        >>> per_teacher_ce(torch.zeros(2, 3, 4), torch.tensor([0, 1]))  # uniform logits: log(4) each
        tensor([1.3863, 1.3863, 1.3863])
    """
    n, k, c = teacher_logits.shape
    t = teacher_logits.detach().float()
    ce = F.cross_entropy(t.reshape(n * k, c), y.repeat_interleave(k), reduction="none")
    return ce.view(n, k).mean(0)


def teacher_weights(teacher_ce: torch.Tensor, weighting: Weighting = "exp_ce") -> torch.Tensor:
    """DARHT's per-teacher weights from the teachers' batch-mean CE (detached).

    - ``exp_ce`` (default, the paper and reference code): ``w_k = exp(-CE_k)``, *not* normalized;
      each weight lies in (0, 1], so the KD term grows with the number of good teachers.
    - ``uniform``: ``w_k = 1/K``, the plain average over teachers (sums to 1).
    - ``softmax``: ``w = softmax(-CE)``, normalized ``exp_ce`` (sums to 1).

    Example:
        >>> teacher_weights(torch.tensor([0.0, 1.0]), "uniform").tolist()
        [0.5, 0.5]
    """
    _check(weighting, WEIGHTINGS, "teacher weighting")
    ce = teacher_ce.detach().float()
    if weighting == "exp_ce":
        return torch.exp(-ce)
    if weighting == "uniform":
        return torch.full_like(ce, 1.0 / ce.numel())
    return torch.softmax(-ce, dim=0)


def darht_loss(logits: torch.Tensor, fmap: torch.Tensor | None, teacher_logits: torch.Tensor | None,
               y: torch.Tensor, phase: Phase = "ce+kd", temperature: float = 1.0, weighting: Weighting = "exp_ce",
               kd: KDLoss = "kl") -> dict[str, torch.Tensor]:
    """DARHT's loss on one batch (docs/design.md, DARHT, steps 3-5).

    - ``ce = CE(logits, y)``, batch mean, on the student's final logits.
    - ``w_k`` from :func:`teacher_weights` on the teachers' batch-mean CE, detached: no gradient
      reaches the teachers or flows through the weights.
    - ``kd = sum_k w_k * KL(softmax(t_k/τ) || softmax(m_k/τ)) * τ²`` with ``batchmean`` reduction
      (``m_k = fmap[:, k]``); with ``kd="mse"``, ``kd = sum_k w_k * mean((m_k - t_k)²)`` (mean over
      batch and classes; τ unused).
    - ``loss``: ``ce`` in phase ``ce``, ``ce + kd`` in ``ce+kd``, ``kd`` in ``kd``.

    Every part is always reported: the one that does not enter ``loss`` in the current phase is
    computed and returned detached (``kd`` in phase ``ce``, ``ce`` in phase ``kd``), so training
    logs show how the map tracks the teachers before KD starts. In phase ``ce`` ``fmap`` and
    ``teacher_logits`` may be ``None``; ``kd`` is then reported as 0 and the weights are empty.

    Args:
        logits: student's final logits ``(N, C)``.
        fmap: the student-teacher map ``(N, K, C)``.
        teacher_logits: teachers' logits ``(N, K, C)`` on the same inputs (detached here).
        y: labels ``(N,)``.
        phase: ``ce``, ``ce+kd`` or ``kd``.
        temperature: τ of the KL.
        weighting: ``exp_ce``, ``uniform`` or ``softmax``.
        kd: ``kl`` or ``mse``.

    Returns:
        ``{"loss", "ce", "kd", "teacher_weights" (K,), "teacher_ce" (K,)}``; all scalars except the
        last two.

    Example:
        >>> logits, fmap = torch.zeros(2, 3), torch.zeros(2, 1, 3)
        >>> t, y = torch.zeros(2, 1, 3), torch.tensor([0, 1])
        >>> out = darht_loss(logits, fmap, t, y, phase="ce+kd")
        >>> round(out["loss"].item(), 4), out["kd"].item(), round(out["teacher_weights"].item(), 4)
        (1.0986, 0.0, 0.3333)
    """
    _check(phase, PHASES, "DARHT phase")
    _check(weighting, WEIGHTINGS, "teacher weighting")
    _check(kd, KD_LOSSES, "KD loss")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    ce = F.cross_entropy(logits, y)
    if fmap is None or teacher_logits is None:
        if phase != "ce":
            raise ValueError(f"phase {phase!r} needs the feature map and the teachers' logits")
        zero = ce.new_zeros(())
        return {"loss": ce, "ce": ce.detach(), "kd": zero, "teacher_weights": ce.new_zeros(0),
                "teacher_ce": ce.new_zeros(0)}
    if fmap.ndim != 3 or teacher_logits.shape != fmap.shape or fmap.shape[0] != logits.shape[0] \
            or fmap.shape[2] != logits.shape[1]:
        raise ValueError(f"shapes do not fit: logits {tuple(logits.shape)}, fmap {tuple(fmap.shape)}, "
                         f"teacher_logits {tuple(teacher_logits.shape)}; expected (N, C), (N, K, C), (N, K, C)")
    t = teacher_logits.detach().float()
    m = fmap.float()
    t_ce = per_teacher_ce(t, y)
    w = teacher_weights(t_ce, weighting)
    with torch.set_grad_enabled(torch.is_grad_enabled() and phase != "ce"):
        if kd == "kl":
            log_q = F.log_softmax(m / temperature, dim=-1)
            p = F.softmax(t / temperature, dim=-1)
            per_teacher = F.kl_div(log_q, p, reduction="none").sum(-1).mean(0) * temperature ** 2  # (K,)
        else:
            per_teacher = (m - t).pow(2).mean(dim=(0, 2))  # (K,)
        kd_term = (w * per_teacher).sum()
    if phase == "ce":
        loss, ce_out, kd_out = ce, ce.detach(), kd_term.detach()
    elif phase == "ce+kd":
        loss, ce_out, kd_out = ce + kd_term, ce.detach(), kd_term.detach()
    else:
        loss, ce_out, kd_out = kd_term, ce.detach(), kd_term.detach()
    return {"loss": loss, "ce": ce_out, "kd": kd_out, "teacher_weights": w, "teacher_ce": t_ce}

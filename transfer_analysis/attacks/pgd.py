"""The toolkit's one L∞ PGD, with selectable loss and start: ``pgd_attack`` and its object form ``LinfPGD``.

``pgd_attack`` covers every method's inner maximization: PGD-AT / ARD / DARHT (cross-entropy),
TRADES and RSLAD (KL to given soft labels), CW∞ evaluation (margin loss), FGSM (one step from
zero) and fast AT (one step of 1.25 ε from a uniform start). Gradients are taken with respect to
the input only (parameter ``.grad`` is never touched), in fp32 (autocast off), with the model in
eval mode unless told otherwise. :class:`LinfPGD` holds those settings on an object called as
``attack(x, y)`` (torchattacks' interface): it is what the registry's ``pgd``, ``fgsm`` and ``cw``
build, so the matrix, the ``transfer:NAME`` evaluation and the white-box evaluation craft with the
same code as training.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> x_adv = pgd_attack(model, x, y, eps=0.1, alpha=0.025, steps=10)
    >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all() and (x_adv >= 0).all() and (x_adv <= 1).all())
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import eval_mode
from .threat import default_step_size, project_linf

__all__ = ["CW_KAPPA", "pgd_attack", "LinfPGD", "eval_mode", "margin_loss", "kl_to_soft_labels", "LossName",
           "StartName"]

LossName = Literal["ce", "margin", "kl"]
StartName = Literal["uniform", "normal", "zero"]

#: κ of the CW∞ margin loss (the cap of the margin, Carlini & Wagner's confidence)
CW_KAPPA = 50.0


def margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = CW_KAPPA) -> torch.Tensor:
    """CW margin to maximize: ``max_{j != y} z_j - z_y``, capped at ``kappa`` (summed over the batch).

    Example:
        >>> margin_loss(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([0])).item()
        -1.0
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return torch.clamp(other - true, max=kappa).sum()


def kl_to_soft_labels(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(logits))`` summed over the batch (TRADES / RSLAD inner loss)."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.softmax(target_logits, dim=1), reduction="sum")


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float,
               alpha: float | None = None, steps: int, loss: LossName | Callable[[torch.Tensor], torch.Tensor] = "ce",
               start: StartName = "uniform", target_logits: torch.Tensor | None = None, kappa: float = CW_KAPPA,
               use_eval_mode: bool = True, normal_std: float = 0.001) -> torch.Tensor:
    """L∞ projected gradient ascent on ``loss`` around ``x`` (inputs in [0, 1]); returns ``x_adv``.

    Args:
        model: maps [0, 1] images to logits.
        x: clean images; y: labels (needed for ``ce`` and ``margin``).
        eps, alpha, steps: radius, step size (``None``: ε/4), number of steps (``steps=0`` returns ``x``).
        loss: ``ce``, ``margin`` (CW∞), ``kl`` (to ``target_logits``), or a callable of the logits.
        start: ``uniform`` in [-ε, ε] (Madry), ``normal`` (x + 0.001 N(0, I): TRADES, RSLAD, the DARHT
            reference) or ``zero`` (FGSM).
        use_eval_mode: craft with the model in eval mode (BatchNorm statistics untouched); restored after.
    """
    if steps <= 0 or eps == 0:
        return x.detach().clone()
    x = x.detach()
    alpha = default_step_size(eps) if alpha is None else alpha
    if loss == "kl" and target_logits is None:
        raise ValueError("loss='kl' needs target_logits")
    if start == "uniform":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    elif start == "normal":
        delta = normal_std * torch.randn_like(x)
    elif start == "zero":
        delta = torch.zeros_like(x)
    else:
        raise ValueError(f"unknown start {start!r}; use uniform, normal or zero")
    # a uniform start lies in the ball already: only [0, 1] applies (torchattacks' order of operations)
    x_adv = (x + delta).clamp(0, 1) if start == "uniform" else project_linf(x + delta, x, eps)
    target = target_logits.detach() if target_logits is not None else None
    mode = eval_mode(model) if use_eval_mode else contextlib.nullcontext()
    with mode, torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv).float()
            if callable(loss):
                objective = loss(logits)
            elif loss == "ce":
                objective = F.cross_entropy(logits, y, reduction="sum")
            elif loss == "margin":
                objective = margin_loss(logits, y, kappa)
            elif loss == "kl":
                objective = kl_to_soft_labels(logits, target)
            else:
                raise ValueError(f"unknown loss {loss!r}; use ce, margin, kl or a callable")
            (grad,) = torch.autograd.grad(objective, x_adv)
            x_adv = project_linf(x_adv.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()


class LinfPGD:
    """:func:`pgd_attack` with its settings on the object, called as ``attack(x, y)``.

    Args:
        model: maps [0, 1] images to logits (crafted in eval mode, restored after).
        eps, alpha, steps, loss, start, kappa: as for :func:`pgd_attack` (``alpha=None``: ε/4).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> atk = LinfPGD(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), eps=0.1, steps=2)
        >>> atk.alpha, atk.loss, atk.start
        (0.025, 'ce', 'uniform')
        >>> x = torch.rand(2, 1, 2, 2)
        >>> bool(((atk(x, torch.tensor([0, 1])) - x).abs() <= 0.1 + 1e-6).all())
        True
    """

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float | None = None, steps: int = 10,
                 loss: LossName = "ce", start: StartName = "uniform", kappa: float = CW_KAPPA) -> None:
        if loss not in ("ce", "margin"):
            raise ValueError(f"LinfPGD takes loss ce or margin (kl needs soft labels: use pgd_attack), got {loss!r}")
        if start not in ("uniform", "normal", "zero"):
            raise ValueError(f"unknown start {start!r}; use uniform, normal or zero")
        self.model = model
        self.eps, self.steps, self.loss, self.start, self.kappa = float(eps), int(steps), loss, start, float(kappa)
        self.alpha = default_step_size(eps) if alpha is None else float(alpha)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd_attack(self.model, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, loss=self.loss,
                          start=self.start, kappa=self.kappa)

    def __repr__(self) -> str:
        return (f"LinfPGD(eps={self.eps:.6g}, alpha={self.alpha:.6g}, steps={self.steps}, loss={self.loss!r}, "
                f"start={self.start!r})")

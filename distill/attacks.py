"""Inner attacks for training and white-box evaluation: one L∞ PGD with selectable loss and start.

``pgd_attack`` covers every method's inner maximization: PGD-AT / ARD / DARHT (cross-entropy),
TRADES and RSLAD (KL to given soft labels), CW∞ evaluation (margin loss), FGSM (one step from
zero) and fast AT (one step of 1.25 ε from a uniform start). Gradients are taken with respect to
the input only (parameter ``.grad`` is never touched), in fp32 (autocast off), with the model in
eval mode unless told otherwise.

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
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pgd_attack", "eval_mode", "margin_loss", "kl_to_soft_labels", "LossName", "StartName"]

LossName = Literal["ce", "margin", "kl"]
StartName = Literal["uniform", "normal", "zero"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def margin_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
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


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float, alpha: float,
               steps: int, loss: LossName | Callable[[torch.Tensor], torch.Tensor] = "ce",
               start: StartName = "uniform", target_logits: torch.Tensor | None = None, kappa: float = 50.0,
               use_eval_mode: bool = True, normal_std: float = 0.001) -> torch.Tensor:
    """L∞ projected gradient ascent on ``loss`` around ``x`` (inputs in [0, 1]); returns ``x_adv``.

    Args:
        model: maps [0, 1] images to logits.
        x: clean images; y: labels (needed for ``ce`` and ``margin``).
        eps, alpha, steps: radius, step size, number of steps (``steps=0`` returns ``x``).
        loss: ``ce``, ``margin`` (CW∞), ``kl`` (to ``target_logits``), or a callable of the logits.
        start: ``uniform`` in [-ε, ε] (Madry), ``normal`` (x + 0.001 N(0, I): TRADES, RSLAD, the DARHT
            reference) or ``zero`` (FGSM).
        use_eval_mode: craft with the model in eval mode (BatchNorm statistics untouched); restored after.
    """
    if steps <= 0 or eps == 0:
        return x.detach().clone()
    x = x.detach()
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
    x_adv = (x + delta).clamp(0, 1)
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
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
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()

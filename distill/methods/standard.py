"""``standard``: natural training, cross-entropy on clean inputs (for teachers and clean baselines).

Loss: ``CE(S(x), y)``, batch mean. No inner attack, no teachers. ``logits`` are the clean logits.

Reference protocol (the usual CIFAR recipe): SGD lr 0.1, momentum 0.9, weight decay 5e-4, LR x0.1
at 50% and 75% of training.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from distill.methods import create_method
    >>> m = create_method("standard")
    >>> parts = m.step(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.rand(2, 1, 2, 2), torch.tensor([0, 2]))
    >>> sorted(parts)
    ['ce', 'logits', 'loss']
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, register_method

__all__ = ["Standard"]


@register_method("standard")
@dataclass(kw_only=True)
class Standard(Method):
    """Plain cross-entropy on clean inputs."""

    training_defaults = {"epochs": 200, "milestones": [0.5, 0.75], "weight_decay": 5e-4}

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = student(x).float()
        ce = F.cross_entropy(logits, y)
        return {"loss": ce, "logits": logits.detach(), "ce": ce.detach()}

"""Seeded class-balanced subsets and the index files saved with every output.

Example:
    >>> import torch
    >>> y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    >>> torch.bincount(y[balanced_subset(y, 6, seed=1)]).tolist()
    [2, 2, 2]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..files import atomic_write_json

__all__ = ["balanced_subset", "holdout_indices", "save_indices", "load_indices"]


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Seeded class-balanced subset of ``n`` indices (sorted); all indices in order if ``n >= len``.

    Each class gets ``n // C`` samples; the remainder goes to classes drawn by the seed. A class
    with too few samples gives all it has and the others make up the difference. Only labels are
    read, so an image folder's subset is chosen before any image is decoded.

    Example:
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
        >>> balanced_subset(y, 9).tolist() == list(range(9))
        True
    """
    labels = torch.as_tensor(labels).long().cpu()
    total = len(labels)
    if n <= 0:
        raise UserError(f"`n` (the number of images) must be a positive integer, got {n}")
    if n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(labels)
    pools = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    pools = {c: p[torch.randperm(len(p), generator=g)] for c, p in pools.items()}
    quota = {c: 0 for c in pools}
    remaining = n
    # Fill round by round: each round gives every class with samples left an equal share, and the
    # leftover of a round to classes drawn by the seed.
    while remaining > 0:
        open_classes = [c for c in pools if quota[c] < len(pools[c])]
        share, extra = divmod(remaining, len(open_classes))
        lucky = set(torch.tensor(open_classes)[torch.randperm(len(open_classes), generator=g)[:extra]].tolist())
        for c in open_classes:
            take = min(share + (1 if c in lucky else 0), len(pools[c]) - quota[c])
            quota[c] += take
            remaining -= take
    chosen = torch.cat([pools[c][:quota[c]] for c in pools])
    return torch.sort(chosen).values


def holdout_indices(labels: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, held)``: a seeded class-balanced ``n`` of the indices held out (a validation split)
    and the rest, both sorted; refused when nothing would be left.

    Example:
        >>> kept, held = holdout_indices(torch.tensor([0, 0, 1, 1, 0, 1]), 2, seed=0)
        >>> len(kept), sorted(torch.tensor([0, 0, 1, 1, 0, 1])[held].tolist())
        (4, [0, 1])
    """
    labels = torch.as_tensor(labels)
    if n >= len(labels):
        raise UserError(f"holding out {n} of {len(labels)} training images leaves none to train on; hold out fewer")
    held = balanced_subset(labels, n, seed)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def save_indices(path: str | os.PathLike, indices: torch.Tensor, **meta: Any) -> None:
    """Save evaluation indices (and what they index) as JSON, atomically."""
    atomic_write_json(path, {**meta, "n": int(len(indices)), "indices": [int(i) for i in indices]})


def load_indices(path: str | os.PathLike) -> torch.Tensor:
    """Load indices written by :func:`save_indices`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        values = data["indices"]
    except FileNotFoundError as err:
        raise UserError(f"indices file not found: {path}") from err
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not an indices file written by the toolkit ({err})") from err
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
        raise UserError(f"{path}: 'indices' must be a list of non-negative integers (no fractions, which would be "
                        "truncated to other images)")
    return torch.tensor(values, dtype=torch.long)

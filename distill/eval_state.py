"""Resumable evaluation: what :func:`distill.evaluation.evaluate_robustness` has finished, on disk.

Like the official AutoAttack's ``state.py``, the state holds, per attack, the per-sample booleans
once the attack is complete and, inside AutoAttack, the points still robust after each finished
component. It is written atomically after every attack and every AutoAttack component, keyed by
everything that defines the evaluation (the model's weights, the images, the labels, the attacks
and their settings, ε, seed, batch size, subsets): a state with another key is refused, never
mixed in. Every attack and component is seeded by itself, so a resumed evaluation gives exactly
the metrics of an uninterrupted one (only the timings differ).

Example:
    >>> import tempfile, pathlib, torch
    >>> st = EvalState(pathlib.Path(tempfile.mkdtemp()) / "e.state.pt", key="k")
    >>> st.finish("pgd20", torch.tensor([True, False]), {})
    >>> EvalState(st.path, key="k").done["pgd20"].tolist()
    [True, False]
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from transfer_analysis.errors import UserError
from transfer_analysis.utils import atomic_torch_save, safe_torch_load

__all__ = ["EvalState", "evaluation_key", "STATE_FORMAT"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "darht-eval-state-1"


def _tensor_digest(h: Any, t: torch.Tensor) -> None:
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update((flat if flat.dtype == torch.bool else flat.view(torch.uint8)).numpy().tobytes())


def evaluation_key(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Mapping[str, Any]) -> str:
    """SHA-256 of the model's state (parameters and buffers), the images, the labels and ``settings``."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        _tensor_digest(h, value)
    _tensor_digest(h, x)
    _tensor_digest(h, y)
    h.update(repr(sorted((str(k), repr(v)) for k, v in settings.items())).encode())
    return h.hexdigest()


class EvalState:
    """The on-disk state of one evaluation (``path``; ``None``: in memory only, nothing saved).

    ``write=False`` (the non-zero ranks of a ``torchrun`` evaluation) reads the state but never
    writes or deletes it.
    """

    def __init__(self, path: str | Path | None, key: str, write: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.key = key
        self.write = write
        self.done: dict[str, torch.Tensor] = {}
        self.details: dict[str, dict[str, Any]] = {}
        self.partial: dict[str, dict[str, Any]] = {}  # AutoAttack: robust after each finished component
        if self.path is not None and self.path.is_file():
            data = safe_torch_load(self.path, what="evaluation state", trust_hint=None)
            if not isinstance(data, Mapping) or data.get("format") != STATE_FORMAT:
                raise UserError(f"{self.path} is not an evaluation state written by the toolkit; delete it")
            if data.get("key") != key:
                raise UserError(f"{self.path} holds the state of another evaluation (other model, images or "
                                "settings); delete it, or evaluate into another `out`")
            self.done = dict(data["done"])
            self.details = dict(data["details"])
            self.partial = dict(data["partial"])
            logger.info("resuming the evaluation in %s: %s done%s", self.path, ", ".join(self.done) or "nothing",
                        "".join(f"; {a} after {', '.join(p['components_done'])}" for a, p in self.partial.items()))

    def _save(self) -> None:
        if self.path is not None and self.write:
            atomic_torch_save({"format": STATE_FORMAT, "key": self.key, "done": self.done, "details": self.details,
                               "partial": self.partial}, self.path)

    def finish(self, name: str, correct: torch.Tensor, details: Mapping[str, Any]) -> None:
        """Record a finished attack (its per-sample booleans and its details)."""
        self.done[name] = correct.detach().to("cpu").clone()
        self.details[name] = dict(details)
        self.partial.pop(name, None)
        self._save()

    def component_done(self, attack: str, component: str, robust: torch.Tensor, after: Mapping[str, float]) -> None:
        """Record that an AutoAttack component finished: the points still robust after it."""
        entry = self.partial.setdefault(attack, {"components_done": [], "robust": None, "after": {}})
        entry["components_done"] = [*entry["components_done"], component]
        entry["robust"] = robust.detach().to("cpu").clone()
        entry["after"] = dict(after)
        self._save()

    def remove(self) -> None:
        """Delete the state (the evaluation is complete and its result written)."""
        if self.path is not None and self.write and self.path.is_file():
            self.path.unlink()

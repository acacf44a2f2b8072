"""Training methods behind one registry: ``create_method(name, **cfg)``, ``list_methods()``.

One module per method, each with its loss, its inner attack and its reduction convention in the
module docstring (docs/methods.md gives the sources):

========== ============================================================================
standard   clean cross-entropy (teachers, clean baselines)
pgd-at     Madry et al.: CE on PGD examples
fast-at    Wong et al.: CE on FGSM-from-random-start examples (quick teachers)
trades     Zhang et al.: CE(x) + β KL(f(x) || f(x'))
kd         Hinton et al.: clean-input distillation
ard        Goldblum et al.: teacher(x) -> student(x') KL + clean CE
rslad      Zi et al.: teacher(x) soft labels on x' and x
mtard      Zhao et al.: robust teacher on x', clean teacher on x, adaptive weights
darht      Deng et al.: multi-teacher distillation through the student-teacher feature map
========== ============================================================================

Example:
    >>> from distill.methods import list_methods, create_method
    >>> list_methods()
    ['ard', 'darht', 'fast-at', 'kd', 'mtard', 'pgd-at', 'rslad', 'standard', 'trades']
    >>> create_method("rslad").min_teachers
    1
"""

from __future__ import annotations

from . import ard, darht, fast_at, kd, mtard, pgd_at, rslad, standard, trades  # noqa: F401  (registration)
from .base import (
    AdversarialMethod,
    FrozenTeachers,
    Method,
    canonical_method_name,
    create_method,
    get_method_class,
    list_methods,
    register_method,
)

__all__ = [
    "Method",
    "AdversarialMethod",
    "FrozenTeachers",
    "register_method",
    "create_method",
    "get_method_class",
    "list_methods",
    "canonical_method_name",
]

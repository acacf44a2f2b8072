"""Robust evaluation: clean, FGSM, PGD, CW∞, AutoAttack and black-box transfer, with masking checks.

One entry point, :func:`evaluate_robustness`, used after training and by ``darht evaluate``. It
returns the ``metrics.json`` dict of docs/cli.md: per-attack accuracy, the per-sample worst case over
every attack run, and gradient-masking flags in the spirit of AutoAttack's ``checks.py``.

Attacks (L∞, images in [0, 1], the model in eval mode):

- ``clean``: no perturbation.
- ``fgsm``: one step of size ε from the clean image (no random start), cross-entropy.
- ``pgd20`` (``pgdN`` for N steps): step ε/4, uniform random start in [-ε, ε], cross-entropy.
- ``cw`` (``cwN``): CW∞ = PGD on the margin loss ``max_{j != y} z_j - z_y`` (κ = 50), 30 steps,
  step ε/4 (2/255 at ε = 8/255, the usual setting), uniform random start.
- ``autoattack``: AutoAttack *standard* with the official settings, built from torchattacks'
  components (torchattacks' own ``AutoAttack`` defaults to 10 iterations): APGD-CE (100
  iterations, ρ = 0.75, 1 restart), APGD-T (100 iterations, 9 target classes), FAB-T (100
  iterations, 9 target classes), Square (5000 queries, p_init 0.8, no schedule rescaling), all
  seeded. Each component runs only on the points still robust; a point counts as robust only if
  every component fails on it. With fewer than 10 classes, C - 1 targets are used; APGD-T's
  targeted DLR loss needs 4 classes, so below that it is skipped (and said so in ``diagnostics``).
- ``autoattack-rand``: AutoAttack's ``version="rand"`` for randomized defenses: APGD-CE and
  APGD-DLR, each averaging ``eot_iter`` (default 20) gradient samples per step (EOT).
- ``autoattack-fast``: a cheaper, *non-standard* variant: APGD-CE + APGD-T only (no FAB-T, no
  Square). Do not report it as AutoAttack.
- ``transfer:NAME``: black-box transfer: PGD-20 crafted white-box on pool model NAME, evaluated
  on the model.

Every per-sample result is ANDed with clean correctness: a misclassified clean image is already
an adversarial example inside the ball. So ε = 0 gives clean accuracy for every attack.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(8, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    >>> m = evaluate_robustness(model, x, y, attacks=("clean", "fgsm", "pgd20"), eps=0.05,
    ...                         check_eps_sweep=False)
    >>> sorted(m["accuracy"]), m["n"]
    (['clean', 'fgsm', 'pgd20'], 8)
    >>> m["worst_case"] <= min(m["accuracy"].values())
    True
"""

from transfer_analysis.attacks import (  # noqa: F401 - the evaluation vocabulary, re-exported
    AUTOATTACK_FAST,
    AUTOATTACK_RAND,
    AUTOATTACK_STANDARD,
    AUTOATTACK_VERSIONS,
    CW_KAPPA,
    CW_STEPS,
    TRANSFER_STEPS,
    VALID_ATTACKS_TEXT,
    AutoAttackConfig,
    attack_kind,
    attack_settings,
    autoattack_config_for,
    build_autoattack,
    parse_attacks,
)

from . import checks, correct, evaluate  # noqa: F401 - the submodules, for tests that patch them
from .checks import (  # noqa: F401
    GRADIENT_SAMPLES,
    NOISE_TOLERANCE,
    RANDOMNESS_FORWARDS,
    RANDOMNESS_TOLERANCE,
    SQUARE_TOLERANCE,
    SWEEP_EPS,
    SWEEP_MAX_ACCURACY,
    SWEEP_SAMPLES,
    UPPER_BOUND_NOTE,
    masking_flags,
    noise_tolerance,
)
from .correct import accuracy, per_sample_correct, robust_accuracy
from .evaluate import DEFAULT_ATTACKS, check_attack_samples, evaluate_robustness

__all__ = [
    "DEFAULT_ATTACKS",
    "AutoAttackConfig",
    "AUTOATTACK_STANDARD",
    "AUTOATTACK_FAST",
    "parse_attacks",
    "attack_settings",
    "build_autoattack",
    "accuracy",
    "per_sample_correct",
    "robust_accuracy",
    "evaluate_robustness",
    "masking_flags",
    "check_attack_samples",
    "noise_tolerance",
]

"""The training methods' PGD: re-exported from the one attack package, :mod:`transfer_analysis.attacks`.

Kept so that ``from distill.attacks import pgd_attack`` (README, earlier scripts) still works.

Example:
    >>> from distill.attacks import pgd_attack
    >>> from transfer_analysis.attacks import pgd_attack as same
    >>> pgd_attack is same
    True
"""

from transfer_analysis.attacks.pgd import (  # noqa: F401 - re-exported
    LinfPGD,
    LossName,
    StartName,
    eval_mode,
    kl_to_soft_labels,
    margin_loss,
    pgd_attack,
)

__all__ = ["pgd_attack", "LinfPGD", "eval_mode", "margin_loss", "kl_to_soft_labels", "LossName", "StartName"]

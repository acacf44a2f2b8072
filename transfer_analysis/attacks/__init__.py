"""The toolkit's one attack package: what the matrix, the training methods and evaluation run.

- :mod:`.threat`: the L∞ threat model, the ε-ball projection and the one default step (ε/4).
- :mod:`.pgd`: the toolkit's PGD (``pgd_attack``, ``LinfPGD``) and its losses (CE, CW margin, KL).
- :mod:`.registry`: attacks by name (``pgd``, ``fgsm``, ``cw``, ``mifgsm``, ``apgd``, any
  torchattacks L∞ attack) as :class:`AttackConfig` objects, which are both what runs and what is
  recorded.
- :mod:`.autoattack`: AutoAttack's versions from torchattacks' components.
- :mod:`.names`: the evaluation vocabulary (``pgd20``, ``cwN``, ``transfer:NAME``...) mapped onto
  the registry.

Example:
    >>> from transfer_analysis.attacks import AttackConfig, attack_config
    >>> attack_config("pgd10", 8 / 255).key() == AttackConfig("pgd", eps=8 / 255).key()
    True
"""

from .autoattack import (
    AUTOATTACK_FAST,
    AUTOATTACK_RAND,
    AUTOATTACK_STANDARD,
    AUTOATTACK_VERSIONS,
    AutoAttackConfig,
    autoattack_config_for,
    build_autoattack,
)
from .names import (
    CW_STEPS,
    TRANSFER_STEPS,
    VALID_ATTACKS_TEXT,
    attack_config,
    attack_kind,
    attack_settings,
    parse_attacks,
    transfer_source_name,
)
from .pgd import CW_KAPPA, LinfPGD, LossName, StartName, eval_mode, kl_to_soft_labels, margin_loss, pgd_attack
from .registry import (
    DEFAULT_STEPS,
    AttackConfig,
    AttackSpec,
    attack_record,
    build_attack,
    canonical_attack_name,
    get_attack_spec,
    list_attacks,
    register_attack,
)
from .threat import DEFAULT_STEP_FRACTION, clip_attack_output, default_step_size, project_linf

__all__ = [
    "attack_record", "AttackConfig", "AttackSpec", "DEFAULT_STEPS", "build_attack", "list_attacks",
    "register_attack", "get_attack_spec", "canonical_attack_name",
    "pgd_attack", "LinfPGD", "eval_mode", "margin_loss", "kl_to_soft_labels", "LossName", "StartName", "CW_KAPPA",
    "DEFAULT_STEP_FRACTION", "default_step_size", "project_linf", "clip_attack_output",
    "AutoAttackConfig", "AUTOATTACK_STANDARD", "AUTOATTACK_FAST", "AUTOATTACK_RAND", "AUTOATTACK_VERSIONS",
    "autoattack_config_for", "build_autoattack",
    "VALID_ATTACKS_TEXT", "CW_STEPS", "TRANSFER_STEPS", "parse_attacks", "attack_kind", "attack_config",
    "attack_settings", "transfer_source_name",
]

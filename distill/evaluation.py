"""Robust evaluation: clean, FGSM, PGD, CW∞, AutoAttack and black-box transfer, with masking checks.

One entry point, :func:`evaluate_robustness`, used after training and by ``darht evaluate``. It
returns the ``metrics.json`` dict of CLI.md: per-attack accuracy, the per-sample worst case over
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

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.attacks import eval_mode, pgd_attack
from transfer_analysis.errors import UserError
from transfer_analysis.utils import format_eps, parse_eps, progress, resolve_device

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

logger = logging.getLogger(__name__)

DEFAULT_ATTACKS: tuple[str, ...] = ("clean", "fgsm", "pgd20", "cw", "autoattack")
VALID_ATTACKS_TEXT = ("clean, fgsm, pgd20 (pgdN for N steps), cw (cwN for N steps), autoattack, "
                      "autoattack-rand, autoattack-fast, transfer:NAME")

CW_STEPS = 30
CW_KAPPA = 50.0
TRANSFER_STEPS = 20

# Gradient-masking checks.
NOISE_TOLERANCE = 0.01      # accuracy differences below max(this, 1.5 / n) are noise
SWEEP_EPS = 0.5             # the large ε of the sweep (or 4 ε if larger, at most 1)
SWEEP_SAMPLES = 200         # points of the sweep subset
SWEEP_MAX_ACCURACY = 0.1    # PGD accuracy above this at the large ε is flagged
GRADIENT_SAMPLES = 512      # points whose input gradient is checked for all-zeros
RANDOMNESS_TOLERANCE = 1e-4  # max L2 difference of L2-normalized logits between forwards (AutoAttack's alpha)
RANDOMNESS_FORWARDS = 5      # forwards compared by the randomness check (AutoAttack's check_randomized: 5)
SQUARE_TOLERANCE = 0.002     # AutoAttack's check_square_sr: Square may lower accuracy by at most 0.2%
UPPER_BOUND_NOTE = ("a gradient-masking check fired: the robust accuracies are upper bounds, not estimates "
                    "(see flags)")

_PGD_RE = re.compile(r"^pgd(\d+)$")
_CW_RE = re.compile(r"^cw(\d+)$")


# --------------------------------------------------------------------------------------------
# attack names and settings
# --------------------------------------------------------------------------------------------
def parse_attacks(spec: str | Iterable[str]) -> list[str]:
    """Validate attack names (a comma-separated string or a sequence) and return them canonical.

    Names are lower-cased (except the pool model name of ``transfer:NAME``); duplicates are
    dropped, order kept. Unknown names are a :class:`UserError` listing the valid ones.

    Example:
        >>> parse_attacks("clean, PGD20,cw,transfer:vit_a,pgd20")
        ['clean', 'pgd20', 'cw', 'transfer:vit_a']
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        if not isinstance(raw, str):
            raise UserError(f"attack names must be strings, got {raw!r}; valid: {VALID_ATTACKS_TEXT}")
        item = raw.strip()
        if not item:
            continue
        head, sep, tail = item.partition(":")
        if sep:
            if head.strip().lower() != "transfer":
                raise UserError(f"unknown attack {item!r}; valid: {VALID_ATTACKS_TEXT}")
            source = tail.strip()
            if not source:
                raise UserError(f"attack {item!r} needs a pool model name, e.g. transfer:vit_a")
            name = f"transfer:{source}"
        else:
            name = item.lower()
            m = _PGD_RE.match(name) or _CW_RE.match(name)
            if m:
                if int(m.group(1)) < 1:
                    raise UserError(f"attack {item!r} needs at least one step, e.g. pgd20")
                name = f"{name[:-len(m.group(1))]}{int(m.group(1))}"
            elif name not in ("clean", "fgsm", "cw", *AUTOATTACK_VERSIONS):
                raise UserError(f"unknown attack {item!r}; valid: {VALID_ATTACKS_TEXT}")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(f"no attack given; valid: {VALID_ATTACKS_TEXT}")
    return out


def attack_kind(name: str) -> str:
    """Family of a canonical attack name: clean, fgsm, pgd, cw, autoattack or transfer."""
    if name.startswith("transfer:"):
        return "transfer"
    if name.startswith("autoattack"):
        return "autoattack"
    if _PGD_RE.match(name):
        return "pgd"
    if name == "cw" or _CW_RE.match(name):
        return "cw"
    return name


def _steps(name: str) -> int:
    m = _PGD_RE.match(name) or _CW_RE.match(name)
    return int(m.group(1)) if m else (CW_STEPS if name == "cw" else 0)


@dataclass(frozen=True)
class AutoAttackConfig:
    """Settings of the AutoAttack ensemble; the defaults are the official *standard* version.

    ``apgdt_targets`` and ``fab_targets`` are capped at ``n_classes - 1`` when the data has fewer
    classes. Pass a reduced copy (``dataclasses.replace``) only for quick checks; results with
    non-default settings are not AutoAttack numbers.

    Example:
        >>> cfg = AutoAttackConfig()
        >>> cfg.components, cfg.apgd_steps, cfg.apgdt_targets, cfg.fab_targets, cfg.square_queries
        (('apgd-ce', 'apgd-t', 'fab-t', 'square'), 100, 9, 9, 5000)
    """

    name: str = "standard"
    components: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
    apgd_steps: int = 100
    apgd_restarts: int = 1
    apgd_rho: float = 0.75
    apgdt_steps: int = 100
    apgdt_targets: int = 9
    apgdt_restarts: int = 1
    fab_steps: int = 100
    fab_targets: int = 9
    fab_restarts: int = 1
    fab_alpha_max: float = 0.1
    fab_eta: float = 1.05
    fab_beta: float = 0.9
    square_queries: int = 5000
    square_p_init: float = 0.8
    square_restarts: int = 1
    square_rescale_schedule: bool = False
    #: gradient samples averaged per APGD step (expectation over transformation); 1 = deterministic model
    eot_iter: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["components"] = list(self.components)
        return d


AUTOATTACK_STANDARD = AutoAttackConfig()
AUTOATTACK_FAST = AutoAttackConfig(name="fast (non-standard: APGD-CE + APGD-T only)",
                                   components=("apgd-ce", "apgd-t"))
#: AutoAttack's version="rand" for randomized defenses: APGD-CE and APGD-DLR, 20 EOT samples per step
AUTOATTACK_RAND = AutoAttackConfig(name="rand", components=("apgd-ce", "apgd-dlr"), eot_iter=20)
#: attack name -> its AutoAttack version
AUTOATTACK_VERSIONS = {"autoattack": AUTOATTACK_STANDARD, "autoattack-fast": AUTOATTACK_FAST,
                       "autoattack-rand": AUTOATTACK_RAND}


def autoattack_config_for(name: str, override: AutoAttackConfig | None = None,
                          eot_iter: int | None = None) -> AutoAttackConfig:
    """The AutoAttack settings that ``name`` runs: the one rule behind evaluation and its record.

    ``override`` replaces the version's settings (quick tests only); ``eot_iter`` sets the EOT
    samples of ``autoattack-rand`` (default 20, AutoAttack's).

    Example:
        >>> autoattack_config_for("autoattack-rand", eot_iter=5).eot_iter, autoattack_config_for("autoattack").name
        (5, 'standard')
    """
    cfg = override or AUTOATTACK_VERSIONS[name]
    if name == "autoattack-rand" and eot_iter is not None:
        cfg = replace(cfg, eot_iter=int(eot_iter))
    return cfg
_AA_COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square", "apgd-dlr")


def attack_settings(name: str, eps: float, autoattack_config: AutoAttackConfig | None = None,
                    eot_iter: int | None = None) -> dict[str, Any]:
    """The settings one attack runs with (what ``metrics.json`` records under ``settings``).

    Example:
        >>> attack_settings("pgd20", 8 / 255)["alpha"] == 2 / 255
        True
    """
    kind = attack_kind(name)
    if kind == "clean":
        return {"perturbation": "none"}
    if kind == "fgsm":
        return {"loss": "ce", "steps": 1, "alpha": eps, "start": "zero"}
    if kind == "pgd":
        return {"loss": "ce", "steps": _steps(name), "alpha": eps / 4, "start": "uniform"}
    if kind == "cw":
        return {"loss": "margin", "kappa": CW_KAPPA, "steps": _steps(name), "alpha": eps / 4, "start": "uniform"}
    if kind == "transfer":
        return {"source": name.split(":", 1)[1], "crafted_with": f"pgd{TRANSFER_STEPS}", "loss": "ce",
                "steps": TRANSFER_STEPS, "alpha": eps / 4, "start": "uniform"}
    cfg = autoattack_config_for(name, autoattack_config, eot_iter)
    return {"version": cfg.name, "library": "torchattacks components", **cfg.to_dict()}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


def _resolve_eval_device(model: nn.Module, x: torch.Tensor, device: str | torch.device | None) -> torch.device:
    """The device to evaluate on; a model elsewhere is moved there (in place)."""
    if device is None:
        return _model_device(model, x.device)
    dev = resolve_device(device)
    here = _model_device(model, dev)
    if here != dev:
        logger.debug("moving the model from %s to %s for evaluation", here, dev)
        model.to(dev)
    return dev


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x).detach()
    y = torch.as_tensor(y).detach().long()
    if x.ndim != 4:
        raise UserError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise UserError(f"labels must have shape ({x.shape[0]},) to match the images, got {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise UserError("no images to evaluate; give at least one sample")
    if not x.is_floating_point():
        raise UserError(f"images must be floats in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise UserError(f"images must lie in [0, 1] (pixel space; models normalize inside forward), found "
                        f"values in [{lo:.3g}, {hi:.3g}]; do not normalize the inputs")
    return x, y


def _chunks(indices: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def _my_groups(n: int, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """This process's fixed groups of sample positions: ``(g, positions)`` for group ``g`` of
    ``[g * batch_size, (g + 1) * batch_size)``, every ``world``-th group under ``torchrun``.

    A group is the unit of seeding and of sharding: each attack call sees the points of one group
    (those still to attack) and is seeded from the group's index, so the result of every sample
    is the same whatever the number of processes.
    """
    from transfer_analysis import distributed as dist_utils

    world, rank = dist_utils.world_size(), dist_utils.rank()
    return [(g, idx) for g, idx in enumerate(_chunks(torch.arange(n), batch_size)) if g % world == rank]


def _group_seed(seed: int, group: int) -> int:
    return int(seed) * 1_000_003 + int(group)


def _gather_groups(values: torch.Tensor, groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Every process's results on its groups, merged into one vector (the input for one process)."""
    from transfer_analysis import distributed as dist_utils

    if dist_utils.world_size() == 1:
        return values
    pos = torch.cat([idx for _, idx in groups]) if groups else torch.zeros(0, dtype=torch.long)
    out = values.clone()
    for their_pos, their_values in dist_utils.all_gather_object((pos, values[pos].cpu())):
        out[their_pos] = their_values.to(out.device)
    return out


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's RNG streams."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, what: str) -> torch.Tensor:
    """Clip an attack's output into the ε-ball and [0, 1] (NaN -> clean), warning if it left them."""
    x_adv = torch.where(torch.isnan(x_adv), x, x_adv)
    excess = float((x_adv - x).abs().amax()) - eps if x.numel() else 0.0
    if excess > 1e-5:
        logger.warning("%s returned points outside the eps-ball (by %.2e); projecting them back", what, excess)
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


@torch.no_grad()
def _clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """Per-sample clean correctness (CPU bool) and the number of logits the model returns."""
    out = torch.zeros(len(y), dtype=torch.bool)
    n_logits = 0
    all_idx = torch.arange(len(y))
    with eval_mode(model):
        for idx in progress(list(_chunks(all_idx, batch_size)), desc="clean"):
            logits = model(x[idx].to(device))
            if logits.ndim != 2 or logits.shape[0] != len(idx):
                raise UserError(f"the model returns shape {tuple(logits.shape)} for {len(idx)} images; "
                                "expected logits of shape (N, classes)")
            n_logits = int(logits.shape[1])
            out[idx] = (logits.argmax(1) == y[idx].to(device)).cpu()
    return out, n_logits


# --------------------------------------------------------------------------------------------
# AutoAttack from torchattacks' components
# --------------------------------------------------------------------------------------------
def build_autoattack(model: nn.Module, eps: float, n_classes: int,
                     config: AutoAttackConfig = AUTOATTACK_STANDARD, seed: int = 0,
                     device: torch.device | str | None = None) -> list[tuple[str, Any]]:
    """The AutoAttack components, configured explicitly, as ``[(name, torchattacks attack), ...]``.

    Targets are ``min(config targets, n_classes - 1)``; APGD-T is left out below 4 classes (its
    targeted DLR loss needs them). torchattacks takes the number of targets as ``n_classes - 1``,
    so it is given ``targets + 1``.

    Example:
        >>> from torch import nn
        >>> comps = build_autoattack(nn.Sequential(nn.Flatten(), nn.Linear(4, 10)), 8 / 255, n_classes=10)
        >>> [(name, getattr(a, "steps", None)) for name, a in comps]
        [('apgd-ce', 100), ('apgd-t', 100), ('fab-t', 100), ('square', None)]
    """
    import torchattacks

    unknown = [c for c in config.components if c not in _AA_COMPONENTS]
    if unknown:
        raise ValueError(f"unknown AutoAttack component(s) {unknown}; use {', '.join(_AA_COMPONENTS)}")
    dev = resolve_device(device) if device is not None else _model_device(model, torch.device("cpu"))
    comps: list[tuple[str, Any]] = []
    # torchattacks prints when it cannot guess the device (a model without parameters): keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for name in config.components:
            if name in ("apgd-ce", "apgd-dlr"):
                atk = torchattacks.APGD(model, norm="Linf", eps=eps, steps=config.apgd_steps,
                                        n_restarts=config.apgd_restarts, seed=seed, loss=name.split("-")[1],
                                        eot_iter=config.eot_iter, rho=config.apgd_rho, verbose=False)
            elif name == "apgd-t":
                targets = min(config.apgdt_targets, n_classes - 1)
                if n_classes < 4 or targets < 1:
                    logger.warning("APGD-T skipped: its targeted DLR loss needs at least 4 classes (the data has %d)",
                                   n_classes)
                    continue
                atk = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=config.apgdt_steps,
                                         n_restarts=config.apgdt_restarts, seed=seed, eot_iter=config.eot_iter,
                                         rho=config.apgd_rho, verbose=False, n_classes=targets + 1)
            elif name == "fab-t":
                targets = min(config.fab_targets, n_classes - 1)
                if targets < 1:
                    continue
                atk = torchattacks.FAB(model, norm="Linf", eps=eps, steps=config.fab_steps,
                                       n_restarts=config.fab_restarts, alpha_max=config.fab_alpha_max,
                                       eta=config.fab_eta, beta=config.fab_beta, verbose=False, seed=seed,
                                       multi_targeted=True, n_classes=targets + 1)
            else:  # square
                atk = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=config.square_queries,
                                          n_restarts=config.square_restarts, p_init=config.square_p_init,
                                          loss="margin", resc_schedule=config.square_rescale_schedule,
                                          seed=seed, verbose=False)
            atk.set_device(dev)
            comps.append((name, atk))
    if out.getvalue().strip():
        logger.debug("torchattacks: %s", out.getvalue().strip())
    return comps


def _autoattack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, eps: float,
                        n_classes: int, config: AutoAttackConfig, batch_size: int, seed: int,
                        device: torch.device, details: dict[str, Any], state: Any = None,
                        attack_name: str = "autoattack") -> torch.Tensor:
    """AutoAttack per sample: each component on the points still robust; worst case per point.

    With a ``state`` (:class:`distill.eval_state.EvalState`), the points still robust are saved
    after every component, and components finished before an interruption are skipped.
    """
    robust = clean.clone()
    comps = build_autoattack(model, eps, n_classes, config, seed=seed, device=device)
    details["components_run"] = [name for name, _ in comps]
    details["apgd_t_targets"] = min(config.apgdt_targets, n_classes - 1) if "apgd-t" in details["components_run"] \
        else 0
    details["fab_t_targets"] = min(config.fab_targets, n_classes - 1) if "fab-t" in details["components_run"] else 0
    if "apgd-t" in config.components and "apgd-t" not in details["components_run"]:
        details["skipped"] = f"apgd-t (needs >= 4 classes, the data has {n_classes})"
    after: dict[str, float] = {}
    finished: list[str] = []
    if state is not None and attack_name in state.partial:
        part = state.partial[attack_name]
        robust, after, finished = part["robust"].to(robust.device).clone(), dict(part["after"]), \
            list(part["components_done"])
    groups = _my_groups(len(y), batch_size)
    for name, atk in comps:
        if name in finished:
            continue
        for _, group in progress(groups, desc=f"autoattack {name}"):
            chunk = group[robust[group]]  # each component on the points of the group still robust
            if not len(chunk):
                continue
            xb, yb = x[chunk].to(device), y[chunk].to(device)
            with contextlib.redirect_stdout(io.StringIO()):
                x_adv = atk(xb, yb)  # torchattacks seeds every call with the component's seed
            x_adv = _project(x_adv.detach().to(device), xb, eps, name)
            fooled = (_predict(model, x_adv) != yb).cpu()
            robust[chunk[fooled]] = False
        robust = _gather_groups(robust, groups)
        after[name] = int(robust.sum()) / len(robust)
        logger.debug("autoattack: accuracy %.4f after %s", after[name], name)
        if state is not None:
            state.component_done(attack_name, name, robust, after)
    details["accuracy_after"] = after
    return robust


# --------------------------------------------------------------------------------------------
# per-sample correctness
# --------------------------------------------------------------------------------------------
def _pgd_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, *, eps: float,
                 alpha: float, steps: int, loss: str, start: str, batch_size: int, device: torch.device,
                 desc: str, source: nn.Module | None = None, seed: int = 0) -> torch.Tensor:
    """Correct under L∞ PGD crafted on ``source`` (default: the model itself), only clean-correct
    points; each fixed group of samples seeded by itself (:func:`_my_groups`)."""
    robust = clean.clone()
    attacker = source if source is not None else model
    groups = _my_groups(len(y), batch_size)
    with eval_mode(attacker):
        for g, group in progress(groups, desc=desc):
            chunk = group[clean[group]]
            if not len(chunk):
                continue
            xb, yb = x[chunk].to(device), y[chunk].to(device)
            with _seeded(_group_seed(seed, g), device):
                x_adv = pgd_attack(attacker, xb, yb, eps=eps, alpha=alpha, steps=steps, loss=loss, start=start,
                                   kappa=CW_KAPPA)
            robust[chunk] = (_predict(model, x_adv) == yb).cpu()
    return _gather_groups(robust, groups)


def _attack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, name: str,
                    eps: float, batch_size: int, pool: Mapping[str, nn.Module] | None, seed: int,
                    n_classes: int, device: torch.device, autoattack_config: AutoAttackConfig | None,
                    details: dict[str, Any], eot_iter: int | None = None, state: Any = None) -> torch.Tensor:
    kind = attack_kind(name)
    if kind == "clean":
        return clean.clone()
    with _seeded(seed, device):
        if kind == "fgsm":
            return _pgd_correct(model, x, y, clean, eps=eps, alpha=eps, steps=1, loss="ce", start="zero",
                                batch_size=batch_size, device=device, desc=name, seed=seed)
        if kind in ("pgd", "cw"):
            return _pgd_correct(model, x, y, clean, eps=eps, alpha=eps / 4, steps=_steps(name),
                                loss="ce" if kind == "pgd" else "margin", start="uniform",
                                batch_size=batch_size, device=device, desc=name, seed=seed)
        if kind == "transfer":
            source = _transfer_source(name, pool)
            if _model_device(source, device) != device:
                source.to(device)
            return _pgd_correct(model, x, y, clean, eps=eps, alpha=eps / 4, steps=TRANSFER_STEPS, loss="ce",
                                start="uniform", batch_size=batch_size, device=device, desc=name, source=source,
                                seed=seed)
        # AutoAttack
        if eps == 0:
            details["components_run"] = []
            return clean.clone()
        cfg = autoattack_config_for(name, autoattack_config, eot_iter)
        with eval_mode(model):
            return _autoattack_correct(model, x, y, clean, eps, n_classes, cfg, batch_size, seed, device, details,
                                       state=state, attack_name=name)


def _transfer_source(name: str, pool: Mapping[str, nn.Module] | None) -> nn.Module:
    """The pool model that crafts the examples of ``transfer:NAME``; a clear error when missing."""
    source_name = name.split(":", 1)[1]
    if pool is None:
        raise UserError(f"attack {name!r} needs a pool of source models (--pool POOL.yaml)")
    if source_name not in pool:
        raise UserError(f"attack {name!r}: no model {source_name!r} in the pool; it has "
                        f"{', '.join(sorted(pool)) or 'no models'}")
    return pool[source_name]


def per_sample_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "pgd20",
                       eps: float | str = 8 / 255, batch_size: int = 256,
                       pool: Mapping[str, nn.Module] | None = None, seed: int = 0, n_classes: int | None = None,
                       device: str | torch.device | None = None,
                       autoattack_config: AutoAttackConfig | None = None) -> torch.Tensor:
    """Which samples the model classifies correctly under one attack (a CPU ``BoolTensor`` of length N).

    A sample is correct only if it is correct clean *and* on the attack's output (see the module
    docstring). ``pool`` maps names to models for ``transfer:NAME``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> bool((per_sample_correct(model, x, y, "pgd20", eps=0.0) == per_sample_correct(model, x, y, "clean")).all())
        True
    """
    (name,) = parse_attacks([attack])
    eps_f = parse_eps(eps)
    x, y = _check_inputs(x, y)
    dev = _resolve_eval_device(model, x, device)
    with eval_mode(model):
        clean, n_logits = _clean_correct(model, x, y, batch_size, dev)
        return _attack_correct(model, x, y, clean, name, eps_f, batch_size, pool, seed, n_classes or n_logits, dev,
                               autoattack_config, {})


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Clean accuracy (a fraction in [0, 1]), in eval mode and without gradients.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.eye(2)); _ = lin.bias.zero_()
        >>> accuracy(nn.Sequential(nn.Flatten(), lin), torch.tensor([[[[0.9, 0.1]]], [[[0.2, 0.7]]]]),
        ...          torch.tensor([0, 0]))
        0.5
    """
    x, y = _check_inputs(x, y)
    dev = _model_device(model, x.device)
    clean, _ = _clean_correct(model, x, y, batch_size, dev)
    return int(clean.sum()) / len(clean)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "pgd20",
                    eps: float | str = 8 / 255, batch_size: int = 256,
                    pool: Mapping[str, nn.Module] | None = None, seed: int = 0) -> float:
    """Accuracy under one attack (a fraction in [0, 1]); see :func:`per_sample_correct`.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> robust_accuracy(model, x, y, "fgsm", eps=0.1) <= accuracy(model, x, y)
        True
    """
    correct = per_sample_correct(model, x, y, attack, eps, batch_size, pool, seed)
    return int(correct.sum()) / len(correct)


# --------------------------------------------------------------------------------------------
# gradient-masking checks
# --------------------------------------------------------------------------------------------
def noise_tolerance(n: int) -> float:
    """Accuracy difference below which two attacks are "the same" on ``n`` samples.

    ``max(NOISE_TOLERANCE, 1.5 / n)``: one sample never raises a flag.

    Example:
        >>> noise_tolerance(1000), noise_tolerance(50)
        (0.01, 0.03)
    """
    return max(NOISE_TOLERANCE, 1.5 / max(int(n), 1))


def _zero_gradient_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                         device: torch.device, eps: float = 0.0, seed: int = 0) -> tuple[int, int]:
    """(samples with an all-zero input gradient, samples checked).

    Stricter than AutoAttack's ``check_zero_gradients`` (the CE gradient at the clean points): a
    sample counts when the gradient of the cross-entropy *or* of the margin loss is all zero at the
    clean point *or* at a seeded uniform point of the ε-ball, where a quantized or saturated model
    that happens to have a gradient at the clean point has none.
    """
    idx = torch.arange(min(len(y), GRADIENT_SAMPLES))
    g = torch.Generator().manual_seed(int(seed) + 7)
    zero = 0
    with eval_mode(model), torch.enable_grad():
        for chunk in _chunks(idx, batch_size):
            x0, yb = x[chunk].to(device), y[chunk].to(device)
            noise = (torch.rand(x0.shape, generator=g) * 2 - 1).to(device) * eps
            bad = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for start in ((x0,) if eps <= 0 else (x0, (x0 + noise).clamp(0, 1))):
                for loss_name in ("ce", "margin"):
                    xb = start.clone().requires_grad_(True)
                    logits = model(xb).float()
                    loss = F.cross_entropy(logits, yb, reduction="sum") if loss_name == "ce" else \
                        _margin_sum(logits, yb)
                    grad = torch.autograd.grad(loss, xb, allow_unused=True)[0] if loss.requires_grad else None
                    bad |= True if grad is None else grad.flatten(1).abs().amax(1) == 0
            zero += int(bad.sum())
    return zero, len(idx)


def _margin_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of CW's margin ``max_{j != y} z_j - z_y``."""
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - logits.gather(1, y[:, None]).squeeze(1)).sum()


@torch.no_grad()
def _randomness_check(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
                      ) -> tuple[float, bool, int, bool]:
    """(max L2 difference of normalized logits over every pair of :data:`RANDOMNESS_FORWARDS`
    forwards, outputs look like probabilities, distinct predicted classes, predictions changed):
    AutoAttack's ``check_randomized``, which also uses 5 forwards."""
    xb = x[:batch_size].to(device)
    with eval_mode(model):
        outs = [model(xb).float() for _ in range(RANDOMNESS_FORWARDS)]
    normed = [o / (o.norm(dim=1, keepdim=True) + 1e-10) for o in outs]
    diff = max(float((normed[i] - normed[j]).norm(dim=1).max())
               for i in range(len(outs)) for j in range(i + 1, len(outs)))
    preds_changed = any(not torch.equal(outs[0].argmax(1), o.argmax(1)) for o in outs[1:])
    a = outs[0]
    probs = bool(a.max() < 1 + 1e-5 and a.min() > -1e-5 and ((a.sum(1) - 1).abs() < 1e-5).all())
    return diff, probs, int(a.argmax(1).unique().numel()), preds_changed


def _eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, eps: float,
               results: Mapping[str, torch.Tensor], batch_size: int, seed: int,
               device: torch.device) -> dict[str, Any]:
    """PGD-20 at a large ε on a seeded subset: accuracy should be near 0 and below that at ε."""
    big = min(1.0, max(SWEEP_EPS, 4 * eps))
    g = torch.Generator().manual_seed(int(seed))
    sub = torch.sort(torch.randperm(len(y), generator=g)[:SWEEP_SAMPLES]).values
    xs, ys, cs = x[sub], y[sub], clean[sub]
    with _seeded(seed, device):
        large = _pgd_correct(model, xs, ys, cs, eps=big, alpha=big / 4, steps=20, loss="ce", start="uniform",
                             batch_size=batch_size, device=device, desc="eps sweep", seed=seed)
        if "pgd20" in results:
            at_eps = results["pgd20"][sub]
        else:
            at_eps = _pgd_correct(model, xs, ys, cs, eps=eps, alpha=eps / 4, steps=20, loss="ce", start="uniform",
                                  batch_size=batch_size, device=device, desc="eps sweep (eps)", seed=seed)
    return {"attack": "pgd20", "eps": big, "n": int(len(sub)), "accuracy": int(large.sum()) / len(sub),
            "accuracy_at_eps": int(at_eps.sum()) / len(sub)}


def masking_flags(accuracy: Mapping[str, float], n: int, diagnostics: Mapping[str, Any] | None = None,
                  ) -> list[str]:
    """Gradient-masking flags from per-attack accuracies and the checks' diagnostics.

    Each flag is ``"name: reason"``. Rules (a difference counts when it exceeds
    :func:`noise_tolerance`): ``zero-gradients`` (some samples have an all-zero input gradient),
    ``pgd-weaker-than-fgsm``, ``blackbox-stronger-than-whitebox`` (a transfer attack beats every
    white-box attack), ``stronger-than-autoattack`` (PGD or CW beats AutoAttack, which contains a
    stronger PGD), ``square-stronger`` (inside AutoAttack, the black-box Square attack still fools
    points the gradient-based components missed), ``eps-sweep`` (accuracy does not fall toward 0
    at a large ε, or rises with ε), ``randomized`` (logits change between two forwards in eval
    mode), ``probabilities`` (the model seems to return probabilities, not logits).

    Example:
        >>> masking_flags({"clean": 0.9, "fgsm": 0.3, "pgd20": 0.6}, n=1000)[0].split(":")[0]
        'pgd-weaker-than-fgsm'
        >>> masking_flags({"clean": 0.9, "fgsm": 0.5, "pgd20": 0.4}, n=1000)
        []
    """
    diag = diagnostics or {}
    tol = noise_tolerance(n)
    flags: list[str] = []

    zero, checked = diag.get("zero_gradient_count"), diag.get("zero_gradient_checked")
    if zero and checked:
        flags.append(f"zero-gradients: {zero}/{checked} samples ({zero / checked:.1%}) have an all-zero input "
                     "gradient of the loss, so gradient-based attacks cannot move them (gradient masking, "
                     "e.g. a non-differentiable or saturated input layer?)")

    fgsm = accuracy.get("fgsm")
    for name, acc in accuracy.items():
        if attack_kind(name) == "pgd" and fgsm is not None and acc > fgsm + tol:
            flags.append(f"pgd-weaker-than-fgsm: {name} accuracy {acc:.4f} > fgsm {fgsm:.4f}; a multi-step attack "
                         "should be at least as strong as one step (gradient masking or a bad step size?)")

    white = {k: v for k, v in accuracy.items() if attack_kind(k) in ("fgsm", "pgd", "cw", "autoattack")}
    if white:
        best_white = min(white, key=lambda k: white[k])
        for name, acc in accuracy.items():
            if attack_kind(name) == "transfer" and acc < white[best_white] - tol:
                flags.append(f"blackbox-stronger-than-whitebox: {name} accuracy {acc:.4f} < strongest white-box "
                             f"{best_white} {white[best_white]:.4f}; white-box gradients are unreliable "
                             "(gradient masking?)")

    for aa in ("autoattack", "autoattack-fast"):
        if aa not in accuracy:
            continue
        for name, acc in accuracy.items():
            if attack_kind(name) in ("pgd", "cw") and acc < accuracy[aa] - tol:
                flags.append(f"stronger-than-autoattack: {name} accuracy {acc:.4f} < {aa} {accuracy[aa]:.4f}; "
                             "AutoAttack should be the strongest attack (check its settings)")

    for aa, comp in (diag.get("autoattack") or {}).items():
        after = comp.get("accuracy_after") or {}
        order = [c for c in comp.get("components_run", []) if c in after]
        if "square" in order and order.index("square") > 0:
            # AutoAttack's check_square_sr: the lowest accuracy before Square, and its 0.2% threshold
            before = min(after[c] for c in order[:order.index("square")])
            if before - after["square"] > SQUARE_TOLERANCE:
                flags.append(f"square-stronger: in {aa}, the black-box Square attack lowered accuracy from "
                             f"{before:.4f} to {after['square']:.4f} after the gradient-based components "
                             f"(more than AutoAttack's {SQUARE_TOLERANCE:.1%}: gradient masking?)")

    sweep = diag.get("eps_sweep")
    if sweep:
        if sweep["accuracy"] > SWEEP_MAX_ACCURACY or sweep["accuracy"] > sweep["accuracy_at_eps"] + tol:
            hint = (" or a model that predicts one class for every input (degenerate, not robust)"
                    if diag.get("predicted_classes") == 1 else "")
            flags.append(f"eps-sweep: PGD-20 accuracy is {sweep['accuracy']:.4f} at eps {sweep['eps']:g} (vs "
                         f"{sweep['accuracy_at_eps']:.4f} at the evaluated eps) on {sweep['n']} samples; accuracy "
                         f"should fall toward 0 as eps grows (gradient masking?{hint})")

    rnd = diag.get("randomness_max_diff")
    if (rnd is not None and rnd > RANDOMNESS_TOLERANCE) or diag.get("randomness_predictions_changed"):
        flags.append(f"randomized: logits differ between {RANDOMNESS_FORWARDS} forwards in eval mode (normalized "
                     f"difference {rnd:.2g}"
                     + ("; predictions changed" if diag.get("randomness_predictions_changed") else "")
                     + "); a randomized defense needs EOT attacks (AutoAttack's rand version)")

    if diag.get("outputs_are_probabilities"):
        flags.append("probabilities: the outputs look like probabilities (in [0, 1], summing to 1), not logits; "
                     "attacks on the loss of probabilities are weak")
    return flags


# --------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------
def evaluate_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        attacks: str | Sequence[str] = DEFAULT_ATTACKS, eps: float | str = 8 / 255,
                        batch_size: int = 256, pool: Mapping[str, nn.Module] | None = None, seed: int = 0,
                        device: str | torch.device | None = None, n_classes: int | None = None,
                        check_eps_sweep: bool = True, *,
                        autoattack_config: AutoAttackConfig | None = None,
                        attack_samples: Mapping[str, int] | None = None,
                        subset_seed: int | None = None, eot_iter: int | None = None,
                        state_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate ``model`` under every attack in ``attacks``; return the ``metrics.json`` dict.

    Args:
        model: maps [0, 1] images to logits; evaluated in eval mode (its mode is restored after).
        x, y: images (N, C, H, W) in [0, 1] and labels (N,), on any device (moved per batch).
        attacks: names (see the module docstring) or a comma-separated string. ``clean`` is always
            reported.
        eps: L∞ radius, a number or a fraction string such as ``"8/255"``.
        batch_size: samples per attack batch.
        pool: name -> model, for ``transfer:NAME``.
        seed: seeds every attack (the caller's RNG state is left untouched).
        device: where to evaluate (default: the model's device); the model is moved if needed.
        n_classes: classes of the data (default: the width of the model's logits).
        check_eps_sweep: also run PGD-20 at a large ε on a subset (a gradient-masking check).
        autoattack_config: override AutoAttack's settings (default: the official standard ones;
            ``autoattack-fast`` uses :data:`AUTOATTACK_FAST`). For quick tests only.
        attack_samples: attack -> number of samples, to run an expensive attack (AutoAttack) on a
            seeded class-balanced subset of ``x`` only; the subsets are nested (a smaller one is
            inside a larger one). Its accuracy is then over its subset, and ``worst_case`` and the
            masking flags use the samples every attack ran on, so they compare like with like.
        subset_seed: seeds those subsets (default: ``seed``); fix it to evaluate several models on
            the same samples while their attacks are seeded differently.
        eot_iter: EOT gradient samples per step of ``autoattack-rand`` (AutoAttack's rand version for
            randomized models; default 20).
        state_path: keep a resumable state there (:mod:`distill.eval_state`): every finished attack
            and AutoAttack component is saved, and a later call with the same model, data and
            settings continues from it and returns exactly the same metrics. The caller deletes it
            once the result is written (:meth:`~distill.eval_state.EvalState.remove`).

    Returns:
        ``{"n", "eps", "accuracy": {attack: fraction}, "n_per_attack": {attack: samples},
        "worst_case", "worst_case_n", "flags": [...], "settings": {...}, "diagnostics": {...}}``;
        ``worst_case`` is the fraction of the ``worst_case_n`` samples every attack ran on that
        are correct under every attack (clean included).

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> m = evaluate_robustness(model, x, y, attacks="clean,pgd20", eps=0.0, check_eps_sweep=False)
        >>> m["accuracy"]["pgd20"] == m["accuracy"]["clean"] == m["worst_case"]
        True
    """
    names = parse_attacks(attacks)
    eps_f = parse_eps(eps)
    if int(batch_size) < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size}")
    batch_size = int(batch_size)
    x, y = _check_inputs(x, y)
    for name in names:
        if attack_kind(name) == "transfer":
            _transfer_source(name, pool)  # fail before any attack runs
    dev = _resolve_eval_device(model, x, device)
    n = len(y)
    if "clean" not in names:
        names = ["clean", *names]
    subsets = _attack_subsets(attack_samples, names, y, seed if subset_seed is None else subset_seed)
    logger.info("evaluating %d samples at eps %s: %s", n, format_eps(eps_f),
                ", ".join(f"{k} ({len(subsets[k])})" if k in subsets else k for k in names))

    results: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    with eval_mode(model):
        t0 = time.perf_counter()
        clean, n_logits = _clean_correct(model, x, y, batch_size, dev)
        seconds["clean"] = time.perf_counter() - t0
        if n_classes is not None and int(n_classes) != n_logits:
            raise UserError(f"the model returns {n_logits} logits but the data has {n_classes} classes; "
                            "check num_classes of the model")
        classes = int(n_classes) if n_classes is not None else n_logits
        results["clean"] = clean
        state = None
        if state_path is not None:
            from distill.eval_state import EvalState, evaluation_key

            defining = {"attacks": names, "eps": eps_f, "seed": int(seed), "batch_size": batch_size,
                        "classes": classes, "subsets": {k: v.tolist() for k, v in subsets.items()},
                        "settings": {k: attack_settings(k, eps_f, autoattack_config, eot_iter) for k in names}}
            from transfer_analysis import distributed as dist_utils

            # every process reads the state; rank 0 alone writes it
            state = EvalState(state_path, evaluation_key(model, x, y, defining), write=dist_utils.rank() == 0)
        for name in names:
            if name == "clean":
                continue
            t0 = time.perf_counter()
            info: dict[str, Any] = {}
            pos = subsets.get(name)
            xs, ys, cs = (x, y, clean) if pos is None else (x[pos], y[pos], clean[pos])
            if state is not None and name in state.done:  # finished before an interruption
                results[name], info = state.done[name].to(clean.device), dict(state.details[name])
            else:
                results[name] = _attack_correct(model, xs, ys, cs, name, eps_f, batch_size, pool, seed, classes,
                                                dev, autoattack_config, info, eot_iter, state)
                if state is not None:
                    state.finish(name, results[name], info)
            seconds[name] = time.perf_counter() - t0
            if attack_kind(name) == "autoattack":
                details[name] = info
            done = len(results[name])
            logger.info("%-16s accuracy %.4f (%d/%d, %.1f s)", name, int(results[name].sum()) / done,
                        int(results[name].sum()), done, seconds[name])

        attacked = len(names) > 1
        diagnostics: dict[str, Any] = {}
        t0 = time.perf_counter()
        if attacked:
            zero, checked = _zero_gradient_check(model, x, y, batch_size, dev, eps=eps_f, seed=seed)
            diagnostics["zero_gradient_count"] = zero
            diagnostics["zero_gradient_checked"] = checked
            diagnostics["zero_gradient_fraction"] = zero / checked
        rnd, probs, distinct, changed = _randomness_check(model, x, batch_size, dev)
        diagnostics["randomness_max_diff"] = rnd
        diagnostics["randomness_predictions_changed"] = changed
        diagnostics["outputs_are_probabilities"] = probs
        diagnostics["predicted_classes"] = distinct
        has_white = any(attack_kind(k) in ("fgsm", "pgd", "cw", "autoattack") for k in names)
        if check_eps_sweep and has_white and eps_f > 0:
            full = {k: v for k, v in results.items() if k not in subsets}
            diagnostics["eps_sweep"] = _eps_sweep(model, x, y, clean, eps_f, full, batch_size, seed, dev)
        if details:
            diagnostics["autoattack"] = details
        seconds["checks"] = time.perf_counter() - t0

    acc = {name: int(results[name].sum()) / len(results[name]) for name in names}
    # the samples every attack ran on: the smallest subset (they are nested), else all
    common = min(subsets.values(), key=len) if subsets else torch.arange(n)
    on_common = {}
    for name in names:
        full = torch.zeros(n, dtype=torch.bool)
        full[subsets.get(name, torch.arange(n))] = results[name].cpu()
        on_common[name] = full[common]
    n_common = len(common)
    worst = torch.stack(list(on_common.values())).all(0)
    from transfer_analysis import distributed as dist_utils

    # how the fixed groups of samples were shared out (under torchrun: every world-th group per process)
    diagnostics["groups_per_process"] = [int(k) for k in dist_utils.all_gather_object(len(_my_groups(n, batch_size)))]
    diagnostics["correct"] = {name: int(results[name].sum()) for name in names}
    diagnostics["worst_case_correct"] = int(worst.sum())
    diagnostics["seconds"] = seconds
    acc_common = {name: int(v.sum()) / n_common for name, v in on_common.items()}
    if subsets:
        diagnostics["subsets"] = {"n_common": n_common, "accuracy_common": acc_common,
                                  "positions": {k: [int(i) for i in v] for k, v in subsets.items()}}
    flags = masking_flags(acc_common, n_common, diagnostics)
    for flag in flags:
        logger.warning("gradient-masking check: %s", flag)
    settings = {
        "attacks": names,
        "eps": eps_f,
        "eps_text": format_eps(eps_f),
        "norm": "Linf",
        "batch_size": batch_size,
        "seed": int(seed),
        "n_classes": classes,
        "device": str(dev),
        "check_eps_sweep": bool(check_eps_sweep),
        "attack_settings": {name: attack_settings(name, eps_f, autoattack_config, eot_iter) for name in names},
        "attack_samples": {k: len(v) for k, v in subsets.items()},
        "noise_tolerance": noise_tolerance(n_common),
    }
    return {"n": n, "eps": eps_f, "accuracy": acc, "n_per_attack": {k: len(results[k]) for k in names},
            "worst_case": int(worst.sum()) / n_common, "worst_case_n": n_common, "flags": flags,
            "upper_bound": bool(flags), "upper_bound_note": UPPER_BOUND_NOTE if flags else None,
            "settings": settings, "diagnostics": diagnostics}


def check_attack_samples(attack_samples: Mapping[str, int] | None, attacks: Sequence[str]) -> dict[str, int]:
    """Validate an ``attack -> sample count`` mapping against the attacks run; canonical names.

    The one check behind ``evaluate_robustness(attack_samples=...)``, ``final_attack_samples``,
    ``darht evaluate --attack-samples`` and a study's ``evaluation.attack_samples``.

    Example:
        >>> check_attack_samples({"AutoAttack": 200}, ["clean", "pgd20", "autoattack"])
        {'autoattack': 200}
    """
    if attack_samples is None:
        return {}
    if not isinstance(attack_samples, Mapping):
        raise UserError("attack samples: expected a mapping that maps attack names to sample counts "
                        f"(e.g. {{'autoattack': 200}}), got {attack_samples!r}")
    canonical = parse_attacks(attacks)
    out: dict[str, int] = {}
    for key, value in attack_samples.items():
        parsed = parse_attacks([key])
        name = parsed[0] if parsed else key
        if name == "clean":
            raise UserError("clean accuracy is always measured on every sample; attack samples cannot limit it")
        if name not in canonical:
            raise UserError(f"attack samples given for {key!r}, which is not among the attacks run "
                            f"({', '.join(canonical)})")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"attack samples for {key!r} must be a positive integer, got {value!r}")
        out[name] = value
    return out


def _attack_subsets(attack_samples: Mapping[str, int] | None, names: Sequence[str], y: torch.Tensor,
                    seed: int) -> dict[str, torch.Tensor]:
    """attack -> positions in ``y`` (sorted) for the attacks limited to fewer samples than ``y`` has.

    The subsets are seeded, class-balanced and nested: the largest is drawn from all samples, each
    smaller one from the one before.
    """
    from transfer_analysis.data import balanced_subset

    limits = {name: m for name, m in check_attack_samples(attack_samples, names).items() if m < len(y)}
    subsets: dict[str, torch.Tensor] = {}
    pool = torch.arange(len(y))
    for name, m in sorted(limits.items(), key=lambda kv: -kv[1]):
        pool = pool[balanced_subset(y.cpu()[pool], m, seed=seed)]
        subsets[name] = pool
    return subsets

"""The attack registry: names, defaults, torchattacks look-up, kwargs checks, cache keys."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from transfer_analysis.attacks import (AttackConfig, build_attack, canonical_attack_name, get_attack_spec,
                                       list_attacks, register_attack)
from transfer_analysis.errors import UserError


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval().requires_grad_(False)


def test_builtins_and_listing():
    assert list_attacks() == ["apgd", "fgsm", "mifgsm", "pgd"]
    every = list_attacks(include_torchattacks=True)
    assert {"bim", "tpgd", "apgdt", "ffgsm", "pgd"} <= set(every)
    # under their standard names torchattacks' AutoAttack and Square would run weaker defaults: refused
    assert not {"autoattack", "square"} & set(every)
    for name in ("autoattack", "AutoAttack", "square"):
        with pytest.raises(UserError, match="darht evaluate --attacks autoattack"):
            get_attack_spec(name)
    assert not {"cw", "pgdl2", "deepfool", "jsma", "multiattack", "lgv", "onepixel"} & set(every)


def test_pgd_defaults(model):
    atk = build_attack("pgd", model, eps=8 / 255)
    assert type(atk) is torchattacks.PGD
    assert (atk.eps, atk.steps, atk.alpha, atk.random_start) == (8 / 255, 10, 2 / 255, True)
    assert atk.normalization_used is None  # pool models normalize inside forward
    atk = build_attack("PGD", model, eps=0.1, steps=3, step_size=0.01, random_start=False)
    assert (atk.eps, atk.steps, atk.alpha, atk.random_start) == (0.1, 3, 0.01, False)


def test_other_builtins(model):
    fgsm = build_attack("fgsm", model, eps=0.1, steps=99)
    assert type(fgsm) is torchattacks.FGSM and fgsm.eps == 0.1
    mi = build_attack("MI-FGSM", model, eps=0.2, decay=0.5)
    assert type(mi) is torchattacks.MIFGSM and (mi.steps, mi.alpha, mi.decay) == (10, 0.05, 0.5)
    apgd = build_attack("apgd", model, eps=0.1, steps=5, seed=7, n_restarts=2)
    assert type(apgd) is torchattacks.APGD
    assert (apgd.norm, apgd.steps, apgd.seed, apgd.n_restarts, apgd.verbose) == ("Linf", 5, 7, 2, False)


def test_any_torchattacks_linf_attack_by_name(model):
    bim = build_attack("bim", model, eps=0.2, steps=4)
    assert type(bim) is torchattacks.BIM and (bim.eps, bim.steps, bim.alpha) == (0.2, 4, 0.05)
    ffgsm = build_attack("FFGSM", model, eps=0.08)  # torchattacks' own step ratio: 10/255 for 8/255
    assert type(ffgsm) is torchattacks.FFGSM and ffgsm.alpha == pytest.approx(0.1)
    apgdt = build_attack("apgdt", model, eps=0.1, num_classes=3)
    assert type(apgdt) is torchattacks.APGDT and apgdt.n_target_classes == 2 and apgdt.norm == "Linf"
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    assert float((bim(x, y) - x).abs().max()) <= 0.2 + 1e-6


def test_unknown_and_unsuitable_names():
    with pytest.raises(UserError, match=r"unknown attack 'pgdd'; did you mean pgd.*built-ins: apgd, fgsm, mifgsm, pgd"):
        get_attack_spec("pgdd")
    with pytest.raises(UserError, match="L2 attack"):
        get_attack_spec("PGDL2")
    with pytest.raises(UserError, match="no L-inf eps budget"):
        get_attack_spec("cw")
    for hostile in ("__import__('os')", "attack", "Attack", "os.system", "wrapper_method", ""):
        with pytest.raises(UserError):
            get_attack_spec(hostile)


def test_kwargs_are_checked():
    with pytest.raises(UserError, match="takes no argument 'decy'.*did you mean 'decay'"):
        AttackConfig("mifgsm", kwargs={"decy": 0.5}).resolved()
    with pytest.raises(UserError, match="set by --eps/--steps/--step-size"):
        AttackConfig("pgd", kwargs={"alpha": 0.1}).resolved()
    with pytest.raises(UserError, match="--steps"):
        AttackConfig("pgd", steps=0).resolved()
    with pytest.raises(UserError, match="--eps"):
        AttackConfig("pgd", eps=float("nan")).resolved()


def test_config_resolution_and_key():
    r = AttackConfig("MI-FGSM", eps=0.1).resolved()
    assert (r.name, r.eps, r.steps, r.step_size, r.random_start) == ("mifgsm", 0.1, 10, 0.025, None)
    assert AttackConfig("pgd", eps=0.1).key() == AttackConfig("PGD", eps=0.1, steps=10, step_size=0.025).key()
    assert AttackConfig("fgsm", eps=0.1, steps=3).key() == AttackConfig("fgsm", eps=0.1).key()
    keys = {AttackConfig(**kw).key() for kw in (
        {"name": "pgd"}, {"name": "pgd", "steps": 20}, {"name": "pgd", "eps": 4 / 255},
        {"name": "pgd", "random_start": False}, {"name": "mifgsm"}, {"name": "mifgsm", "kwargs": {"decay": 0.9}},
        {"name": "pgd", "step_size": 1 / 255})}
    assert len(keys) == 7 and all(len(k) == 64 for k in keys)
    # stable across processes and versions (a change would silently invalidate every cache)
    assert AttackConfig("pgd").key() == "c2731d5612072d4392a0ca0f8d4f82b8352aee5cda932532d9c0286af76ba0e4"
    assert canonical_attack_name(" MI_fgsm ") == "mifgsm"


def test_same_seed_same_examples_as_torchattacks(model):
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(11)
    ours = build_attack(AttackConfig("pgd", eps=0.1, steps=3), model)(x, y)
    torch.manual_seed(11)
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.025, steps=3, random_start=True)(x, y)
    assert torch.equal(ours, theirs)


def test_register_attack_decorator(model):
    @register_attack("rfgsm_demo", cls="RFGSM", description="R+FGSM (test)")
    def _build(model, eps, steps, step_size, random_start, num_classes, seed, **kw):
        return torchattacks.RFGSM(model, eps=eps, alpha=step_size, steps=steps, **kw)

    try:
        assert "rfgsmdemo" in list_attacks()
        atk = build_attack("rfgsm-demo", model, eps=0.2, steps=2)
        assert type(atk) is torchattacks.RFGSM and (atk.alpha, atk.steps) == (0.05, 2)
    finally:
        from transfer_analysis import attacks

        attacks._REGISTRY.pop("rfgsmdemo")


@pytest.mark.parametrize("name", ["pgd", "fgsm", "mifgsm", "apgd", "bim", "tpgd"])
def test_attacks_stay_in_budget_and_fool(name):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval().requires_grad_(False)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(3, 16, generator=g))
        model[1].bias.zero_()
        x = torch.rand(12, 1, 4, 4, generator=g)
        y = model(x).argmax(1)  # labels the model gets right
    x_adv = build_attack(name, model, eps=0.3, steps=3)(x, y).detach()
    assert x_adv.shape == x.shape and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
    with torch.no_grad():
        assert int((model(x_adv).argmax(1) != y).sum()) >= 4


def test_the_recorded_attack_is_the_one_that_runs():
    """Issue 13: config.yaml records the torchattacks class and every default it keeps."""
    from transfer_analysis.attacks import attack_record

    rec = attack_record(AttackConfig("difgsm", eps=0.1, kwargs={"decay": 0.5}))
    assert rec["class"] == "torchattacks.DIFGSM" and rec["kwargs"] == {"decay": 0.5}
    assert rec["class_defaults"] == {"resize_rate": 0.9, "diversity_prob": 0.5}  # decay is given
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    atk = build_attack(AttackConfig("difgsm", eps=0.1, kwargs={"decay": 0.5}), model)
    assert atk.resize_rate == rec["class_defaults"]["resize_rate"] and atk.decay == 0.5

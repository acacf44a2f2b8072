"""The attack registry: names, defaults, torchattacks look-up, kwargs checks, cache keys."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from transfer_analysis.attacks import (AttackConfig, LinfPGD, attack_config, attack_settings, build_attack,
                                       canonical_attack_name, get_attack_spec, list_attacks, register_attack)
from transfer_analysis.errors import UserError


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval().requires_grad_(False)


def test_builtins_and_listing():
    assert list_attacks() == ["apgd", "cw", "fgsm", "mifgsm", "pgd"]
    every = list_attacks(include_torchattacks=True)
    assert {"bim", "tpgd", "apgdt", "ffgsm", "pgd"} <= set(every)
    # under their standard names torchattacks' AutoAttack and Square would run weaker defaults: refused
    assert not {"autoattack", "square"} & set(every)
    for name in ("autoattack", "AutoAttack", "square"):
        with pytest.raises(UserError, match="darht evaluate --attacks autoattack"):
            get_attack_spec(name)
    assert not {"pgdl2", "deepfool", "jsma", "multiattack", "lgv", "onepixel"} & set(every)


def test_pgd_defaults(model):
    atk = build_attack("pgd", model, eps=8 / 255)
    assert type(atk) is LinfPGD  # the toolkit's PGD, the one training and evaluation run
    assert (atk.eps, atk.steps, atk.alpha, atk.start, atk.loss) == (8 / 255, 10, 2 / 255, "uniform", "ce")
    atk = build_attack("PGD", model, eps=0.1, steps=3, step_size=0.01, random_start=False)
    assert (atk.eps, atk.steps, atk.alpha, atk.start) == (0.1, 3, 0.01, "zero")


def test_other_builtins(model):
    fgsm = build_attack("fgsm", model, eps=0.1, steps=99)
    assert type(fgsm) is LinfPGD and (fgsm.eps, fgsm.steps, fgsm.alpha, fgsm.start) == (0.1, 1, 0.1, "zero")
    cw = build_attack("cw", model, eps=0.1)
    assert (cw.loss, cw.kappa, cw.steps, cw.alpha, cw.start) == ("margin", 50.0, 30, 0.025, "uniform")
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
    with pytest.raises(UserError, match=r"unknown attack 'pgdd'; did you mean pgd.*built-ins: apgd, cw, fgsm, mifgsm, pgd"):
        get_attack_spec("pgdd")
    with pytest.raises(UserError, match="L2 attack"):
        get_attack_spec("PGDL2")
    with pytest.raises(UserError, match="no L-inf eps budget"):
        get_attack_spec("deepfool")
    for hostile in ("__import__('os')", "attack", "Attack", "os.system", "wrapper_method", ""):
        with pytest.raises(UserError):
            get_attack_spec(hostile)


def test_kwargs_are_checked():
    with pytest.raises(UserError, match="takes no argument 'decy'.*did you mean 'decay'"):
        AttackConfig("mifgsm", kwargs={"decy": 0.5}).resolved()
    with pytest.raises(UserError, match="set by `eps`/`steps`/`step_size`"):
        AttackConfig("pgd", kwargs={"alpha": 0.1}).resolved()
    with pytest.raises(UserError, match="`steps`"):
        AttackConfig("pgd", steps=0).resolved()
    with pytest.raises(UserError, match="`eps`"):
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
        from transfer_analysis.attacks import registry as attacks

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
    """Config.yaml records the torchattacks class and every default it keeps."""
    from transfer_analysis.attacks import attack_record

    rec = attack_record(AttackConfig("difgsm", eps=0.1, kwargs={"decay": 0.5}))
    assert rec["class"] == "torchattacks.DIFGSM" and rec["kwargs"] == {"decay": 0.5}
    assert rec["class_defaults"] == {"resize_rate": 0.9, "diversity_prob": 0.5}  # decay is given
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    atk = build_attack(AttackConfig("difgsm", eps=0.1, kwargs={"decay": 0.5}), model)
    assert atk.resize_rate == rec["class_defaults"]["resize_rate"] and atk.decay == 0.5


def test_one_vocabulary_across_matrix_training_and_evaluation(model):
    """Evaluation's fgsm / pgdN / cwN / transfer:NAME are the matrix's registry attacks,
    the training methods' PGD is the same code, and the recorded settings are read off what runs."""
    from distill.evaluation import per_sample_correct
    from distill.methods import create_method
    from transfer_analysis.matrix import _attack_source

    eps = 0.1
    assert attack_config("pgd20", eps).key() == AttackConfig("pgd", eps=eps, steps=20).key()
    assert attack_config("fgsm", eps).key() == AttackConfig("fgsm", eps=eps).key()
    assert attack_config("cw7", eps).key() == AttackConfig("cw", eps=eps, steps=7).key()
    assert attack_config("transfer:src", eps).key() == AttackConfig("pgd", eps=eps, steps=20).key()
    rec = attack_settings("cw7", eps)
    assert (rec["attack"], rec["loss"], rec["kappa"], rec["steps"], rec["alpha"], rec["start"]) == \
        ("cw", "margin", 50.0, 7, 0.025, "uniform")

    torch.manual_seed(3)
    source = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval().requires_grad_(False)
    x, y = torch.rand(12, 1, 4, 4), torch.tensor([0, 1, 2] * 4)
    clean = model(x).argmax(1) == y
    assert 0 < int(clean.sum()) < len(y)
    idx = torch.nonzero(clean).squeeze(1)
    for name, cfg, crafter, pool in (
            ("pgd20", AttackConfig("pgd", eps=eps, steps=20), model, None),
            ("fgsm", AttackConfig("fgsm", eps=eps), model, None),
            ("cw5", AttackConfig("cw", eps=eps, steps=5), model, None),
            ("transfer:src", AttackConfig("pgd", eps=eps, steps=20), source, {"src": source})):
        # the matrix crafts on the clean-correct points with seed 0 (evaluation's seed of group 0)
        x_adv = _attack_source(crafter, cfg.resolved(), x[idx], y[idx], batch_size=64, seed=0,
                               device=torch.device("cpu"), desc=name)
        expected = torch.zeros(len(y), dtype=torch.bool)
        expected[idx] = model(x_adv).argmax(1) == y[idx]
        got = per_sample_correct(model, x, y, name, eps=eps, batch_size=64, pool=pool, seed=0)
        assert torch.equal(got, expected), name

    # training: a method's inner PGD is the registry's pgd (same seed, same examples)
    method = create_method("pgd-at", eps=eps, steps=10)
    torch.manual_seed(5)
    trained = method.attack(model, x, y)
    torch.manual_seed(5)
    assert torch.equal(trained, build_attack(AttackConfig("pgd", eps=eps), model)(x, y))

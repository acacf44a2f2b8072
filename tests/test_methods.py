"""Methods: registry, frozen teachers, each method's loss going down, reduction conventions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_CNN
from distill.losses import kl_divergence
from distill.methods import FrozenTeachers, create_method, get_method_class, list_methods
from distill.student import build_student
from transfer_analysis.errors import UserError
from transfer_analysis.models import PixelSpaceModel, create_timm_model

ALL = ["ard", "darht", "fast-at", "kd", "mtard", "pgd-at", "rslad", "standard", "trades"]


def _teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return PixelSpaceModel(create_timm_model("resnet18_cifar", num_classes=4, in_chans=1, width=4), mean=[0.5],
                           std=[0.25])


@pytest.fixture(scope="module")
def batch(tiny_data):
    return tiny_data.images("train", torch.arange(32)), tiny_data.labels("train", torch.arange(32))


@pytest.fixture(scope="module")
def pretrained_teachers(batch):
    """Two small teachers that fit the batch a bit (so their soft labels carry information)."""
    x, y = batch
    teachers = {}
    for i, name in enumerate(("robust", "clean")):
        t = _teacher(10 + i)
        opt = torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.9)
        for _ in range(8):
            opt.zero_grad()
            F.cross_entropy(t(x), y).backward()
            opt.step()
        teachers[name] = t.eval()
    return teachers


def _student(method_name: str, k: int) -> nn.Module:
    torch.manual_seed(0)
    uses_map = get_method_class(method_name).uses_feature_map
    return build_student("resnet18_cifar", 4, k if uses_map else 0, in_chans=1, image_size=12, mean=[0.5],
                         std=[0.25], **TINY_CNN["kwargs"])


def test_registry() -> None:
    assert list_methods() == ALL
    with pytest.raises(UserError, match="unknown method 'pgd'.*did you mean"):
        create_method("pgd")
    with pytest.raises(UserError, match="has no option 'betta'.*did you mean 'beta'"):
        create_method("trades", betta=6)
    assert create_method("PGD_AT").name == "pgd-at"
    with pytest.raises(UserError, match="p_adv must be a number in"):
        create_method("darht", p_adv=1.5)
    with pytest.raises(UserError, match="weighting"):
        create_method("darht", weighting="max")
    with pytest.raises(UserError, match="eps"):
        create_method("pgd-at", eps="eight")
    m = create_method("darht", eps="8/255", alpha="0.003")
    assert m.alpha == pytest.approx(0.003) and m.eps == pytest.approx(8 / 255)
    assert create_method("fast-at", eps=0.1).alpha == pytest.approx(0.125)


def test_teacher_count_is_checked() -> None:
    t = {"a": _teacher(0), "b": _teacher(1), "c": _teacher(2)}
    with pytest.raises(UserError, match="at least 1"):
        create_method("darht").bind(None)
    with pytest.raises(UserError, match="at most 2"):
        create_method("mtard").bind(t)
    with pytest.raises(UserError, match="uses no teachers"):
        create_method("pgd-at").bind(t)
    m = create_method("darht")
    m.bind(t)
    assert m.teachers.names == ["a", "b", "c"]


@pytest.mark.parametrize("name", ALL)
def test_each_method_lowers_its_loss_on_a_fixed_batch(name: str, batch, pretrained_teachers) -> None:
    x, y = batch
    cls = get_method_class(name)
    teachers = dict(list(pretrained_teachers.items())[: 2 if cls.max_teachers is None or cls.max_teachers >= 2 else 0])
    if cls.max_teachers == 0:
        teachers = {}
    kwargs = {"eps": 0.05, "steps": 3} if name not in ("standard", "kd") else {}
    if name == "fast-at":
        kwargs["steps"] = 1
    if name == "darht":
        kwargs["p_adv"] = 0.5
    method = create_method(name, **kwargs)
    method.bind(teachers or None)
    method.on_epoch_start(epoch=1, epochs=2, lr=0.05, base_lr=0.05)  # DARHT: the CE+KD phase
    student = _student(name, len(teachers))
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)

    def loss_at_seed() -> float:
        torch.manual_seed(123)  # same attack start and same DARHT coin before and after training
        student.train()
        parts = method.step(student, x, y)
        return float(parts["loss"].detach())

    before = loss_at_seed()
    for i in range(8):
        torch.manual_seed(i)
        student.train()
        parts = method.step(student, x, y)
        assert {"loss", "logits"} <= set(parts)
        assert parts["logits"].shape == (32, 4) and not parts["logits"].requires_grad
        assert all(torch.is_tensor(v) and v.numel() == 1 for k, v in parts.items() if k not in ("loss", "logits"))
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
    after = loss_at_seed()
    assert after < before, f"{name}: loss {before:.4f} -> {after:.4f}"


def test_teachers_get_no_gradient_and_keep_their_batchnorm_statistics(batch) -> None:
    x, y = batch
    teachers = {"a": _teacher(0), "b": _teacher(1)}
    teachers["a"].train()  # a stray .train() must not let distillation move the statistics
    before = {n: {k: v.clone() for k, v in t.state_dict().items()} for n, t in teachers.items()}
    method = create_method("darht", eps=0.05, steps=2, p_adv=1.0)
    method.bind(teachers)
    method.on_epoch_start(1, 2, 0.1, 0.1)
    student = _student("darht", 2)
    student_bn_before = student.backbone.model.stem[1].running_mean.clone()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(2):
        student.train()
        parts = method.step(student, x, y)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
    for name, t in teachers.items():
        assert not t.training
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())
        for key, value in t.state_dict().items():
            assert torch.equal(value, before[name][key]), f"teacher {name}: {key} changed"
    assert not torch.equal(student.backbone.model.stem[1].running_mean, student_bn_before)  # the student's did


class _Spy(nn.Module):
    """A teacher that records the inputs it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("p_adv", [0.0, 1.0])
def test_darht_teachers_see_the_batch_the_student_trains_on(batch, p_adv: float, monkeypatch) -> None:
    x, y = batch
    spy = _Spy(_teacher(0))
    method = create_method("darht", eps=0.05, steps=2, p_adv=p_adv)
    method.bind({"spy": spy})
    method.on_epoch_start(1, 4, 0.1, 0.1)  # epochs 1 of 0-3: the CE+KD phase
    student = _student("darht", 1)
    trained_on: list[torch.Tensor] = []
    original = type(student).forward_with_map

    def record(self, inp):
        trained_on.append(inp.detach().clone())
        return original(self, inp)

    monkeypatch.setattr(type(student), "forward_with_map", record)
    parts = method.step(student, x, y)
    assert len(spy.seen) == 1 and len(trained_on) == 1
    assert torch.equal(spy.seen[0], trained_on[0])
    assert parts["adv_batch"].item() == p_adv
    delta = (trained_on[0] - x).abs().max().item()
    assert (delta == 0.0) if p_adv == 0.0 else (0 < delta <= 0.05 + 1e-6)
    assert method.phase == "ce+kd" and parts["kd"].item() > 0 and "w_spy" in parts


def test_darht_skips_teacher_forwards_in_the_ce_phase_unless_asked(batch) -> None:
    x, y = batch
    for log_kd, calls in ((False, 0), (True, 1)):
        spy = _Spy(_teacher(0))
        method = create_method("darht", eps=0.05, steps=1, p_adv=0.0, teachers_in_ce_phase=log_kd, schedule="reference")
        method.bind({"spy": spy})
        method.on_epoch_start(0, 4, 0.1, 0.1)
        parts = method.step(_student("darht", 1), x, y)
        assert method.phase == "ce" and len(spy.seen) == calls
        assert (parts["kd"].item() > 0) == log_kd and torch.isnan(parts["w_spy"]).item() != log_kd


def test_darht_phase_schedule() -> None:
    m = create_method("darht", schedule="reference")
    assert m.phase_bounds(200) == (50, 118) and m.p_adv == 0.5
    assert [m.phase_for(e, 10) for e in range(10)] == ["ce"] * 3 + ["ce+kd"] * 3 + ["kd"] * 4
    m2 = create_method("darht", phase_epochs=[1, 2])
    assert [m2.phase_for(e, 10) for e in range(4)] == ["ce", "ce+kd", "kd", "kd"]
    # the reference schedule is the default (the ablation found it best); budget: CE+KD every epoch, all adversarial
    assert create_method("darht").schedule == "reference"
    b = create_method("darht", schedule="budget")
    assert b.p_adv == 1.0 and {b.phase_for(e, 8) for e in range(8)} == {"ce+kd"}
    assert create_method("darht", p_adv=0.5).p_adv == 0.5  # an explicit value wins over the schedule's
    assert create_method("darht", schedule="reference", phases=[0.0, 1.0]).phase_bounds(8) == (0, 8)
    with pytest.raises(UserError, match="schedule must be one of reference, budget"):
        create_method("darht", schedule="fast")


def test_reduction_conventions(batch, pretrained_teachers) -> None:
    """ARD, RSLAD and MTARD reproduce reduction='mean' (KL / C); TRADES and KD use batchmean."""
    x, y = batch
    teacher = pretrained_teachers["robust"]
    with torch.no_grad():
        t = teacher(x)
    student = _student("ard", 1)
    student.eval()  # eval mode: the forwards inside step() give the same logits as here
    with torch.no_grad():
        s = student(x)
    c = 4

    ard = create_method("ard", eps=0.05, steps=0)  # no attack: x' = x
    ard.bind({"t": teacher})
    parts = ard.step(student, x, y)
    assert parts["kd"].item() == pytest.approx(900 * kl_divergence(s, t, 30.0).item() / c, rel=1e-4)

    rslad = create_method("rslad", eps=0.05, steps=0)
    rslad.bind({"t": teacher})
    parts = rslad.step(student, x, y)
    assert parts["kl_nat"].item() == pytest.approx(kl_divergence(s, t).item() / c, rel=1e-4)
    assert parts["loss"].item() == pytest.approx(kl_divergence(s, t).item() / c, rel=1e-4)  # 5/6 + 1/6

    kd = create_method("kd", temperature=2.0)
    kd.bind({"t": teacher})
    parts = kd.step(student, x, y)
    assert parts["kd"].item() == pytest.approx(4 * kl_divergence(s, t, 2.0).item(), rel=1e-4)

    trades = create_method("trades", eps=0.05, steps=0)
    parts = trades.step(student, x, y)
    assert parts["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-5)


def test_mtard_adaptive_weights_and_state(batch, pretrained_teachers) -> None:
    x, y = batch
    method = create_method("mtard", eps=0.05, steps=1)
    method.bind(pretrained_teachers)
    method.on_epoch_start(0, 2, 0.1, 0.1)
    student = _student("mtard", 2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    first = method.step(student, x, y)
    assert first["w_nat"].item() == 0.5 and first["w_adv"].item() == 0.5
    assert method.state_dict()["w_nat"] == 0.5  # r_nat = r_adv = 1 on the first batch
    for _ in range(3):
        parts = method.step(student, x, y)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
    state = method.state_dict()
    assert state["w_nat"] != 0.5 and 0 < state["w_nat"] < 1 and state["init_adv"] > 0
    restored = create_method("mtard")
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    method.on_epoch_start(1, 2, 0.01, 0.1)  # LR / 10 -> η / 10
    assert method.eta == pytest.approx(0.0025)


def test_frozen_teachers_stack_logits() -> None:
    teachers = FrozenTeachers({"a": _teacher(0), "b": _teacher(1)})
    x = torch.rand(3, 1, 12, 12)
    out = teachers.logits(x)
    assert out.shape == (3, 2, 4) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out[:, 1], teachers.one("b", x))

"""DARHT's loss against values computed by hand (plain Python math, no torch losses)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import darht_loss, kl_divergence, per_teacher_ce, soft_kl, teacher_weights

# N = 2 samples, K = 2 teachers, C = 3 classes.
LOGITS = [[1.0, 0.5, -0.5], [0.2, -0.3, 0.9]]
FMAP = [[[0.5, 0.1, -0.2], [1.0, -1.0, 0.0]],
        [[-0.4, 0.3, 0.8], [0.0, 0.6, 0.2]]]
TEACHER = [[[2.0, 0.0, -1.0], [0.3, 0.2, 0.1]],
           [[-1.0, 0.5, 1.5], [0.5, 1.5, -0.5]]]
Y = [0, 2]


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(a - m) for a in v]
    s = sum(e)
    return [a / s for a in e]


def _ce(v: list[float], y: int) -> float:
    return -math.log(_softmax(v)[y])


def _kl(p_logits: list[float], q_logits: list[float], tau: float) -> float:
    """KL(softmax(p/τ) || softmax(q/τ)) by the definition."""
    p = _softmax([a / tau for a in p_logits])
    q = _softmax([a / tau for a in q_logits])
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _expected(phase: str, weighting: str, kd: str, tau: float) -> dict[str, object]:
    n, k, c = 2, 2, 3
    ce = sum(_ce(LOGITS[i], Y[i]) for i in range(n)) / n
    t_ce = [sum(_ce(TEACHER[i][j], Y[i]) for i in range(n)) / n for j in range(k)]
    if weighting == "exp_ce":
        w = [math.exp(-v) for v in t_ce]
    elif weighting == "uniform":
        w = [1 / k] * k
    else:
        z = sum(math.exp(-v) for v in t_ce)
        w = [math.exp(-v) / z for v in t_ce]
    if kd == "kl":
        per = [sum(_kl(TEACHER[i][j], FMAP[i][j], tau) for i in range(n)) / n * tau * tau for j in range(k)]
    else:
        per = [sum((FMAP[i][j][m] - TEACHER[i][j][m]) ** 2 for i in range(n) for m in range(c)) / (n * c)
               for j in range(k)]
    kd_value = sum(wj * pj for wj, pj in zip(w, per))
    loss = {"ce": ce, "ce+kd": ce + kd_value, "kd": kd_value}[phase]
    return {"loss": loss, "ce": ce, "kd": kd_value, "w": w, "t_ce": t_ce}


def _tensors(requires_grad: bool = True):
    logits = torch.tensor(LOGITS, dtype=torch.float64, requires_grad=requires_grad)
    fmap = torch.tensor(FMAP, dtype=torch.float64, requires_grad=requires_grad)
    teacher = torch.tensor(TEACHER, dtype=torch.float64, requires_grad=requires_grad)
    return logits, fmap, teacher, torch.tensor(Y)


@pytest.mark.parametrize("phase", ["ce", "ce+kd", "kd"])
@pytest.mark.parametrize("weighting", ["exp_ce", "uniform", "softmax"])
@pytest.mark.parametrize("kd", ["kl", "mse"])
def test_darht_loss_matches_hand_computation(phase: str, weighting: str, kd: str) -> None:
    tau = 2.0
    logits, fmap, teacher, y = _tensors()
    out = darht_loss(logits, fmap, teacher, y, phase=phase, temperature=tau, weighting=weighting, kd=kd)
    exp = _expected(phase, weighting, kd, tau)
    assert set(out) >= {"loss", "ce", "kd", "teacher_weights"}
    assert out["loss"].item() == pytest.approx(exp["loss"], rel=1e-5)
    assert out["ce"].item() == pytest.approx(exp["ce"], rel=1e-5)
    assert out["kd"].item() == pytest.approx(exp["kd"], rel=1e-5)  # reported in every phase
    assert out["teacher_weights"].shape == (2,)
    assert out["teacher_weights"].tolist() == pytest.approx(exp["w"], rel=1e-5)
    assert out["teacher_ce"].tolist() == pytest.approx(exp["t_ce"], rel=1e-5)


def test_exp_ce_weights_are_not_normalized_and_temperature_scales_kd() -> None:
    logits, fmap, teacher, y = _tensors(requires_grad=False)
    w = darht_loss(logits, fmap, teacher, y, weighting="exp_ce")["teacher_weights"]
    assert float(w.sum()) < 1.0  # exp(-CE) of two mediocre teachers: not normalized to 1
    kd1 = darht_loss(logits, fmap, teacher, y, phase="kd", temperature=1.0)["kd"].item()
    kd4 = darht_loss(logits, fmap, teacher, y, phase="kd", temperature=4.0)["kd"].item()
    exp1, exp4 = _expected("kd", "exp_ce", "kl", 1.0)["kd"], _expected("kd", "exp_ce", "kl", 4.0)["kd"]
    assert (kd1, kd4) == (pytest.approx(exp1, rel=1e-5), pytest.approx(exp4, rel=1e-5))


@pytest.mark.parametrize("phase", ["ce+kd", "kd"])
@pytest.mark.parametrize("kd", ["kl", "mse"])
def test_gradients_reach_the_map_not_the_teachers(phase: str, kd: str) -> None:
    logits, fmap, teacher, y = _tensors()
    out = darht_loss(logits, fmap, teacher, y, phase=phase, kd=kd)
    assert not out["teacher_weights"].requires_grad
    out["loss"].backward()
    assert fmap.grad is not None and fmap.grad.abs().sum() > 0
    assert teacher.grad is None  # neither through the KD targets nor through the weights
    if phase == "kd":
        assert logits.grad is None  # CE is reported, not trained on
    else:
        assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_kd_gradient_is_weighted_by_detached_teacher_weights() -> None:
    """d loss / d m_k = w_k * d KL_k / d m_k with w_k a constant: compare with each teacher alone."""
    logits, fmap, teacher, y = _tensors()
    out = darht_loss(logits, fmap, teacher, y, phase="kd", temperature=1.0)
    out["loss"].backward()
    w = out["teacher_weights"]
    for k in range(2):
        m = fmap.detach()[:, k].clone().requires_grad_(True)
        kl_k = kl_divergence(m, teacher.detach()[:, k], 1.0, "batchmean")
        (g,) = torch.autograd.grad(kl_k, m)
        assert torch.allclose(fmap.grad[:, k], w[k] * g, atol=1e-10)


def test_phase_ce_trains_only_the_final_logits() -> None:
    logits, fmap, teacher, y = _tensors()
    out = darht_loss(logits, fmap, teacher, y, phase="ce")
    out["loss"].backward()
    assert fmap.grad is None and teacher.grad is None
    assert out["kd"].item() > 0 and not out["kd"].requires_grad
    # Without map or teachers (teachers skipped in the CE phase), kd is reported as 0.
    bare = darht_loss(logits.detach(), None, None, y, phase="ce")
    assert bare["kd"].item() == 0.0 and bare["teacher_weights"].numel() == 0
    assert bare["loss"].item() == pytest.approx(_expected("ce", "exp_ce", "kl", 1.0)["ce"], rel=1e-6)


def test_invalid_arguments() -> None:
    logits, fmap, teacher, y = _tensors(requires_grad=False)
    with pytest.raises(ValueError, match="phase"):
        darht_loss(logits, fmap, teacher, y, phase="warmup")
    with pytest.raises(ValueError, match="weighting"):
        darht_loss(logits, fmap, teacher, y, weighting="max")
    with pytest.raises(ValueError, match="KD loss"):
        darht_loss(logits, fmap, teacher, y, kd="cosine")
    with pytest.raises(ValueError, match="shapes"):
        darht_loss(logits, fmap[:, :1], teacher, y)
    with pytest.raises(ValueError, match="needs the feature map"):
        darht_loss(logits, None, None, y, phase="kd")


def test_kl_reductions_and_helpers() -> None:
    s, t = torch.tensor(LOGITS), torch.tensor([row[0] for row in TEACHER])
    true_kl = sum(_kl(t[i].tolist(), s[i].tolist(), 3.0) for i in range(2)) / 2
    assert kl_divergence(s, t, 3.0, "batchmean").item() == pytest.approx(true_kl, rel=1e-5)
    assert kl_divergence(s, t, 3.0, "mean").item() == pytest.approx(true_kl / 3, rel=1e-5)  # / classes
    assert soft_kl(s, t, 3.0).item() == pytest.approx(9 * true_kl, rel=1e-5)
    ce = per_teacher_ce(torch.tensor(TEACHER), torch.tensor(Y))
    assert ce.tolist() == pytest.approx(_expected("ce", "exp_ce", "kl", 1.0)["t_ce"], rel=1e-5)
    assert teacher_weights(torch.tensor([0.0, math.log(2)]), "exp_ce").tolist() == pytest.approx([1.0, 0.5])
    assert teacher_weights(torch.tensor([0.0, math.log(2)]), "softmax").tolist() == pytest.approx([2 / 3, 1 / 3])

"""Students: timm backbone + student-teacher feature map, pixel-space normalization, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY_CNN, TINY_VIT
from distill.student import Student, StudentTeacherFeatureMap, build_student, load_student, save_student
from transfer_analysis.errors import UserError


def test_feature_map_shapes_and_composition() -> None:
    torch.manual_seed(0)
    s = build_student("resnet18_cifar", num_classes=4, num_teachers=3, in_chans=1, image_size=12, **TINY_CNN["kwargs"])
    assert isinstance(s.feature_map, StudentTeacherFeatureMap) and s.has_map and s.num_teachers == 3
    # resnet18_cifar with width 4 pools 32 features: Linear(32, K*C) -> Linear(K*C, C)
    assert (s.feature_map.map.in_features, s.feature_map.map.out_features) == (32, 12)
    assert (s.feature_map.classifier.in_features, s.feature_map.classifier.out_features) == (12, 4)
    s.eval()
    x = torch.rand(5, 1, 12, 12)
    logits, fmap = s.forward_with_map(x)
    assert logits.shape == (5, 4) and fmap.shape == (5, 3, 4)
    assert torch.equal(s(x), logits)
    # slice k of the map is columns [k*C, (k+1)*C) of the first linear layer; the second maps it to logits
    feats = s.timm_model(x)
    flat = s.feature_map.map(feats)
    assert torch.allclose(fmap[:, 1], flat[:, 4:8])
    assert torch.allclose(logits, s.feature_map.classifier(flat), atol=1e-6)


def test_plain_student_is_a_timm_classifier() -> None:
    s = build_student("resnet18_cifar", num_classes=4, num_teachers=None, in_chans=1, **TINY_CNN["kwargs"])
    assert not s.has_map and s.num_teachers == 0 and s.feature_map is None
    assert s.timm_model.num_classes == 4
    assert s(torch.rand(2, 1, 12, 12)).shape == (2, 4)
    with pytest.raises(RuntimeError, match="no student-teacher feature map"):
        s.forward_with_map(torch.rand(2, 1, 12, 12))
    assert build_student("resnet18_cifar", 4, 0, in_chans=1, **TINY_CNN["kwargs"]).feature_map is None


def test_normalization_and_resize_happen_inside_forward() -> None:
    torch.manual_seed(0)
    s = build_student("resnet18_cifar", 4, 2, in_chans=1, mean=[0.4], std=[0.2], **TINY_CNN["kwargs"]).eval()
    x = torch.rand(3, 1, 12, 12)
    manual = s.feature_map(s.timm_model((x - 0.4) / 0.2))[0]
    assert torch.allclose(s(x), manual, atol=1e-6)
    assert set(k.split(".")[0] for k in s.state_dict()) == {"backbone", "feature_map"}  # mean/std not persisted
    r = build_student("resnet18_cifar", 4, 2, in_chans=1, input_size=16, **TINY_CNN["kwargs"]).eval()
    assert r(torch.rand(2, 1, 12, 12)).shape == (2, 4)


def test_vit_student_with_fixed_input_size() -> None:
    s = build_student(TINY_VIT["arch"], num_classes=4, num_teachers=2, in_chans=1, image_size=12,
                      **TINY_VIT["kwargs"])
    logits, fmap = s.forward_with_map(torch.rand(2, 1, 12, 12))
    assert fmap.shape == (2, 2, 4) and s.feature_map.num_features == TINY_VIT["kwargs"]["embed_dim"]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = build_student("resnet18_cifar", 4, 2, in_chans=1, image_size=12, mean=[0.5], std=[0.25],
                      **TINY_CNN["kwargs"])
    s.train()
    s(torch.rand(8, 1, 12, 12))  # move the BatchNorm statistics away from their init
    path = save_student(s, tmp_path / "student.safetensors")
    t = load_student(tmp_path)  # a run directory works too
    assert isinstance(t, Student) and not t.training and not any(p.requires_grad for p in t.parameters())
    assert t.spec == s.spec
    x = torch.rand(3, 1, 12, 12)
    assert torch.equal(s.eval()(x), t(x))
    assert torch.equal(s.forward_with_map(x)[1], t.forward_with_map(x)[1])
    assert load_student(path).spec["mean"] == [0.5]


def test_user_errors() -> None:
    with pytest.raises(UserError, match="unknown timm architecture"):
        build_student("resnet_nope", 4, 2)
    with pytest.raises(UserError, match="both mean and std"):
        build_student("resnet18_cifar", 4, 2, mean=[0.5], **TINY_CNN["kwargs"])
    with pytest.raises(UserError, match="bad kwargs|could not build"):
        build_student("resnet18_cifar", 4, 2, no_such_kwarg=1)
    with pytest.raises(UserError, match="not found"):
        load_student("/nonexistent/student.safetensors")

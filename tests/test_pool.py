"""Model pool: schema, pixel-space wrapper, checkpoints (safe and unsafe), errors."""

from __future__ import annotations

import os

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import TINY_CNN, TINY_VIT
from transfer_analysis import load_pool
from transfer_analysis.errors import UserError
from transfer_analysis.models import model_fingerprint


def _cnn(**kw):
    return timm.create_model("resnet18_cifar", num_classes=4, in_chans=1, width=4, **kw).eval()


def test_identity_normalization_gives_exactly_the_plain_timm_logits(tmp_path, write_pool):
    torch.manual_seed(0)
    plain = _cnn()
    save_file(plain.state_dict(), tmp_path / "w.safetensors")
    path = write_pool([{"name": "a", **TINY_CNN, "checkpoint": "w.safetensors"}])
    pool = load_pool(path, num_classes=4, in_chans=1, image_size=12)
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(pool["a"](x), plain(x))
    assert list(pool) == ["a"]
    assert not pool["a"].training and not any(p.requires_grad for p in pool["a"].parameters())


def test_normalization_and_resize_happen_inside_forward(tmp_path, write_pool):
    torch.manual_seed(0)
    plain = _cnn()
    save_file(plain.state_dict(), tmp_path / "w.safetensors")
    path = write_pool([{"name": "a", **TINY_CNN, "checkpoint": "w.safetensors", "input_size": 16,
                        "mean": [0.5], "std": [0.25]}])
    model = load_pool(path, num_classes=4, in_chans=1, image_size=12)["a"]
    x = torch.rand(3, 1, 12, 12)
    expected = plain((F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) - 0.5) / 0.25)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_vit_with_its_own_input_size_works_on_dataset_images(write_pool):
    path = write_pool([{"name": "v", **TINY_VIT, "input_size": 16}])
    model = load_pool(path, num_classes=4, in_chans=1, image_size=12)["v"]
    assert model(torch.rand(2, 1, 12, 12)).shape == (2, 4)
    assert model.input_size == (16, 16)


def test_torch_checkpoint_nested_and_prefixed(tmp_path, write_pool):
    torch.manual_seed(1)
    plain = _cnn()
    nested = {"epoch": 3, "state_dict": {f"module._orig_mod.{k}": v for k, v in plain.state_dict().items()}}
    torch.save(nested, tmp_path / "w.pt")
    model = load_pool(write_pool([{"name": "a", **TINY_CNN, "checkpoint": "w.pt"}]), 4, 1, 12)["a"]
    x = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_mismatched_checkpoint_names_the_keys(tmp_path, write_pool):
    other = timm.create_model("resnet18_cifar", num_classes=7, in_chans=1, width=4)
    state = other.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["stem.0.weight"]
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(UserError) as info:
        load_pool(write_pool([{"name": "a", **TINY_CNN, "checkpoint": "w.safetensors"}]), 4, 1, 12)
    msg = str(info.value)
    assert "head.weight (7, 32) vs model (4, 32)" in msg and "stem.0.weight" in msg and "extra.weight" in msg


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_running_pickle_is_refused_unless_trusted(tmp_path, write_pool):
    plain = _cnn()
    marker = tmp_path / "ran"
    torch.save({"state_dict": plain.state_dict(), "hook": _Payload(str(marker))}, tmp_path / "evil.pt")
    entry = {"name": "a", **TINY_CNN, "checkpoint": "evil.pt"}
    with pytest.raises(UserError, match="trust_checkpoint"):
        load_pool(write_pool([entry]), 4, 1, 12)
    assert not marker.exists()
    load_pool(write_pool([{**entry, "trust_checkpoint": True}]), 4, 1, 12)
    assert marker.exists()


@pytest.mark.parametrize("entries,match", [
    ([{"name": "a", **TINY_CNN}, {"name": "a", **TINY_CNN}], "duplicate model name 'a'"),
    ([{"name": "a", "arch": "resnet18_cifr", "kwargs": {"width": 4}}], "did you mean resnet18_cifar"),
    ([{"name": "a", **TINY_CNN, "chekpoint": "x"}], "did you mean 'checkpoint'"),
    ([{"name": "a", **TINY_CNN, "checkpoint": "missing.safetensors"}], "checkpoint not found"),
    ([{"name": "a", **TINY_CNN, "kwargs": {"width": 4, "num_classes": 9}}], "kwargs sets num_classes=9 but the data has num_classes=4"),
    ([{"name": "a", **TINY_CNN, "mean": [0.1, 0.2, 0.3, 0.4], "std": [1, 1, 1, 1]}], "mean has 4 values but the model takes 1-channel images"),
    ([{"arch": "resnet18_cifar"}], "non-empty string 'name'"),
])
def test_pool_errors(write_pool, entries, match):
    with pytest.raises(UserError, match=match):
        load_pool(write_pool(entries), num_classes=4, in_chans=1, image_size=12)


def test_malformed_yaml_and_missing_file(tmp_path):
    (tmp_path / "p.yaml").write_text("models: [\n  - name: a\n  arch")
    with pytest.raises(UserError, match="not valid YAML"):
        load_pool(tmp_path / "p.yaml", 4, 1, 12)
    (tmp_path / "q.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="'models:'"):
        load_pool(tmp_path / "q.yaml", 4, 1, 12)
    with pytest.raises(UserError, match="pool file not found"):
        load_pool(tmp_path / "none.yaml", 4, 1, 12)


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    (tmp_path / "p.yaml").write_text("models: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_pool(tmp_path / "p.yaml", 4, 1, 12)


def test_pretrained_from_local_file(tmp_path, write_pool):
    """pretrained: true with pretrained_file goes through timm's pretrained_cfg_overlay (no hub)."""
    torch.manual_seed(2)
    ref = timm.create_model("resnet10t").eval()  # the pretrained config's own shape: 3 channels, 1000 classes
    save_file(ref.state_dict(), tmp_path / "r10.safetensors")
    path = write_pool([{"name": "r", "arch": "resnet10t", "pretrained": True, "input_size": 32,
                        "pretrained_file": "r10.safetensors", "mean": [0.0], "std": [1.0]}])
    model = load_pool(path, num_classes=1000, in_chans=3, image_size=32)["r"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert model.weights == "pretrained" and not model.new_head
    # a different class count is refused, unless the entry asks for a new head
    with pytest.raises(UserError, match="pretrained head has 1000 classes but the data has 4; set num_classes: 4"):
        load_pool(path, num_classes=4, in_chans=3, image_size=32)
    asked = write_pool([{"name": "r", "arch": "resnet10t", "pretrained": True, "input_size": 32, "num_classes": 4,
                         "pretrained_file": "r10.safetensors", "mean": [0.0], "std": [1.0]}], name="p4.yaml")
    four = load_pool(asked, num_classes=4, in_chans=3, image_size=32)["r"]
    assert torch.equal(four.model.conv1[0].weight, ref.conv1[0].weight) and four(x).shape == (2, 4)
    assert four.new_head and four.weights == "pretrained"
    missing = write_pool([{"name": "r", "arch": "resnet10t", "pretrained": True, "pretrained_file": "nope.pth"}],
                         name="p2.yaml")
    with pytest.raises(UserError, match="pretrained_file not found"):
        load_pool(missing, 1000, 1, 32)


def test_fingerprint_follows_weights_not_names():
    torch.manual_seed(0)
    a = _cnn()
    b = _cnn()
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.head.bias.add_(1e-3)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_load_pool_subset_in_requested_order(write_pool):
    path = write_pool([{"name": n, **TINY_CNN} for n in ("a", "b", "c")])
    assert list(load_pool(path, 4, 1, 12, names=["c", "a"])) == ["c", "a"]
    with pytest.raises(UserError, match="not in"):
        load_pool(path, 4, 1, 12, names=["zz"])


def test_random_init_depends_on_seed_and_name_only(write_pool):
    path = write_pool([{"name": n, **TINY_CNN} for n in ("a", "b")])
    both = load_pool(path, 4, 1, 12, init_seed=3)
    alone = load_pool(path, 4, 1, 12, names=["b"], init_seed=3)
    assert both["b"].fingerprint == alone["b"].fingerprint != both["a"].fingerprint
    assert load_pool(path, 4, 1, 12, init_seed=4)["b"].fingerprint != both["b"].fingerprint
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    load_pool(path, 4, 1, 12, init_seed=3)
    assert torch.equal(torch.rand(1), before)  # the global RNG is left as it was

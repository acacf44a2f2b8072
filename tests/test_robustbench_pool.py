"""RobustBench zoo models as pool entries, loaded through the toolkit's safe loader.

CI has no RobustBench (an extra installed with --no-deps), so the zoo is stood in for by a module
with its layout (model_dicts[BenchmarkDataset][ThreatModel][name]["model"]); with RobustBench
installed, the last test uses a real zoo architecture."""

from __future__ import annotations

import enum
import sys
import types

import pytest
import torch
import yaml
from torch import nn

from transfer_analysis import load_pool
from transfer_analysis.errors import UserError
from transfer_analysis.models.sources import robustbench_checkpoint_path as checkpoint_path


class _Normalized(nn.Module):
    """A zoo-like model: [0, 1] images in, normalization inside, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mu", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))

    def forward(self, x):
        return self.net(x - self.mu)


@pytest.fixture
def fake_zoo(monkeypatch):
    class BenchmarkDataset(enum.Enum):
        cifar_10 = "cifar10"

    class ThreatModel(enum.Enum):
        Linf = "Linf"

    rb = types.ModuleType("robustbench")
    rb.__path__ = []
    zoo = types.ModuleType("robustbench.model_zoo")
    enums = types.ModuleType("robustbench.model_zoo.enums")
    enums.BenchmarkDataset, enums.ThreatModel = BenchmarkDataset, ThreatModel
    zoo.model_dicts = {BenchmarkDataset.cifar_10: {ThreatModel.Linf: {"Tiny2024Zoo": {"model": _Normalized}}}}
    for name, module in (("robustbench", rb), ("robustbench.model_zoo", zoo), ("robustbench.model_zoo.enums", enums)):
        monkeypatch.setitem(sys.modules, name, module)


def _pool(tmp_path, **rb):
    spec = {"name": "Tiny2024Zoo", "dataset": "cifar10", "threat_model": "Linf", "model_dir": "models", **rb}
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "zoo", "source": "robustbench", "robustbench": spec,
                                                "family": "wrn"}]}))
    return path


def test_zoo_model_through_the_pool_gives_the_zoo_models_logits(tmp_path, fake_zoo):
    torch.manual_seed(0)
    reference = _Normalized().eval()
    ckpt = checkpoint_path({"name": "Tiny2024Zoo", "dataset": "cifar10", "threat_model": "Linf",
                            "model_dir": str(tmp_path / "models")})
    ckpt.parent.mkdir(parents=True)
    # RobustBench's own files: a 'state_dict' with DataParallel's 'module.' prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, ckpt)
    pool = load_pool(_pool(tmp_path), num_classes=10, in_chans=3, image_size=8)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(pool["zoo"](x), reference(x))
    assert pool["zoo"].entry.arch == "robustbench:Tiny2024Zoo" and pool["zoo"].entry.family == "wrn"


def test_missing_zoo_file_names_the_path_and_the_download(tmp_path, fake_zoo):
    with pytest.raises(UserError, match=r"models/cifar10/Linf/Tiny2024Zoo\.pt.*robustbench\.utils\.load_model"):
        load_pool(_pool(tmp_path), num_classes=10, in_chans=3, image_size=8)


def test_a_pickled_zoo_file_needs_trust(tmp_path, fake_zoo):
    ckpt = tmp_path / "models" / "cifar10" / "Linf" / "Tiny2024Zoo.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(_Normalized(), ckpt)  # a whole pickled module, as some old checkpoints are
    with pytest.raises(UserError, match="trust_checkpoint"):
        load_pool(_pool(tmp_path), num_classes=10, in_chans=3, image_size=8)


@pytest.mark.parametrize("entry, match", [
    ({"source": "robustbench"}, "needs 'robustbench:"),
    ({"source": "robustbench", "robustbench": {"name": "x", "dataset": "svhn"}}, "robustbench.dataset"),
    ({"source": "robustbench", "robustbench": {"name": "x", "dataset": "cifar10"}, "kwargs": {"w": 1}},
     "does not apply to a RobustBench model"),
    ({"source": "hub"}, "source must be one of"),
    ({"arch": "resnet18_cifar", "robustbench": {"name": "x", "dataset": "cifar10"}}, "needs source: robustbench"),
])
def test_bad_robustbench_entries(tmp_path, entry, match):
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", **entry}]}))
    with pytest.raises(UserError, match=match):
        load_pool(path, num_classes=10, in_chans=3, image_size=32)


def test_real_zoo_architecture(tmp_path):
    import importlib.util

    if importlib.util.find_spec("robustbench") is None or importlib.util.find_spec("geotorch") is None:
        pytest.skip("RobustBench is not installed (pip install --no-deps robustbench==1.1.1 geotorch torchdiffeq)")
    from transfer_analysis.models.sources import build_zoo_model

    spec = {"name": "Ding2020MMA", "dataset": "cifar10", "threat_model": "Linf", "model_dir": str(tmp_path)}
    torch.manual_seed(0)
    reference = build_zoo_model(spec, load_weights=False).eval()
    ckpt = checkpoint_path(spec)
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": reference.state_dict()}, ckpt)
    pool = load_pool(_pool(tmp_path, name="Ding2020MMA", model_dir=str(tmp_path)), num_classes=10, in_chans=3,
                     image_size=32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pool["zoo"](x), reference(x), atol=1e-6)

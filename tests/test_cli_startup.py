"""The command line answers at once. `darht --help`, every `SUB --help`, refusals that need
no model and a whole `darht recommend` run never import torch (each check in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import sys
from distill.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "timm", "torchattacks", "torchvision") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


def _heavy_modules(argv: list[str], cwd: Path) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, cwd=cwd, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return proc.returncode, [m for m in line[len("HEAVY="):].split(",") if m]


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["matrix", "--help"], 0), (["recommend", "--help"], 0), (["train-teacher", "--help"], 0),
    (["distill", "--help"], 0), (["evaluate", "--help"], 0), (["pipeline", "--help"], 0),
    (["matrix", "--bogus-flag"], 2),
    (["matrix", "--pool", "missing.yaml", "--dataset", "synthetic", "--out", "m"], 2),
    (["distill", "--method", "darht", "--student", "resnet18_cifar", "--dataset", "synthetic", "--pool", "missing.yaml",
      "--teachers", "a", "--out", "r"], 2),
    (["evaluate", "--model", "missing.safetensors", "--arch", "resnet18_cifar", "--dataset", "synthetic",
      "--out", "m.json"], 2),
    (["pipeline", "--config", "missing.yaml"], 2),
    (["recommend", "--matrix", "missing", "--k", "2", "--out", "r.json"], 2),
])
def test_no_torch_for_help_and_refusals(tmp_path, argv, code):
    assert _heavy_modules(argv, tmp_path) == (code, [])


def test_a_whole_recommend_run_imports_no_torch(tmp_path):
    m = tmp_path / "matrix"
    m.mkdir()
    (m / "transfer_matrix.csv").write_text("source,a,b,c\na,1,0.2,0.5\nb,0.3,1,0.1\nc,0.4,0.6,1\n")
    (m / "models.csv").write_text("model,clean_acc,whitebox_robust_acc,params,family,arch\n"
                                  "a,0.9,0.5,10,cnn,x\nb,0.8,0.4,10,vit,y\nc,0.7,0.3,10,mlp,z\n")
    code, heavy = _heavy_modules(["recommend", "--matrix", str(m), "--k", "2", "--out", "rec.json"], tmp_path)
    assert (code, heavy) == (0, [])
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["sets"][0]["teachers"] == ["a", "b"] and (tmp_path / "rec.png").is_file()
    # k larger than the pool: a refusal, still without torch
    assert _heavy_modules(["recommend", "--matrix", str(m), "--k", "5", "--out", "r2.json"], tmp_path) == (2, [])


def test_a_missing_matrix_is_refused_before_pandas_loads(tmp_path):
    probe = _PROBE.replace('("torch", "timm", "torchattacks", "torchvision")', '("pandas", "networkx", "torch")')
    proc = subprocess.run([sys.executable, "-c", probe, "recommend", "--matrix", "missing", "--k", "2", "--out",
                           "r.json"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "transfer matrix not found: missing" in proc.stderr
    assert [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY=")][-1] == "HEAVY="

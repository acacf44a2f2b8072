"""An output is never one of the inputs, whatever --force says: one line, exit 2, every input unchanged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from distill.cli import main

POOL = {"models": [{"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 2}} for n in ("a", "b")]}
DATA = "synthetic:num_classes=2,in_chans=1,image_size=8,n_train=8,n_test=8"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(POOL))
    m = tmp_path / "m"
    m.mkdir()
    (m / "transfer_matrix.csv").write_text("source,a,b\na,1.0,0.2\nb,0.3,1.0\n")
    (m / "models.csv").write_text("model,clean_acc,whitebox_robust_acc,params\na,0.9,0.5,10\nb,0.8,0.4,10\n")
    (tmp_path / "run.yaml").write_text("epochs: 1\n")
    (tmp_path / "study.yaml").write_text("study: s\n")
    return tmp_path


CASES = [
    ("recommend-out-is-the-matrix", ["recommend", "--matrix", "m", "--k", "2", "--out", "m/transfer_matrix.csv",
                                     "--force"], "--out m/transfer_matrix.csv is also an input (--matrix)"),
    ("matrix-cache-is-the-pool", ["matrix", "--pool", "pool.yaml", "--dataset", DATA, "--out", "o", "--cache",
                                  "pool.yaml"], "--cache pool.yaml is also an input (--pool)"),
    ("matrix-out-holds-the-pool", ["matrix", "--pool", "pool.yaml", "--dataset", DATA, "--out", ".", "--force"],
     "--out . holds an input"),
    ("distill-out-holds-its-config", ["distill", "--method", "pgd-at", "--student", "resnet18_cifar", "--dataset",
                                      DATA, "--config", "run.yaml", "--out", ".", "--force"], "holds an input"),
    ("evaluate-out-is-the-pool", ["evaluate", "--pool", "pool.yaml", "--name", "a", "--dataset", DATA, "--out",
                                  "pool.yaml", "--force"], "--out pool.yaml is also an input (--pool)"),
    ("pipeline-out-holds-its-config", ["pipeline", "--config", "study.yaml", "--out", ".", "--force"],
     "holds an input"),
]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("argv,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_an_output_that_is_an_input_is_refused(files, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(files)
    before = _digest(files)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and match in err[0] and "even with --force" in err[0], err
    assert _digest(files) == before


def test_a_new_file_beside_an_input_is_fine(files, monkeypatch, capsys):
    monkeypatch.chdir(files)
    assert main(["recommend", "--matrix", "m", "--k", "2", "--out", "m/rec.json", "--no-plot"]) == 0
    assert (files / "m" / "rec.json").is_file()

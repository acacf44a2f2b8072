"""The prepared GPU check runs end to end on the CPU with --dry-run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--dry-run"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gpu_check: ok device=cpu_(dry_run)")
    for step in ("amp_s=", "distill_s=", "matrix_s=", "autoattack_s=", "nccl_s=", "total_s="):
        assert step in last, last
    assert module.main([]) in (0, 1)  # without a GPU: one line saying so, exit 1
    assert "no CUDA device" in capsys.readouterr().out or __import__("torch").cuda.is_available()

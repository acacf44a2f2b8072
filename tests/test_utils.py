"""Shared plumbing: ε parsing, atomic writes, safe loading, RNG state, run directories, devices."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from transfer_analysis.errors import UserError
from transfer_analysis.utils import (
    atomic_torch_save,
    atomic_write,
    format_eps,
    parse_eps,
    prepare_out_dir,
    resolve_device,
    rng_state,
    safe_torch_load,
    seed_everything,
    set_rng_state,
)


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.1", 0.1), ("0", 0.0), (" 2 / 255 ", 2 / 255),
                                        ("1e-2", 0.01), (0.25, 0.25), (1, 1.0), ("16/255", 16 / 255)])
def test_parse_eps_values(text, value):
    assert parse_eps(text) == value


@pytest.mark.parametrize("text", ["-0.1", "abc", "8/0", "nan", "inf", "", "1/2/3", True, float("nan"), -1, 3, "8"])
def test_parse_eps_rejects(text):
    with pytest.raises(UserError) as info:
        parse_eps(text)
    assert "\n" not in str(info.value)


def test_format_eps_gives_both_readings():
    assert format_eps(8 / 255) == "0.031373 (8/255)"
    assert format_eps(0.1) == "0.1"


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as fh:
            fh.write("new but half")
            raise RuntimeError("crash in the middle")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


class _Payload:
    """A pickle that creates a directory when unpickled: proof of code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, fh)
    with pytest.raises(UserError, match="trust"):
        safe_torch_load(path)
    assert not marker.exists()
    # The explicit opt-in does unpickle (and so runs the payload): that is what trusting means.
    safe_torch_load(path, trust=True)
    assert marker.exists()


def test_truncated_torch_file_is_a_user_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.arange(1000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        safe_torch_load(path)


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    seed_everything(123)
    random.gauss(0, 1)  # leaves a cached second normal value in Python's RNG state
    state = rng_state()
    atomic_torch_save({"rng": state}, tmp_path / "s.pt")
    expected = (random.gauss(0, 1), float(np.random.rand()), torch.rand(3))
    seed_everything(999)
    set_rng_state(safe_torch_load(tmp_path / "s.pt")["rng"])
    got = (random.gauss(0, 1), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_prepare_out_dir_refuses_to_clobber(tmp_path):
    out = tmp_path / "run"
    prepare_out_dir(out)
    (out / "config.yaml").write_text("a: 1\n")
    with pytest.raises(UserError, match="`resume`"):
        prepare_out_dir(out)
    assert prepare_out_dir(out, resume=True) == out and (out / "config.yaml").exists()
    prepare_out_dir(out, force=True)
    assert out.is_dir() and not (out / "config.yaml").exists()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            resolve_device("cuda")


def test_pickle_module_unused_by_safe_load(monkeypatch, tmp_path):
    """A plain state dict loads without ever calling the unrestricted unpickler."""
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(pickle, "Unpickler", None)  # would crash if used
    assert torch.equal(safe_torch_load(path)["w"], torch.ones(2))

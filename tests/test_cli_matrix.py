"""`darht matrix` end to end on tiny models: the four files, the cache across runs, user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distill.cli import main
from conftest import TINY_CNN, TINY_VIT
from transfer_analysis import balanced_subset, load_dataset

DATASET = "synthetic:num_classes=4,in_chans=1,image_size=12,n_train=512,n_test=128"
FAST = ["--dataset", DATASET, "--n-samples", "24", "--eps", "0.1", "--steps", "2", "--batch-size", "16",
        "--device", "cpu", "--log-level", "WARNING"]


@pytest.fixture
def pool_file(write_pool) -> Path:
    return write_pool([{"name": "cnn_a", **TINY_CNN}, {"name": "cnn_b", **TINY_CNN}, {"name": "vit", **TINY_VIT}])


def matrix(pool: Path, out: Path, *extra: str) -> int:
    return main(["matrix", "--pool", str(pool), *FAST, "--out", str(out), *extra])


def test_writes_the_four_files(pool_file, tmp_path):
    out = tmp_path / "run"
    assert matrix(pool_file, out) == 0
    long = pd.read_csv(out / "transfer_long.csv")
    assert list(long.columns) == ["source", "target", "attack", "eps", "metric", "value", "n", "ci_low", "ci_high"]
    assert len(long) == 2 * 3 * 3 and set(long.metric) == {"transfer_rate", "target_error"}
    assert set(long.attack) == {"pgd"} and set(long.eps) == {0.1}
    assert long.n.dtype.kind == "i" and long.value.dtype.kind == "f"
    mat = pd.read_csv(out / "transfer_matrix.csv")
    assert list(mat.columns) == ["source", "cnn_a", "cnn_b", "vit"] and list(mat.source) == ["cnn_a", "cnn_b", "vit"]
    tr = long[long.metric == "transfer_rate"].pivot(index="source", columns="target", values="value")
    assert (tr.loc[mat.source, mat.columns[1:]].to_numpy() == mat.iloc[:, 1:].to_numpy())[tr.notna().to_numpy()].all()
    models = pd.read_csv(out / "models.csv")
    assert list(models.columns) == ["model", "clean_acc", "whitebox_robust_acc", "params", "family", "arch", "weights",
                                    "new_head"]
    assert set(models["weights"]) == {"random"} and not models["new_head"].any()  # never mistaken for a result
    assert models.family.tolist() == ["cnn", "cnn", "vit"]
    assert models.clean_acc.between(0, 1).all() and models.whitebox_robust_acc.between(0, 1).all()
    assert (out / "transfer_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    # the evaluation subset, the resolved config and the environment
    ds = load_dataset(DATASET)
    saved = json.loads((out / "indices.json").read_text())
    assert saved["n"] == 24 and saved["indices"] == balanced_subset(ds.y_test, 24, seed=0).tolist()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["command"] == "matrix" and config["attack"] == {
        "name": "pgd", "eps": 0.1, "steps": 2, "step_size": 0.025, "random_start": True, "kwargs": {}}
    assert [m["name"] for m in config["models"]] == ["cnn_a", "cnn_b", "vit"]
    assert "packages" in json.loads((out / "env.json").read_text())
    # re-running reuses the cache and writes the same numbers
    adv = sorted((out / "cache" / "adv").iterdir())
    stamps = [p.stat().st_mtime_ns for p in adv]
    before = {f: (out / f).read_bytes() for f in ("transfer_long.csv", "transfer_matrix.csv", "models.csv")}
    assert matrix(pool_file, out) == 0
    assert [p.stat().st_mtime_ns for p in sorted((out / "cache" / "adv").iterdir())] == stamps
    assert {f: (out / f).read_bytes() for f in before} == before


def test_subset_then_whole_pool_shares_a_cache(pool_file, tmp_path):
    cache = tmp_path / "shared-cache"
    assert matrix(pool_file, tmp_path / "sub", "--models", "vit,cnn_a", "--cache", str(cache)) == 0
    sub = pd.read_csv(tmp_path / "sub" / "transfer_matrix.csv")
    assert list(sub.columns) == ["source", "cnn_a", "vit"]  # pool order
    assert len(list((cache / "adv").iterdir())) == 2
    assert matrix(pool_file, tmp_path / "all", "--cache", str(cache)) == 0
    assert len(list((cache / "adv").iterdir())) == 3  # only cnn_b was attacked
    assert matrix(pool_file, tmp_path / "fresh") == 0
    for f in ("transfer_long.csv", "transfer_matrix.csv", "models.csv"):
        assert (tmp_path / "all" / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes()


def _one_line_error(capsys, start: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(start), err
    return lines[0]


def test_unknown_attack_is_one_line_exit_2(pool_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert matrix(pool_file, out, "--attack", "pgdd") == 2
    line = _one_line_error(capsys, "darht matrix: error: unknown attack 'pgdd'; did you mean pgd")
    assert "Traceback" not in line
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--eps", "8/0"], "divides by zero"),
    (["--attack-kwargs", "{bad"], "--attack-kwargs is not valid JSON"),
    (["--attack", "mifgsm", "--attack-kwargs", '{"decy": 1}'], "takes no argument 'decy'"),
    (["--models", "cnn_a,nope"], "nope not in"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_user_errors(pool_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert matrix(pool_file, out, *extra) == 2
    assert message in _one_line_error(capsys, "darht matrix: error:")
    assert not out.exists()


def test_class_count_mismatch_is_a_user_error(write_pool, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    import transfer_analysis.models.archs  # noqa: F401

    ten = timm.create_model(TINY_CNN["arch"], num_classes=10, in_chans=1, **TINY_CNN["kwargs"])
    save_file(ten.state_dict(), str(tmp_path / "ten.safetensors"))
    pool = write_pool([{"name": "ten", **TINY_CNN, "checkpoint": "ten.safetensors"}])
    out = tmp_path / "run"
    assert matrix(pool, out) == 2
    assert "ten" in _one_line_error(capsys, "darht matrix: error:")
    assert not out.exists()


def test_refuses_another_commands_run_dir(pool_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("command: distill\n")
    assert matrix(pool_file, out) == 2
    assert "another run" in _one_line_error(capsys, "darht matrix: error:")


def test_sharded_array_tasks_then_one_assembling_run(pool_file, tmp_path, monkeypatch):
    """--shard I/N attacks only its sources into the shared cache; the run without --shard
    over that cache attacks nothing and writes the same tables as an unsharded run."""
    import transfer_analysis.matrix.engine as engine

    cache = tmp_path / "cache"
    for i in range(2):
        assert matrix(pool_file, tmp_path / "m", "--cache", str(cache), "--shard", f"{i}/2") == 0
    assert not (tmp_path / "m" / "transfer_matrix.csv").exists()
    shards = [json.loads((tmp_path / "m" / "shards" / f"{i}-of-2.json").read_text())["sources"] for i in range(2)]
    assert shards == [["cnn_a", "vit"], ["cnn_b"]]
    attacked = []
    real = engine._attack_source
    monkeypatch.setattr(engine, "_attack_source", lambda *a, **k: attacked.append(a[-1]) or real(*a, **k))
    assert matrix(pool_file, tmp_path / "m", "--cache", str(cache)) == 0
    assert attacked == []  # assembled from the shards' cache entries alone
    assert matrix(pool_file, tmp_path / "ref") == 0  # a fresh unsharded run, its own cache
    assert sorted(attacked) == ["cnn_a", "cnn_b", "vit"]
    for name in ("transfer_matrix.csv", "transfer_long.csv", "models.csv"):
        assert (tmp_path / "m" / name).read_text() == (tmp_path / "ref" / name).read_text(), name


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "-1/3"])
def test_bad_shard_is_one_line(pool_file, tmp_path, capsys, bad):
    assert matrix(pool_file, tmp_path / "m", f"--shard={bad}") == 2
    assert "--shard must be I/N" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_heatmap_shows_white_box_success_on_the_diagonal(pool_file, tmp_path, monkeypatch):
    import numpy as np

    import transfer_analysis.plots as plots

    seen = {}
    real = plots.plot_heatmap
    monkeypatch.setattr(plots, "plot_heatmap", lambda m, p, **k: seen.update(k) or real(m, p, **k))
    assert matrix(pool_file, tmp_path / "m") == 0
    long = pd.read_csv(tmp_path / "m" / "transfer_long.csv")
    wb = long[(long.metric == "target_error") & (long.source == long.target)].set_index("source")["value"]
    assert np.allclose(seen["diagonal"], wb.loc[["cnn_a", "cnn_b", "vit"]].to_numpy(), equal_nan=True)
    with pytest.raises(ValueError, match="diagonal needs 2 values"):
        real(pd.DataFrame([[1.0, 0.2], [0.3, 1.0]]), tmp_path / "h.png", diagonal=[0.5])

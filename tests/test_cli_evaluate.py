"""`darht evaluate`: model lookup (pool, weights + arch, weights + entry, run directory), metrics.json, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from distill.cli import main
from conftest import TINY_CNN
from transfer_analysis import load_dataset, load_pool
from transfer_analysis.data import balanced_subset

DATASET = "synthetic:num_classes=4,in_chans=1,image_size=12,n_train=64,n_test=40"


@pytest.fixture
def weights(tmp_path):
    """A tiny random CNN's weights (and the model itself, for expected values)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18_cifar", num_classes=4, in_chans=1, width=4).eval()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), path)
    return path, model


def _subset(n: int, seed: int = 0):
    ds = load_dataset(DATASET)
    idx = balanced_subset(ds.y_test, n, seed=seed)
    return ds.images("test", idx), ds.labels("test", idx), idx


def _clean_acc(model, n: int = 16, seed: int = 0) -> float:
    x, y, _ = _subset(n, seed)
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum()) / len(y)


def _evaluate(*argv: str) -> int:
    return main(["evaluate", "--device", "cpu", "--dataset", DATASET, "--no-eps-sweep", *argv])


def test_pool_model_writes_metrics_json_with_the_contract_keys(tmp_path, weights, write_pool):
    path, model = weights
    pool = write_pool([{"name": "a", **TINY_CNN, "checkpoint": str(path)}, {"name": "b", **TINY_CNN}])
    out = tmp_path / "res" / "metrics.json"
    attacks = ["clean", "fgsm", "pgd5", "cw5", "transfer:b"]
    rc = _evaluate("--pool", str(pool), "--name", "a", "--attacks", ",".join(attacks), "--n-samples", "8",
                   "--eps", "8/255", "--out", str(out))
    assert rc == 0
    m = json.loads(out.read_text())
    assert {"n", "eps", "accuracy", "worst_case", "flags", "settings"} <= set(m)
    assert m["n"] == 8 and m["eps"] == pytest.approx(8 / 255) and isinstance(m["eps"], float)
    assert list(m["accuracy"]) == attacks
    for value in [*m["accuracy"].values(), m["worst_case"]]:
        assert isinstance(value, float) and 0 <= value <= 1
    assert m["worst_case"] <= min(m["accuracy"].values())
    assert isinstance(m["flags"], list) and all(isinstance(f, str) for f in m["flags"])
    assert m["settings"]["dataset"] == DATASET and m["settings"]["attack_settings"]["transfer:b"]["source"] == "b"
    assert m["accuracy"]["clean"] == _clean_acc(model, n=8)
    saved = json.loads((tmp_path / "res" / "metrics.indices.json").read_text())
    _, y, idx = _subset(8)
    assert saved["indices"] == idx.tolist() and torch.bincount(y).tolist() == [2, 2, 2, 2]


def test_weights_with_arch_and_saved_indices(tmp_path, weights):
    path, model = weights
    out = tmp_path / "m.json"
    rc = _evaluate("--model", str(path), "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
                   "--attacks", "clean", "--n-samples", "16", "--seed", "3", "--out", str(out))
    assert rc == 0
    assert json.loads(out.read_text())["accuracy"]["clean"] == _clean_acc(model, seed=3)
    # the saved subset is reused as is, whatever --n-samples and --seed say
    again = tmp_path / "again.json"
    rc = _evaluate("--model", str(path), "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
                   "--attacks", "clean", "--indices", str(tmp_path / "m.indices.json"), "--out", str(again))
    assert rc == 0
    assert json.loads(again.read_text())["accuracy"] == json.loads(out.read_text())["accuracy"]
    assert json.loads((tmp_path / "again.indices.json").read_text())["indices"] == \
        json.loads((tmp_path / "m.indices.json").read_text())["indices"]


def test_attack_samples_limit_one_attack(tmp_path, weights):
    path, _ = weights
    out = tmp_path / "m.json"
    rc = _evaluate("--model", str(path), "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
                   "--attacks", "clean,fgsm,pgd5", "--attack-samples", "PGD5=8", "--n-samples", "16", "--out", str(out))
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["n_per_attack"] == {"clean": 16, "fgsm": 16, "pgd5": 8} and m["worst_case_n"] == 8
    assert m["settings"]["attack_samples"] == {"pgd5": 8}


@pytest.mark.parametrize("layout", ["pool file", "entry list"])
def test_weights_with_the_pool_entry_beside_them(tmp_path, weights, layout):
    path, _ = weights
    entry = {"name": "teacher", **TINY_CNN, "checkpoint": path.name, "mean": [0.5], "std": [0.25],
             "training": "pgd-at", "notes": "written by train-teacher"}
    beside = {"models": [entry]} if layout == "pool file" else [entry]
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(beside))
    out = tmp_path / "m.json"
    assert _evaluate("--model", str(path), "--attacks", "clean,fgsm", "--n-samples", "16", "--out", str(out)) == 0
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    expected = load_pool(tmp_path / "pool.yaml", num_classes=4, in_chans=1, image_size=12)["teacher"]
    assert json.loads(out.read_text())["accuracy"]["clean"] == _clean_acc(expected)


def test_run_directory_student(tmp_path):
    student_mod = pytest.importorskip("distill.student")
    torch.manual_seed(0)
    student = student_mod.build_student("resnet18_cifar", 4, 2, in_chans=1, image_size=12, mean=[0.4], std=[0.3],
                                        width=4).eval()
    run = tmp_path / "run"
    run.mkdir()
    student_mod.save_student(student, run / "student.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"student": "resnet18_cifar", "student_kwargs": {"width": 4},
                                                     "method": "darht", "num_teachers": 2}))
    out = tmp_path / "m.json"
    assert _evaluate("--model", str(run), "--attacks", "clean,pgd5", "--n-samples", "16", "--out", str(out)) == 0
    assert json.loads(out.read_text())["accuracy"]["clean"] == _clean_acc(student)


def test_run_directory_without_metadata_uses_config_yaml(tmp_path):
    student_mod = pytest.importorskip("distill.student")
    torch.manual_seed(1)
    student = student_mod.build_student("resnet18_cifar", 4, 3, in_chans=1, width=4).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_file(student.state_dict(), run / "student.safetensors")  # plain weights, no spec in the metadata
    (run / "config.yaml").write_text(yaml.safe_dump({"student": "resnet18_cifar", "student_kwargs": {"width": 4},
                                                     "method": "darht", "num_teachers": 3}))
    out = tmp_path / "m.json"
    assert _evaluate("--model", str(run), "--attacks", "clean", "--n-samples", "16", "--out", str(out)) == 0
    assert json.loads(out.read_text())["accuracy"]["clean"] == _clean_acc(student)


@pytest.mark.parametrize("extra, message", [
    (["--attacks", "clean,pgd-20"], "unknown attack 'pgd-20'; valid: clean, fgsm"),
    (["--eps", "-0.1"], "--eps must be"),
    (["--eps", "eight"], "--eps must be a number or a fraction"),
    (["--attacks", "clean,transfer:b"], "needs --pool"),
    (["--n-samples", "0"], "--n-samples (the number of images) must be a positive"),
    (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--model-kwargs", "{bad"], "--model-kwargs is not valid JSON"),
    (["--name", "a"], "give --pool"),
    (["--attack-samples", "autoattack"], "--attack-samples takes ATTACK=N"),
    (["--attack-samples", "pgd20=8"], "'pgd20', which is not among the attacks run"),
])
def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, weights, capsys, extra, message):
    path, _ = weights
    out = tmp_path / "m.json"
    rc = _evaluate("--model", str(path), "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
                   "--attacks", "clean", "--n-samples", "8", "--out", str(out), *extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("darht evaluate: error:") and message in err, err
    assert not out.exists() and not (tmp_path / "m.indices.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "missing.safetensors"], "not found"),
    (["--model", "{w}"], "needs --arch (and --model-kwargs)"),
    (["--model", "{w}", "--arch", "resnet18_cifar"], "does not fit the model"),
    (["--model", "{w}", "--pool", "{pool}", "--name", "a"], "not both"),
    (["--pool", "{pool}", "--name", "zz"], "not in"),
    (["--pool", "{pool}", "--name", "a", "--attacks", "transfer:zz"], "not in"),
    ([], "nothing to evaluate"),
])
def test_bad_model_sources_exit_2(tmp_path, weights, write_pool, capsys, args, message):
    path, _ = weights
    pool = write_pool([{"name": "a", **TINY_CNN, "checkpoint": str(path)}])
    args = [a.format(w=path, pool=pool) for a in args]
    out = tmp_path / "m.json"
    rc = _evaluate(*args, "--n-samples", "8", "--out", str(out))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from distill.cli import main; raise SystemExit(main())", "evaluate", "--dataset", DATASET, "--model",
                           str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr


def test_autoattack_also_writes_a_robustbench_model_info(tmp_path, weights):
    """With standard AutoAttack, <stem>.robustbench.json in RobustBench's model_info shape;
    its clean accuracy is on the AutoAttack images (here a nested 8 of 16)."""
    from distill.robustbench import MODEL_INFO_FIELDS

    path, _ = weights
    out = tmp_path / "m.json"
    rc = _evaluate("--model", str(path), "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
                   "--attacks", "clean,autoattack", "--attack-samples", "autoattack=8", "--n-samples", "16",
                   "--eps", "8/255", "--out", str(out))
    assert rc == 0
    m = json.loads(out.read_text())
    info = json.loads((tmp_path / "m.robustbench.json").read_text())
    assert list(info)[:len(MODEL_INFO_FIELDS)] == list(MODEL_INFO_FIELDS)
    assert info["eps"] == "8/255" and info["dataset"] == DATASET and info["architecture"] == "resnet18_cifar"
    assert info["threat_model"] == "Linf" and info["n_examples"] == 8
    assert info["autoattack_acc"] == f"{100 * m['accuracy']['autoattack']:.2f}"
    assert info["clean_acc"] == f"{100 * m['diagnostics']['subsets']['accuracy_common']['clean']:.2f}"
    # the side file is claimed like the others: a second run without --force is refused
    assert _evaluate("--model", str(path), "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
                     "--attacks", "clean,autoattack", "--n-samples", "16", "--out", str(tmp_path / "m2.json")) == 0
    (tmp_path / "m3.robustbench.json").write_text("earlier")
    assert _evaluate("--model", str(path), "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
                     "--attacks", "clean,autoattack", "--n-samples", "16", "--out", str(tmp_path / "m3.json")) == 2
    assert (tmp_path / "m3.robustbench.json").read_text() == "earlier"


def test_killed_evaluate_resumes_with_resume_to_identical_metrics(tmp_path, weights, capsys, monkeypatch):
    """An interrupted darht evaluate leaves no --out, only its state; --resume finishes it with
    the metrics of an uninterrupted run; without --resume the state is not silently dropped."""
    import distill.evaluation.evaluate as ev  # where evaluate_robustness looks _attack_correct up

    path, _ = weights
    base = ["--model", str(path), "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
            "--attacks", "clean,fgsm,pgd5,cw5", "--n-samples", "16"]
    assert _evaluate(*base, "--out", str(tmp_path / "ref.json")) == 0
    real = ev._attack_correct

    def killed_at_cw(model, x, y, clean, name, *a, **k):
        if name == "cw5":
            raise KeyboardInterrupt
        return real(model, x, y, clean, name, *a, **k)

    monkeypatch.setattr(ev, "_attack_correct", killed_at_cw)
    out = tmp_path / "m.json"
    assert _evaluate(*base, "--out", str(out)) == 130
    assert not out.exists() and (tmp_path / "m.state.pt").is_file()
    monkeypatch.setattr(ev, "_attack_correct", real)
    capsys.readouterr()
    assert _evaluate(*base, "--out", str(out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert _evaluate(*base, "--out", str(out), "--resume") == 0
    assert not (tmp_path / "m.state.pt").exists()
    got, ref = json.loads(out.read_text()), json.loads((tmp_path / "ref.json").read_text())
    assert got["accuracy"] == ref["accuracy"] and got["worst_case"] == ref["worst_case"] and got["flags"] == ref["flags"]
    assert _evaluate(*base, "--out", str(out), "--resume") == 2  # complete: nothing to resume
    assert "nothing to resume" in capsys.readouterr().err

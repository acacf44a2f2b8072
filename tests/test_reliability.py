"""Reliability: bad input, no clobbering, unsafe files, numerical faults, interruptions.

Every user mistake ends with exit code 2 and one stderr line ``darht <cmd>: error: ...``, no
traceback and no output left behind. Interrupted runs (SIGKILL, SIGTERM) resume to exactly the
result of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_CNN
from distill.cli import main
from transfer_analysis.errors import UserError

DATA = "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=64,n_test=32"
CPU = ["--device", "cpu"]
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# inputs shared by the table
# --------------------------------------------------------------------------------------------
def _tiny_weights(path: Path, width: int = 4, num_classes: int = 4) -> Path:
    from safetensors.torch import save_file

    from transfer_analysis.models import create_timm_model

    net = create_timm_model("resnet18_cifar", num_classes=num_classes, in_chans=1, width=width)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _pool(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return path


class _Evil:
    """Unpickling this runs code: a checkpoint holding it must never load without opt-in."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    w4 = _tiny_weights(d / "w4.safetensors")
    w8 = _tiny_weights(d / "w8.safetensors", width=8)
    evil = d / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Evil()}, evil)
    f: dict[str, Path] = {"d": d, "w4": w4, "w8": w8, "evil": evil}
    f["pool"] = _pool(d / "pool.yaml", [{"name": "a", **TINY_CNN}, {"name": "b", **TINY_CNN}])
    f["dup"] = _pool(d / "dup.yaml", [{"name": "a", **TINY_CNN}, {"name": "a", **TINY_CNN}])
    f["typo"] = _pool(d / "typo.yaml", [{"name": "a", **TINY_CNN, "arch": "resnet18_cifr"}, {"name": "b", **TINY_CNN}])
    f["nockpt"] = _pool(d / "nockpt.yaml", [{"name": "a", **TINY_CNN, "checkpoint": str(d / "gone.safetensors")},
                                            {"name": "b", **TINY_CNN}])
    f["shape"] = _pool(d / "shape.yaml", [{"name": "a", **TINY_CNN, "checkpoint": str(w8)}, {"name": "b", **TINY_CNN}])
    f["evilpool"] = _pool(d / "evilpool.yaml", [{"name": "a", **TINY_CNN, "checkpoint": str(evil)},
                                                {"name": "b", **TINY_CNN}])
    (d / "broken.yaml").write_text("models: [\n  - name: a\n")
    f["broken"] = d / "broken.yaml"
    (d / "notpool.yaml").write_text("- just\n- a list\n")
    f["notpool"] = d / "notpool.yaml"
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(20, 8, 8), dtype=np.uint8)
    lab = rng.integers(0, 4, size=20)
    np.savez(d / "mismatch.npz", x_train=img, y_train=lab[:10], x_test=img, y_test=lab)
    np.savez(d / "float.npz", x_train=img.astype(np.float64) / 255, y_train=lab, x_test=img, y_test=lab)
    np.savez(d / "nokeys.npz", x=img, y=lab)
    f["mismatch"], f["float"], f["nokeys"] = d / "mismatch.npz", d / "float.npz", d / "nokeys.npz"
    mdir = d / "matrix"
    mdir.mkdir()
    (mdir / "transfer_matrix.csv").write_text("source,a,b,c\na,1.0,0.2,0.3\nb,0.1,1.0,0.4\nc,0.5,0.6,1.0\n")
    (d / "bad_matrix.csv").write_text("source,a,b\na,1.0,zero\nb,0.1\n")
    f["mdir"], f["badcsv"] = mdir, d / "bad_matrix.csv"
    f["empty"] = d / "empty_root"
    f["empty"].mkdir()
    return f


_MATRIX = ["matrix", "--pool", "{pool}", "--dataset", DATA, "--n-samples", "8", "--steps", "1", *CPU]
_DISTILL = ["distill", "--method", "darht", "--student", "resnet18_cifar", "--student-kwargs", '{"width": 4}',
            "--pool", "{pool}", "--teachers", "a,b", "--dataset", DATA, "--epochs", "1", *CPU]
_EVAL = ["evaluate", "--model", "{w4}", "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
         "--dataset", DATA, "--attacks", "clean", "--n-samples", "8", *CPU]
_TEACHER = ["train-teacher", "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}', "--dataset", DATA,
            "--epochs", "1", "--batch-size", "32", *CPU]
_REC = ["recommend", "--matrix", "{mdir}", "--k", "2"]


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def _fill(arg: str, files: dict[str, Path]) -> str:
    """Replace ``{name}`` by the path of that input (JSON braces are left alone)."""
    for key, path in files.items():
        arg = arg.replace("{" + key + "}", str(path))
    return arg


# (id, argv without --out, out name, words the message must contain)
CASES = [
    # pool files
    ("missing-yaml", _replace(_MATRIX, "--pool", "{d}/nope.yaml"), "m", "not found"),
    ("malformed-yaml", _replace(_MATRIX, "--pool", "{broken}"), "m", "YAML"),
    ("pool-not-a-mapping", _replace(_MATRIX, "--pool", "{notpool}"), "m", "models"),
    ("duplicate-names", _replace(_MATRIX, "--pool", "{dup}"), "m", "'a'"),
    ("unknown-arch", _replace(_MATRIX, "--pool", "{typo}"), "m", "did you mean resnet18_cifar"),
    ("unknown-arch-teacher", _replace(_TEACHER, "--arch", "resnet18_cifr"), "t.safetensors", "did you mean"),
    ("missing-checkpoint", _replace(_MATRIX, "--pool", "{nockpt}"), "m", "gone.safetensors"),
    ("checkpoint-wrong-shape", _replace(_MATRIX, "--pool", "{shape}"), "m", "shape mismatch"),
    ("untrusted-pickle-pool", _replace(_MATRIX, "--pool", "{evilpool}"), "m", "trust_checkpoint"),
    ("untrusted-pickle-evaluate", _replace(_EVAL, "--model", "{evil}"), "m.json", "--trust-checkpoint"),
    ("missing-model", _replace(_EVAL, "--model", "{d}/gone.safetensors"), "m.json", "not found"),
    ("model-classes-vs-data", _replace(_EVAL, "--dataset", DATA.replace("num_classes=4", "num_classes=3")),
     "m.json", "trained for 4 classes but the data has 3"),
    # data
    ("npz-mismatched", _replace(_MATRIX, "--dataset", "{mismatch}"), "m", "y_train"),
    ("npz-wrong-dtype", _replace(_MATRIX, "--dataset", "{float}"), "m", "uint8"),
    ("npz-missing-keys", _replace(_MATRIX, "--dataset", "{nokeys}"), "m", "x_train"),
    ("unknown-dataset", _replace(_MATRIX, "--dataset", "cifar11"), "m", "cifar10"),
    ("offline-no-download", [*_replace(_MATRIX, "--dataset", "cifar10"), "--data-root", "{empty}",
                             "--no-download"], "m", "download"),
    ("n-samples-0", _replace(_MATRIX, "--n-samples", "0"), "m", "--n-samples"),
    # numbers and names
    ("eps-not-a-number", [*_MATRIX, "--eps", "eight"], "m", "--eps must be a number"),
    ("eps-negative", [*_MATRIX, "--eps", "-0.1"], "m", "--eps must be >= 0"),
    ("eps-negative-distill", [*_DISTILL, "--eps=-8/255"], "run", ">= 0"),
    ("unknown-attack", [*_MATRIX, "--attack", "pgdd"], "m", "pgdd"),
    ("unknown-eval-attack", _replace(_EVAL, "--attacks", "clean,pgdd"), "m.json", "pgdd"),
    ("unknown-method", _replace(_DISTILL, "--method", "dahrt"), "run", "dahrt"),
    ("teachers-not-in-pool", _replace(_DISTILL, "--teachers", "a,zz"), "run", "zz"),
    ("invalid-json-kwargs", _replace(_DISTILL, "--student-kwargs", "{width: 4"), "run", "not valid JSON"),
    ("missing-run-config", [*_DISTILL, "--config", "{d}/nope.yaml"], "run", "nope.yaml"),
    ("malformed-run-config", [*_DISTILL, "--config", "{broken}"], "run", "YAML"),
    ("missing-study-config", ["pipeline", "--config", "{d}/nope.yaml", *CPU], "p", "nope.yaml"),
    ("malformed-study-config", ["pipeline", "--config", "{broken}", *CPU], "p", "YAML"),
    ("malformed-matrix-csv", _replace(_REC, "--matrix", "{badcsv}"), "rec.json", "bad_matrix.csv"),
    ("k-too-large", _replace(_REC, "--k", "9"), "rec.json", "larger than the pool"),
    ("k-too-small", _replace(_REC, "--k", "1"), "rec.json", "at least 2"),
]


@pytest.mark.parametrize("argv, out_name, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2_and_leaves_nothing(files, tmp_path, capsys, argv, out_name, words):
    out = tmp_path / "out" / out_name
    argv = [_fill(a, files) for a in argv]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"darht {argv[0]}: error: "), err
    assert "Traceback" not in err
    assert words in lines[0], err
    assert not out.exists() and not (tmp_path / "out").exists(), sorted(p.name for p in tmp_path.rglob("*"))


# --------------------------------------------------------------------------------------------
# no clobbering
# --------------------------------------------------------------------------------------------
def _one_error_line(capsys, cmd: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"darht {cmd}: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("cmd", ["evaluate", "recommend", "train-teacher"])
def test_existing_output_file_is_refused_without_force(files, tmp_path, capsys, cmd):
    argv = {"evaluate": _EVAL, "recommend": _REC, "train-teacher": _TEACHER}[cmd]
    out = tmp_path / {"evaluate": "metrics.json", "recommend": "rec.json", "train-teacher": "W.safetensors"}[cmd]
    out.write_text("earlier result\n")
    argv = [_fill(a, files) for a in argv]
    assert main([*argv, "--out", str(out)]) == 2
    assert "--force" in _one_error_line(capsys, cmd)
    assert out.read_text() == "earlier result\n"
    if cmd != "train-teacher":  # --force replaces it (training a teacher is covered elsewhere)
        assert main([*argv, "--out", str(out), "--force"]) == 0
        assert out.read_text() != "earlier result\n"


def test_run_directories_are_not_clobbered(files, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"method": "darht"}))
    before = sorted(p.name for p in run.iterdir())
    distill = [_fill(a, files) for a in _DISTILL]
    assert main([*distill, "--out", str(run)]) == 2
    assert "--resume" in _one_error_line(capsys, "distill")
    # matrix reuses its own directory, but not another command's
    matrix = [_fill(a, files) for a in _MATRIX]
    assert main([*matrix, "--out", str(run)]) == 2
    assert "another run" in _one_error_line(capsys, "matrix")
    assert sorted(p.name for p in run.iterdir()) == before


# --------------------------------------------------------------------------------------------
# unsafe files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["../" + "a" * 61, "a" * 32 + "/" + "b" * 31, "/etc/passwd", "A" * 64, "",
                                 "a" * 63 + "\n", "..", "a" * 65])
def test_cache_keys_cannot_escape_the_cache(tmp_path, key):
    from transfer_analysis.cache import MatrixCache

    cache = MatrixCache(tmp_path / "cache")
    with pytest.raises(ValueError, match="64 hex digits"):
        cache.save_adv(key, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="64 hex digits"):
        cache.load_adv(key, shape=(1, 1, 2, 2))
    with pytest.raises(ValueError, match="64 hex digits"):
        cache.save_preds("ab" * 32, {key: torch.zeros(2, dtype=torch.long)})
    assert not any(tmp_path.rglob("*.pt"))


def test_half_written_cache_entry_is_never_read_back(tmp_path):
    from transfer_analysis.cache import MatrixCache

    cache = MatrixCache(tmp_path)
    key = "cd" * 32
    cache.save_adv(key, torch.rand(3, 1, 2, 2))
    path = tmp_path / "adv" / f"{key}.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as if the write were cut off
    assert MatrixCache(tmp_path).load_adv(key, shape=(3, 1, 2, 2)) is None


def test_untrusted_pickle_is_refused_and_trust_is_per_model(files, tmp_path):
    from transfer_analysis.models import load_state_dict_file

    with pytest.raises(UserError, match="trust"):
        load_state_dict_file(files["evil"])
    assert set(load_state_dict_file(files["evil"], trust=True)) == {"w"}


def test_no_unsafe_yaml_or_torch_load_in_the_code():
    import re

    offenders = []
    for path in [*ROOT.glob("transfer_analysis/**/*.py"), *ROOT.glob("distill/**/*.py"),
                 *ROOT.glob("experiments/**/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"yaml\.(unsafe_load|load|full_load)\(|torch\.load\([^)]*\)", text):
            call = m.group(0)
            if call.startswith("torch.load") and "weights_only=True" in call:
                continue
            if call.startswith("torch.load") and path.name == "utils.py" and "weights_only=False" in call:
                continue  # safe_torch_load's opt-in branch, reached only with trust=True
            offenders.append(f"{path.relative_to(ROOT)}: {call}")
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------
# numerical faults
# --------------------------------------------------------------------------------------------
def test_non_finite_logits_stop_training_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    from distill.methods import get_method_class
    from distill.trainer import NumericalFault, train
    from transfer_analysis.utils import safe_torch_load

    cfg = {"method": "pgd-at", "method_kwargs": {"steps": 1}, "student": "resnet18_cifar",
           "student_kwargs": {"width": 4}, "dataset": DATA, "epochs": 3, "batch_size": 32, "eval_samples": 0,
           "final_eval_samples": 8, "final_attacks": ["clean"], "device": "cpu"}
    cls = get_method_class("pgd-at")
    original = cls.step
    calls = {"n": 0}

    def poisoned(self, student, x, y):
        parts = original(self, student, x, y)
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, batch 2: finite loss, one Inf logit
            parts["logits"] = parts["logits"].clone()
            parts["logits"][0, 0] = float("inf")
        return parts

    monkeypatch.setattr(cls, "step", poisoned)
    with pytest.raises(NumericalFault, match=r"non-finite logits .* at epoch 2, batch 2"):
        train(cfg, tmp_path / "run")
    assert safe_torch_load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "run" / "student.safetensors").exists()


# --------------------------------------------------------------------------------------------
# interruptions: SIGKILL / SIGTERM, then resume
# --------------------------------------------------------------------------------------------
def _spawn(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "distill.cli", *argv, "--log-level", "WARNING"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(proc: subprocess.Popen, base: Path, pattern: str, timeout: float = 60.0) -> None:
    """Poll until a file matching ``base/pattern`` exists (fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if base.is_dir() and next(base.glob(pattern), None) is not None:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {pattern} appeared: {err[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"{pattern} did not appear within {timeout} s")


def _interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


_KILL_DATA = "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=256,n_test=32"


def _distill_argv(pool: Path, out: Path) -> list[str]:
    return ["distill", "--method", "darht", "--method-kwargs", '{"steps": 1}', "--student", "resnet18_cifar",
            "--student-kwargs", '{"width": 4}', "--pool", str(pool), "--teachers", "a,b", "--dataset", _KILL_DATA,
            "--epochs", "6", "--batch-size", "32", "--eval-samples", "8", "--eval-pgd-steps", "1",
            "--final-eval-samples", "8", "--final-attacks", "clean", "--device", "cpu", "--out", str(out)]


@pytest.fixture(scope="module")
def distill_reference(files) -> Path:
    """An uninterrupted run (in-process, one thread like the subprocesses)."""
    out = files["d"] / "reference_run"
    assert main(_distill_argv(files["pool"], out)) == 0
    return out / "student.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_distill_resumes_to_the_same_weights(files, distill_reference, tmp_path, capsys, sig):
    run = tmp_path / "run"
    proc = _spawn(_distill_argv(files["pool"], run), tmp_path)
    _wait_for(proc, run, "checkpoint.pt")
    code, err = _interrupt(proc, sig)
    assert not (run / "student.safetensors").exists(), "the run finished before it was interrupted"
    if sig == signal.SIGTERM:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 143, err
        # the interruption is one line; before it, only the run's start: its random teachers' warnings
        assert lines[-1].startswith("darht distill: interrupted by SIGTERM") and "--resume" in lines[-1], err
        assert all("keeps seeded random weights" in line for line in lines[:-1]), err
        assert not list(run.glob(".*.tmp")), "a temporary file was left behind"
    else:
        assert code == -signal.SIGKILL
    assert main(_distill_argv(files["pool"], run)) == 2  # not without --resume
    capsys.readouterr()
    assert main([*_distill_argv(files["pool"], run), "--resume"]) == 0
    _assert_same_weights(distill_reference, run / "student.safetensors")


def _matrix_argv(pool: Path, out: Path) -> list[str]:
    return ["matrix", "--pool", str(pool), "--dataset", _KILL_DATA, "--n-samples", "32", "--steps", "10",
            "--batch-size", "8", "--device", "cpu", "--out", str(out)]


@pytest.mark.slow
def test_killed_matrix_reruns_to_the_same_matrix(files, tmp_path):
    pool = _pool(tmp_path / "pool.yaml", [{"name": n, **TINY_CNN} for n in ("a", "b", "c")])
    run = tmp_path / "run"
    proc = _spawn(_matrix_argv(pool, run), tmp_path)
    _wait_for(proc, run, "cache/adv/*.pt")
    code, _ = _interrupt(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (run / "transfer_matrix.csv").exists(), "the run finished before it was killed"
    assert main(_matrix_argv(pool, run)) == 0
    assert main(_matrix_argv(pool, tmp_path / "reference")) == 0
    assert (run / "transfer_matrix.csv").read_text() == (tmp_path / "reference" / "transfer_matrix.csv").read_text()
    assert (run / "transfer_long.csv").read_text() == (tmp_path / "reference" / "transfer_long.csv").read_text()


_STUDY = {
    "study": "killme",
    "dataset": "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=192,n_test=24",
    "seed": 0,
    "eps": 0.25,
    "batch_size": 32,
    "pool": [{"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn",
              "train": {"method": "standard", "epochs": 2, "lr": 0.05}} for n in ("a", "b")],
    "matrix": {"n_samples": 24, "steps": 3, "batch_size": 24},
    "recommend": {"k": 2},
    "students": {"arch": "resnet18_cifar", "kwargs": {"width": 4}, "epochs": 3, "lr": 0.05, "seeds": [0],
                 "eval_samples": 8, "method_kwargs": {"darht": {"steps": 1}},
                 "runs": [{"method": "darht", "teacher_set": "low-transfer"}]},
    "evaluation": {"n_samples": 8, "attacks": ["clean"], "batch_size": 8},
}


@pytest.mark.slow
def test_killed_pipeline_resumes_to_the_same_students(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(_STUDY, sort_keys=False))
    run = tmp_path / "run"
    argv = ["pipeline", "--config", str(config), "--device", "cpu", "--out", str(run)]
    proc = _spawn(argv, tmp_path)
    _wait_for(proc, run, "students/*/checkpoint.pt")
    code, _ = _interrupt(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (run / "students.csv").exists(), "the run finished before it was killed"
    assert main([*argv, "--resume"]) == 0
    assert main([*argv[:-1], str(tmp_path / "reference")]) == 0
    capsys.readouterr()
    assert (run / "students.csv").read_text() == (tmp_path / "reference" / "students.csv").read_text()
    [student] = run.glob("students/*/student.safetensors")
    _assert_same_weights(student, tmp_path / "reference" / "students" / student.parent.name / "student.safetensors")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_become_one_line_and_exit_128_plus_signum(monkeypatch, capsys, sig, code):
    import distill.cli.recommend as recommend_cmd

    before = signal.getsignal(sig)

    def killed(args):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises before this ends
        return 0

    monkeypatch.setattr(recommend_cmd, "run", killed)
    assert main(["recommend", "--matrix", "m", "--k", "2", "--out", "r.json"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"darht recommend: interrupted by {signal.Signals(sig).name}")
    assert "Traceback" not in err
    assert signal.getsignal(sig) == before  # the shared handler is removed again


def test_unreachable_download_is_one_line(files, tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    out = tmp_path / "m"
    argv = [*_replace([_fill(a, files) for a in _MATRIX], "--dataset", "cifar10"), "--data-root",
            str(tmp_path / "data"), "--out", str(out)]
    assert main(argv) == 2
    line = _one_error_line(capsys, "matrix")
    assert "download failed: URLError" in line and "--data-root" in line
    assert not out.exists()

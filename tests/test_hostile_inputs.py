"""Every bad input, over every subcommand, is one line and exit 2, leaves nothing behind,
and every file that existed before is byte-identical afterwards; the two valid inputs that used
to fail now run.

Each case builds its inputs in its own directory (``setup(d)`` returns the argv), then the test
snapshots every file there, runs ``darht``, and compares.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_CNN
from distill.cli import main

DATA = "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=64,n_test=32"
CPU = ["--device", "cpu"]


def _weights(path: Path, width: int = 4) -> Path:
    from safetensors.torch import save_file

    from transfer_analysis.models import create_timm_model

    net = create_timm_model("resnet18_cifar", num_classes=4, in_chans=1, width=width)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _pool(d: Path, entries: list[dict], name: str = "pool.yaml") -> Path:
    (d / name).write_text(yaml.safe_dump({"models": entries}, sort_keys=False))
    return d / name


def _two(d: Path, **a_extra) -> Path:
    return _pool(d, [{"name": "a", **TINY_CNN, **a_extra}, {"name": "b", **TINY_CNN}])


def _npz(d: Path, name: str, n_train: int = 20, n_test: int = 8, train_labels=None, test_labels=None) -> Path:
    rng = np.random.default_rng(0)
    y_tr = np.asarray(train_labels if train_labels is not None else np.arange(n_train) % 4)
    y_te = np.asarray(test_labels if test_labels is not None else np.arange(n_test) % 4)
    np.savez(d / name, x_train=rng.integers(0, 256, (len(y_tr), 8, 8), dtype=np.uint8), y_train=y_tr,
             x_test=rng.integers(0, 256, (len(y_te), 8, 8), dtype=np.uint8), y_test=y_te)
    return d / name


def _matrix(data: str, out: str = "m", pool: str = "pool.yaml") -> list[str]:
    return ["matrix", "--pool", pool, "--dataset", data, "--n-samples", "8", "--steps", "1", "--out", out, *CPU]


def _study(d: Path, **changes) -> list[str]:
    cfg = {"dataset": DATA, "seed": 0, "eps": 0.1,
           "pool": [{"name": n, **TINY_CNN, "train": {"method": "standard", "epochs": 1}} for n in ("a", "b")],
           "recommend": {"k": 2}, "matrix": {"n_samples": 8, "steps": 1},
           "students": {"arch": "resnet18_cifar", "kwargs": {"width": 4}, "epochs": 1,
                        "runs": [{"method": "darht", "teacher_set": "low-transfer"}]},
           "evaluation": {"n_samples": 8, "attacks": ["clean"]}}
    for dotted, value in changes.items():
        target = cfg
        *path, last = dotted.split("__")
        for key in path:
            target = target[key]
        target[last] = value
    (d / "study.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ["pipeline", "--config", "study.yaml", "--out", "p", "--dry-run", *CPU]


_EVAL = ["evaluate", "--model", "w.safetensors", "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}',
         "--dataset", DATA, "--attacks", "clean", "--n-samples", "8", "--out", "m.json", *CPU]
_TEACHER = ["train-teacher", "--arch", "resnet18_cifar", "--model-kwargs", '{"width": 4}', "--dataset", DATA,
            "--epochs", "1", "--batch-size", "32", "--final-attacks", "clean", "--out", "t.safetensors", *CPU]
_DISTILL = ["distill", "--method", "pgd-at", "--student", "resnet18_cifar", "--student-kwargs", '{"width": 4}',
            "--method-kwargs", '{"steps": 1}', "--dataset", DATA, "--epochs", "1", "--batch-size", "32",
            "--eval-samples", "4", "--final-attacks", "clean", "--out", "run", *CPU]


def _with_weights(argv: list[str]) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        _weights(d / "w.safetensors")
        return argv

    return setup


def _file_then(argv_out: Callable[[str], list[str]]) -> Callable[[Path], list[str]]:
    """``--out`` below an existing regular file."""
    def setup(d: Path) -> list[str]:
        (d / "afile").write_text("not a directory\n")
        _weights(d / "w.safetensors")
        _two(d)
        (d / "matrix").mkdir()
        (d / "matrix" / "transfer_matrix.csv").write_text("source,a,b\na,1,0.2\nb,0.3,1\n")
        _study(d)
        return argv_out("afile/sub/out")

    return setup


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def _replace_out(argv: list[str], out: str) -> list[str]:
    return _replace(argv, "--out", out)


def _finished_distill(d: Path) -> None:
    assert main(_replace_out(_DISTILL, str(d / "run"))) == 0


def _matrix_done(d: Path) -> None:
    _two(d)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        assert main([*_matrix(DATA), "--eps", "0.1"]) == 0
    finally:
        os.chdir(cwd)


def _setup(fn: Callable[[Path], object], argv: list[str]) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        fn(d)
        return argv

    return setup


# (id, setup(dir) -> argv run inside dir, words the one line must contain)
CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    # datasets
    ("npz-no-test-images", _setup(lambda d: _npz(d, "d.npz", n_test=0), _matrix("d.npz")), "at least one image"),
    ("npz-no-images", _setup(lambda d: _npz(d, "d.npz", n_train=0, n_test=0), _matrix("d.npz")), "at least one"),
    ("npz-truncated", _setup(lambda d: (d / "t.npz").write_bytes(_npz(d, "d.npz").read_bytes()[:300]),
                             _matrix("t.npz")), "not a .npz archive"),
    ("npz-is-text", _setup(lambda d: (d / "t.npz").write_text("hello\n"), _matrix("t.npz")), "not a .npz archive"),
    ("npz-one-class", _setup(lambda d: _npz(d, "d.npz", train_labels=[0] * 10, test_labels=[0] * 4),
                             _matrix("d.npz")), "at least 2"),
    ("npz-test-labels-unseen", _setup(lambda d: _npz(d, "d.npz", test_labels=[0, 1, 103, 2]), _matrix("d.npz")),
     "outside 0..3"),
    ("synthetic-unknown-key", _setup(lambda d: None, _matrix("synthetic:foo=1")), "unknown synthetic dataset option"),
    ("synthetic-too-large", _setup(lambda d: None, _matrix("synthetic:image_size=100000")), "GiB"),
    ("synthetic-not-a-number", _setup(lambda d: None, _matrix("synthetic:n_train=1.5")), "needs an integer"),
    # pool files
    ("pool-binary-yaml", _setup(lambda d: (d / "pool.yaml").write_bytes(b"\xff\xfe\x00models"), _matrix(DATA)),
     "not a UTF-8 text file"),
    ("pool-checkpoint-number", _setup(lambda d: _two(d, checkpoint=123), _matrix(DATA)),
     "checkpoint must be a non-empty string"),
    ("pool-trusted-non-torch", _setup(lambda d: ((d / "x.pt").write_text("plain text\n"),
                                                 _two(d, checkpoint="x.pt", trust_checkpoint=True)), _matrix(DATA)),
     "not a torch file"),
    ("pool-mean-nan", _setup(lambda d: _two(d, mean=[float("nan")], std=[0.5]), _matrix(DATA)), "finite numbers"),
    ("pool-input-size-bool", _setup(lambda d: _two(d, input_size=[8, True]), _matrix(DATA)), "input_size"),
    ("pool-input-size-huge", _setup(lambda d: _two(d, input_size=10 ** 9), _matrix(DATA)), "input_size"),
    # outputs under a file, for every subcommand
    ("out-under-file-matrix", _file_then(lambda o: _replace_out(_matrix(DATA), o)), "is a file, not a directory"),
    ("out-under-file-evaluate", _file_then(lambda o: _replace_out(_EVAL, o)), "is a file, not a directory"),
    ("out-under-file-teacher", _file_then(lambda o: _replace_out(_TEACHER, o + ".safetensors")),
     "is a file, not a directory"),
    ("out-under-file-distill", _file_then(lambda o: _replace_out(_DISTILL, o)), "is a file, not a directory"),
    ("out-under-file-recommend", _file_then(lambda o: ["recommend", "--matrix", "matrix", "--k", "2", "--out",
                                                       o + ".json"]), "is a file, not a directory"),
    ("out-under-file-pipeline", _file_then(lambda o: ["pipeline", "--config", "study.yaml", "--out", o, *CPU]),
     "is a file, not a directory"),
    ("teacher-input-size-0", _setup(lambda d: None, [*_TEACHER, "--input-size", "0"]), "input_size"),
    # study configs: a dry run validates everything a run would
    ("study-seed-abc", lambda d: _study(d, seed="abc"), "seed must be an integer"),
    ("study-seed-float", lambda d: _study(d, seed=1.9), "seed must be an integer"),
    ("study-seeds-repeat", lambda d: _study(d, students__seeds=[0, 0]), "repeats a seed"),
    ("study-matrix-attack", lambda d: _study(d, matrix__attack="pgdd"), "matrix.attack"),
    ("study-matrix-batch", lambda d: _study(d, matrix__batch_size=-5), "matrix.batch_size"),
    ("study-students-lr", lambda d: _study(d, students__lr="abc"), "lr"),
    ("study-teacher-lr", lambda d: _study(d, pool=[{"name": n, **TINY_CNN, "train": {"epochs": 1, "lr": -1}}
                                                   for n in ("a", "b")]), "train.lr"),
    # existing outputs are never lost
    ("teacher-resume-without-run", _setup(lambda d: (d / "t.safetensors").write_bytes(b"earlier weights"),
                                          [*_TEACHER, "--resume"]), "nothing to resume"),
    ("distill-resume-and-force", _setup(_finished_distill, [*_DISTILL, "--resume", "--force"]), "give one of them"),
    ("distill-resume-never-started", _setup(lambda d: (d / "run").mkdir(), [*_DISTILL, "--resume"]),
     "nothing to resume"),
    ("pipeline-resume-never-started", _setup(lambda d: (_study(d), (d / "p").mkdir()),
                                             ["pipeline", "--config", "study.yaml", "--out", "p", "--resume", *CPU]),
     "nothing to resume"),
    ("matrix-into-another-matrix", _setup(_matrix_done, [*_matrix(DATA), "--eps", "0.2"]), "holds another matrix"),
    ("recommend-side-png", _setup(lambda d: ((d / "matrix").mkdir(),
                                             (d / "matrix" / "transfer_matrix.csv").write_text(
                                                 "source,a,b\na,1,0.2\nb,0.3,1\n"),
                                             (d / "rec.png").write_bytes(b"an earlier plot")),
                                  ["recommend", "--matrix", "matrix", "--k", "2", "--out", "rec.json"]),
     "rec.png already exists"),
    ("evaluate-side-indices", _setup(lambda d: (_weights(d / "w.safetensors"),
                                                (d / "m.indices.json").write_text('{"indices": [1]}')), _EVAL),
     "m.indices.json already exists"),
    ("evaluate-float-indices", _setup(lambda d: (_weights(d / "w.safetensors"),
                                                 (d / "i.json").write_text('{"indices": [1.7, 2.2]}')),
                                      [*_EVAL, "--indices", "i.json"]), "non-negative integers"),
    ("student-kwargs-conflict", _setup(lambda d: None, _replace(_DISTILL, "--student-kwargs",
                                                                '{"width": 4, "in_chans": 3}')), "in_chans=3"),
]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setup, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch, setup, words):
    argv = setup(tmp_path)
    if "pool.yaml" in argv and not (tmp_path / "pool.yaml").exists():
        _two(tmp_path)  # a valid pool for the cases about something else
    capsys.readouterr()
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"darht {argv[0]}: error: "), err
    assert "Traceback" not in err and words in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # nothing new, nothing changed
    assert not any(p.is_dir() and not any(p.iterdir()) and p.name not in ("run", "p", "matrix")
                   for p in tmp_path.rglob("*")), "an empty directory was left behind"


def test_read_only_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """As root a chmod cannot make a directory unwritable, so the OS answer is simulated."""
    import transfer_analysis.rundir as rundir

    _weights(tmp_path / "w.safetensors")
    real = os.access
    monkeypatch.setattr(rundir.os, "access",
                        lambda p, mode: False if Path(p).resolve() == (tmp_path / "ro").resolve() else real(p, mode))
    (tmp_path / "ro").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(_replace_out(_EVAL, "ro/m.json")) == 2
    line = capsys.readouterr().err.strip()
    assert "cannot write under ro" in line and "\n" not in line
    assert not (tmp_path / "ro" / "m.json").exists()


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    import errno

    from transfer_analysis.errors import UserError
    from transfer_analysis.utils import atomic_write_text

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write .*out\.txt: No space left on device"):
        atomic_write_text(tmp_path / "out.txt", "x")
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_outputs_follow_the_umask(tmp_path):
    from transfer_analysis.utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_resume_of_a_finished_run_rewrites_nothing(tmp_path, capsys):
    _finished_distill(tmp_path)
    before = _snapshot(tmp_path / "run")
    assert main(["distill", "--out", str(tmp_path / "run"), "--resume", "--final-attacks", "clean,fgsm", *CPU]) == 0
    assert _snapshot(tmp_path / "run") == before


def test_student_kwargs_may_repeat_what_the_data_implies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(_replace(_DISTILL, "--student-kwargs", '{"width": 4, "in_chans": 1}')) == 0
    _weights(tmp_path / "w.safetensors")
    assert main(_replace(_EVAL, "--model-kwargs", '{"width": 4, "in_chans": 1}')) == 0
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"]["clean"] >= 0


def test_relative_checkpoint_in_a_study_pool_is_found(tmp_path):
    from distill.pipeline.config import load_study_config
    from distill.pipeline.runner import _stage_pool
    from transfer_analysis.models import read_pool_config

    (tmp_path / "teachers").mkdir()
    (tmp_path / "configs").mkdir()
    _weights(tmp_path / "teachers" / "x.safetensors")
    cfg = {"dataset": DATA, "pool": [{"name": "x", **TINY_CNN, "checkpoint": "../teachers/x.safetensors"},
                                     {"name": "y", **TINY_CNN, "train": {"epochs": 1}}],
           "recommend": {"k": 2}, "students": {"arch": "resnet18_cifar",
                                               "runs": [{"method": "pgd-at", "teacher_set": "none"}]}}
    (tmp_path / "configs" / "s.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_study_config(tmp_path / "configs" / "s.yaml")
    loaded["pool"] = [loaded["pool"][0]]  # the pool stage for the checkpoint entry alone
    pool_yaml = _stage_pool(loaded, tmp_path / "run", None, "cpu")
    [entry] = read_pool_config(pool_yaml)
    assert Path(entry.checkpoint).is_file() and torch.load is not None


def test_truncated_torch_file_is_named_truncated_not_unsafe(tmp_path):
    from transfer_analysis.errors import UserError
    from transfer_analysis.utils import safe_torch_load

    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:60])
    for trust in (False, True):
        with pytest.raises(UserError, match="truncated or not a torch file") as err:
            safe_torch_load(tmp_path / "cut.pt", trust=trust, what="resume checkpoint", trust_hint=None)
        assert "unpickling" not in str(err.value) and "--trust-checkpoint" not in str(err.value)
    assert torch.equal(safe_torch_load(tmp_path / "ok.pt")["w"], torch.ones(3))

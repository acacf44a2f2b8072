"""Inputs that were accepted wrongly: each mechanism, table-driven, one line and exit 2."""

from __future__ import annotations

import pytest
import yaml

from distill.cli import main

DATA = "synthetic:num_classes=2,in_chans=1,image_size=8,n_train=16,n_test=8"
POOL = {"models": [{"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 2}} for n in ("a", "b")]}


@pytest.fixture
def pool(tmp_path):
    p = tmp_path / "pool.yaml"
    p.write_text(yaml.safe_dump(POOL))
    return p


CASES = [
    # a strict YAML loader: a repeated key is never silently the last value; alias bombs are refused
    ("duplicate-key", "models:\n  - {name: a, arch: resnet18_cifar}\nmodels: []\n", "duplicate key 'models'"),
    ("alias-bomb", "x: &a [1]\n" + "".join(f"y{i}: *a\n" for i in range(150)) + "models: []\n", "150 YAML aliases"),
    # the name rule: a comma can never be selected by --models, a path separator reaches file names
    ("comma-name", yaml.safe_dump({"models": [{"name": "a,b", "arch": "resnet18_cifar"}]}), "model name 'a,b'"),
    ("path-name", yaml.safe_dump({"models": [{"name": "../x", "arch": "resnet18_cifar"}]}), "model name '../x'"),
    # the pool file is named as the source of an error, never the entry's own `source:` key
    ("source-named", yaml.safe_dump({"models": [{"name": "a", "arch": "resnet18_cifar", "source": "timm"},
                                                {"name": "a", "arch": "resnet18_cifar"}]}), "p.yaml: duplicate model"),
]


@pytest.mark.parametrize("text,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pool_files_are_read_strictly(tmp_path, capsys, text, match):
    (tmp_path / "p.yaml").write_text(text)
    assert main(["matrix", "--pool", str(tmp_path / "p.yaml"), "--dataset", DATA, "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,match", [
    (["matrix", "--eps", "2"], "--eps '2' is larger than the [0, 1] pixel range; did you mean 2/255?"),
    (["distill", "--method", "pgd-at", "--student", "resnet18_cifar", "--teachers", "a,b"],
     "method 'pgd-at' uses no teachers, got a, b"),
], ids=["eps-in-pixels", "teachers-a-method-ignores"])
def test_options_that_would_be_ignored_or_misread_are_refused(tmp_path, pool, capsys, argv, match):
    common = ["--dataset", DATA, "--out", str(tmp_path / "o"), "--device", "cpu", "--pool", str(pool)]
    assert main([*argv, *common]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_run_directory_is_held_while_a_run_writes_it(tmp_path):
    import json
    import subprocess
    import sys

    from transfer_analysis.errors import UserError
    from transfer_analysis.rundir import LOCK_NAME, prepare_out_dir, release_run_dirs

    run = prepare_out_dir(tmp_path / "run")
    (run / "config.yaml").write_text("method: pgd-at\n")
    assert (run / LOCK_NAME).is_file()
    release_run_dirs()
    assert not (run / LOCK_NAME).exists()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = json.loads('{"pid": %d, "host": "%s", "started": "now"}' % (other.pid, __import__("platform").node()))
        (run / LOCK_NAME).write_text(json.dumps(lock))
        for kwargs in ({"resume": True}, {"force": True}):  # neither continues nor wipes a run being written
            with pytest.raises(UserError, match=f"being written by another run \\(process {other.pid}"):
                prepare_out_dir(run, **kwargs)
        assert (run / "config.yaml").is_file()
    finally:
        other.kill()
        other.wait()
    assert prepare_out_dir(run, resume=True) == run  # a stale lock (its process is gone) is taken over
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == __import__("os").getpid()
    release_run_dirs()


@pytest.mark.parametrize("level,shown", [("INFO", False), ("DEBUG", True)])
def test_third_party_warnings_stay_off_stderr_unless_debug(level, shown):
    import subprocess
    import sys

    code = ("import warnings; from transfer_analysis.console import setup_logging; "
            f"setup_logging({level!r}); warnings.warn('deprecated in some library', DeprecationWarning); "
            "warnings.warn('pkg_resources is deprecated')")
    err = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True).stderr
    assert ("pkg_resources is deprecated" in err) == shown, err
    assert ("deprecated in some library" in err) == shown, err


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_only_rank_zero_downloads(monkeypatch, rank):
    import torch.distributed  # noqa: F401 - what load_dataset looks for

    import transfer_analysis.data.specs as specs
    from transfer_analysis import distributed as dist_utils

    events = []
    monkeypatch.setattr(dist_utils, "world_size", lambda: 2)
    monkeypatch.setattr(dist_utils, "rank", lambda: rank)
    monkeypatch.setattr(dist_utils, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(specs, "_load_dataset", lambda name, root, download: events.append(f"load {download}"))
    specs.load_dataset("cifar10")
    assert events == (["load True", "barrier"] if rank == 0 else ["barrier", "load False"])


@pytest.mark.parametrize("change,match", [
    ({"students": {"train_subset": 16}}, "batch size 32 exceeds the 16 training images"),
    ({"train_subset": 16}, "batch size 32 exceeds the 16 training images"),
    ({"runs": [{"method": "darht", "teacher_set": "custom", "teachers": ["a", "a"]}]}, "names a teacher twice"),
], ids=["student-batch", "teacher-batch", "repeated-teacher"])
def test_dry_run_checks_what_the_run_checks(tmp_path, capsys, change, match):
    cfg = {"study": "s", "dataset": DATA, "batch_size": 32, "pool": [
        {"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 2}, "train": {"epochs": 1}} for n in ("a", "b")],
        "recommend": {"k": 2}, "training": {"epochs": 1, "lr": 0.1, "milestones": [0.5], "weight_decay": 0.0},
        "students": {"arch": "resnet18_cifar", "kwargs": {"width": 2},
                     "runs": [{"method": "darht", "teacher_set": "low-transfer"}]}}
    if "runs" in change:
        cfg["students"]["runs"] = change["runs"]
    elif "students" in change:
        cfg["students"].update(change["students"])
    else:
        cfg.update(change)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", "--config", str(tmp_path / "s.yaml"), "--dry-run"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and match in err[0], err

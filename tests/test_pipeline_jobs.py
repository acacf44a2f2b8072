"""A study as array jobs: --emit-commands writes one command per stage item; running every
item of every stage (here one after another, as the scheduler would) ends with the same students as a
plain run."""

from __future__ import annotations

import shlex

import pandas as pd
import pytest
import torch
import yaml

from distill.cli import main
from distill.pipeline.jobs import parse_item
from transfer_analysis.errors import UserError

STUDY = {
    "study": "jobs", "dataset": "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=256,n_test=96", "seed": 0,
    "eps": 0.1, "batch_size": 32,
    "pool": [{"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn",
              "train": {"method": "standard", "epochs": 3, "lr": 0.05}} for n in ("a", "b", "c")],
    "matrix": {"n_samples": 96, "steps": 2, "batch_size": 96}, "recommend": {"k": 2},
    "training": {"epochs": 1, "lr": 0.05, "weight_decay": 5.0e-4, "milestones": [0.5]},
    "students": {"arch": "resnet18_cifar", "kwargs": {"width": 4}, "seeds": [0], "eval_samples": 8,
                 "method_kwargs": {"darht": {"steps": 1}},
                 "runs": [{"method": "darht", "teacher_set": "low-transfer"}, {"method": "pgd-at",
                                                                              "teacher_set": "none",
                                                                              "kwargs": {"steps": 1}}]},
    "evaluation": {"n_samples": 16, "attacks": ["clean", "pgd20"], "batch_size": 16},
}


@pytest.mark.slow
def test_emitted_stages_run_item_by_item_equal_a_plain_run(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    out = tmp_path / "jobs"
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu", "--emit-commands",
                 "--shards", "2"]) == 0
    listing = capsys.readouterr().out
    assert "sbatch --parsable --array=0-2" in listing and "--dependency=afterok:$j1" in listing
    order = ["teachers", "matrix", "recommend", "students", "report"]  # the files are named by stage
    assert sorted(f.name for f in (out / "commands").iterdir()) == sorted(f"{n}.txt" for n in order)
    stages = [(out / "commands" / f"{n}.txt").read_text().splitlines() for n in order]
    assert [len(s) for s in stages] == [3, 2, 1, 2, 1]
    # a task started before its dependency is refused in one line
    student_cmd = shlex.split(stages[3][0])[1:]
    assert main(student_cmd) == 2
    assert "not trained yet" in capsys.readouterr().err
    interim = ["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu", "--only", "report"]
    for k, stage in enumerate(stages):  # what the scheduler would run, stage after stage
        for j, command in enumerate(stage):
            if order[k] == "students" and j == 0:  # an interim report before any student: one line
                capsys.readouterr()
                assert main(interim) == 2 and "no student" in capsys.readouterr().err
            if order[k] == "students" and j == 1:  # one of two students done: an interim report, training nothing
                assert main(interim) == 0
                assert list(pd.read_csv(out / "students.csv")["method"]) == ["darht"]
                report = (out / "report.md").read_text()
                assert "**Interim report: 1 of 2 students have finished.**" in report
                assert "`pgd-at-none-s0`" in report and not (out / "students" / "pgd-at-none-s0").exists()
                claim = yaml.safe_load((out / "claim.json").read_text())
                assert claim["verdict"] == "interim" and claim["verdict_so_far"] == "not tested"
                assert claim["interim"] == {"finished": 1, "planned": 2, "missing": ["pgd-at-none-s0"]}
            argv = shlex.split(command)
            assert argv[0] == "darht"
            assert main(argv[1:]) == 0, command
    assert "Interim" not in (out / "report.md").read_text()
    assert yaml.safe_load((out / "claim.json").read_text())["verdict"] == "not tested"  # one set: too few
    ref = tmp_path / "plain"
    assert main(["pipeline", "--config", str(config), "--out", str(ref), "--device", "cpu"]) == 0
    a, b = pd.read_csv(out / "students.csv"), pd.read_csv(ref / "students.csv")
    assert a.equals(b)
    assert (out / "transfer_matrix.csv").read_text() == (ref / "transfer_matrix.csv").read_text()


@pytest.mark.parametrize("bad", ["teacher", "matrix:2/2", "matrix:a/b", "students:x", "recommend:x", "report:x"])
def test_bad_items_are_refused(bad):
    with pytest.raises(UserError, match="`only` takes"):
        parse_item(bad)


def _small_study(tmp_path, **changes):
    study = {**STUDY, **changes}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study, sort_keys=False))
    return config


def test_emitted_commands_carry_ema_and_tracking_flags(tmp_path, capsys):
    """--ema and the tracking flags of `darht pipeline` reach every array task."""
    config = _small_study(tmp_path)
    out = tmp_path / "jobs"
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu", "--emit-commands",
                 "--ema", "0.9", "--tensorboard", "--wandb-project", "proj"]) == 0
    capsys.readouterr()
    lines = [line for f in sorted((out / "commands").iterdir()) for line in f.read_text().splitlines()]
    assert lines and all({"--ema", "0.9", "--tensorboard", "--wandb-project", "proj"} <= set(shlex.split(line))
                         for line in lines)
    # the override is part of the study: recorded, and an item without it is refused
    assert yaml.safe_load((out / "config.yaml").read_text())["students"]["ema"] == 0.9
    item = shlex.split(lines[0])[1:]
    without = [a for i, a in enumerate(item) if a != "--ema" and (i == 0 or item[i - 1] != "--ema")]
    assert main(without) == 2
    assert "different config (changed: students)" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_ema_and_tensorboard_reach_teachers_and_students(tmp_path, capsys):
    """`darht pipeline --ema D --tensorboard`: every student reports its EMA (recorded in its config.yaml),
    teachers follow teacher_training.ema, and every training run writes event files; --resume needs
    the same --ema (it changes results) but not the same tracking flags (they do not)."""
    config = _small_study(tmp_path, teacher_training={"method": "standard", "epochs": 3, "lr": 0.05, "ema": 0.8})
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu", "--ema", "0.9",
                 "--tensorboard"]) == 0
    students = sorted((out / "students").iterdir())
    assert students and all(yaml.safe_load((s / "config.yaml").read_text())["ema"] == 0.9 for s in students)
    assert all("moving average" in yaml.safe_load((s / "metrics.json").read_text())["training"]["model_selection"]
               for s in students)
    teachers = sorted((out / "teachers").glob("*.run"))
    assert len(teachers) == 3 and all(yaml.safe_load((t / "config.yaml").read_text())["ema"] == 0.8
                                      for t in teachers)
    assert all(any((d / "tensorboard").iterdir()) for d in [*students, *teachers])
    capsys.readouterr()
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu", "--resume"]) == 2
    assert "changed: students" in capsys.readouterr().err
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu", "--resume",
                 "--ema", "0.9"]) == 0


@pytest.mark.slow
def test_submitit_local_launcher_runs_the_stages_like_a_plain_run(tmp_path, capsys, monkeypatch):
    """--launcher submitit (its local executor: subprocesses, as Slurm tasks would be) runs
    every stage after the previous one and ends with the students of a plain run."""
    pytest.importorskip("submitit")
    # the jobs are new processes: give them this process's one thread (CPU float sums depend on the
    # thread count, and ~1e-7 differences in tiny teachers change which set a 3-model pool picks)
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    config = _small_study(tmp_path)
    out = tmp_path / "launched"
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu", "--launcher",
                 "submitit", "--submitit-cluster", "local", "--shards", "2", "--timeout-min", "20"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    logs = list((out / "submitit").glob("*_log.err"))
    assert len(logs) == 3 + 2 + 1 + 2 + 1  # one job per task of every stage
    ref = tmp_path / "plain"
    assert main(["pipeline", "--config", str(config), "--out", str(ref), "--device", "cpu"]) == 0
    assert pd.read_csv(out / "students.csv").equals(pd.read_csv(ref / "students.csv"))


def test_submitit_launcher_stops_at_a_failed_stage(tmp_path, monkeypatch):
    """A failed task stops the launcher with one line naming the stage, the job and its log; later
    stages are not submitted."""
    pytest.importorskip("submitit")
    from distill.pipeline.jobs import Stage
    from distill.pipeline.launch import submit_stages

    stages = [Stage("bad", [["darht", "recommend", "--matrix", str(tmp_path / "nothing")]], None),
              Stage("never", [["darht", "--version"]], "bad")]
    with pytest.raises(UserError, match=r"stage bad: 1 of 1 job\(s\) failed; first: job .*, log .*_log.err"):
        submit_stages(stages, tmp_path / "sub", cluster="local")
    # the second stage was never submitted: one job's files only
    assert len({f.name.split("_")[0] for f in (tmp_path / "sub").iterdir()}) == 1


def test_launcher_without_submitit_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit":
            raise ImportError("No module named 'submitit'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    config = _small_study(tmp_path)
    assert main(["pipeline", "--config", str(config), "--out", str(tmp_path / "x"), "--launcher", "submitit"]) == 2
    assert 'pip install -e ".[submitit]"' in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

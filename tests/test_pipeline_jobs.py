"""Issue 14: a study as array jobs: --emit-commands writes one command per stage item; running every
item of every stage (here one after another, as the scheduler would) ends with the same students as a
plain run."""

from __future__ import annotations

import shlex

import pandas as pd
import pytest
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
    files = sorted((out / "commands").iterdir())
    assert [f.name for f in files] == ["1-teachers.txt", "2-matrix.txt", "3-recommend.txt", "4-students.txt",
                                       "5-report.txt"]
    stages = [f.read_text().splitlines() for f in files]
    assert [len(s) for s in stages] == [3, 2, 1, 2, 1]
    # a task started before its dependency is refused in one line
    student_cmd = shlex.split(stages[3][0])[1:]
    assert main(student_cmd) == 2
    assert "not trained yet" in capsys.readouterr().err
    for stage in stages:  # what the scheduler would run, stage after stage
        for command in stage:
            argv = shlex.split(command)
            assert argv[0] == "darht"
            assert main(argv[1:]) == 0, command
    assert (out / "report.md").is_file()
    ref = tmp_path / "plain"
    assert main(["pipeline", "--config", str(config), "--out", str(ref), "--device", "cpu"]) == 0
    a, b = pd.read_csv(out / "students.csv"), pd.read_csv(ref / "students.csv")
    assert a.equals(b)
    assert (out / "transfer_matrix.csv").read_text() == (ref / "transfer_matrix.csv").read_text()


@pytest.mark.parametrize("bad", ["teacher", "matrix:2/2", "matrix:a/b", "students:x", "recommend:x"])
def test_bad_items_are_refused(bad):
    with pytest.raises(UserError, match="--only takes"):
        parse_item(bad)

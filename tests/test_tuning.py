"""Equal tuning: every tuned method gets the same small grid, chosen on images held out of the
training data by validation PGD-20; the test set is never used to choose."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from distill.cli import main
from distill.pipeline import validate_study_config
from transfer_analysis.data import holdout_indices, make_synthetic
from transfer_analysis.errors import UserError

STUDY = {
    "study": "tuned",
    "dataset": "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=160,n_test=48",
    "seed": 0, "eps": 0.1, "batch_size": 32,
    "pool": [{"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn",
              "train": {"method": "standard", "epochs": 3, "lr": 0.05}} for n in ("a", "b")],
    "matrix": {"n_samples": 48, "steps": 2, "batch_size": 48},
    "recommend": {"k": 2},
    "students": {"arch": "resnet18_cifar", "kwargs": {"width": 2}, "epochs": 1, "lr": 0.05, "seeds": [0],
                 "eval_samples": 0, "train_subset": 128, "validation": 32,
                 "tune": {"pgd-at": [{"steps": 1}, {"steps": 2, "alpha": 0.05}]},
                 "runs": [{"method": "pgd-at", "teacher_set": "none"}]},
    "evaluation": {"n_samples": 16, "attacks": ["clean", "pgd20"], "batch_size": 16},
}


def _study(**students):
    cfg = copy.deepcopy(STUDY)
    cfg["students"].update(students)
    return cfg


def test_holdout_is_a_balanced_disjoint_split_and_the_rest_keeps_the_test_set():
    y = torch.arange(40) % 4
    kept, held = holdout_indices(y, 8, seed=1)
    assert sorted(kept.tolist() + held.tolist()) == list(range(40))
    assert torch.bincount(y[held]).tolist() == [2, 2, 2, 2]
    ds = make_synthetic(num_classes=4, in_chans=1, image_size=4, n_train=40, n_test=12)
    rest, val = ds.holdout(8, seed=1)
    kept, held = holdout_indices(ds.y_train, 8, seed=1)
    assert len(rest.y_train) == 32 and torch.equal(rest.x_train, ds.x_train[kept])
    assert len(rest.y_train) == 32 and torch.equal(rest.x_test, ds.x_test)  # students are tested on the test set
    assert torch.equal(val.x_test, ds.x_train[held]) and torch.equal(val.x_train, rest.x_train)
    with pytest.raises(UserError, match="leaves none to train on"):
        holdout_indices(y, 40)


@pytest.mark.parametrize("students,match", [
    ({"validation": None}, "students.tune needs students.validation"),
    ({"tune": {"darht": [{"steps": 1}]}}, "students.tune.darht: no run of the study uses darht"),
    ({"tune": {"pgd-at": [{"steps": s} for s in range(1, 6)]}}, "must list 1 to 4 settings"),
    ({"tune": {"pgd-at": [{"steps": 1}, {"stepz": 2}]}}, r"students.tune.pgd-at #2: .*stepz"),
    ({"validation": 128}, "leaves none of the 128 training images"),
])
def test_tuning_config_errors_name_the_key(students, match):
    with pytest.raises(UserError, match=match):
        validate_study_config(_study(**students))


@pytest.mark.slow
def test_tuned_study_chooses_on_validation_and_every_student_runs_the_choice(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    out = tmp_path / "run"
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu", "--threads", "1"]) == 0
    tuning = json.loads((out / "tuning.json").read_text())
    entry = tuning["methods"]["pgd-at"]
    assert tuning["validation_images"] == 32 and entry["settings"] == STUDY["students"]["tune"]["pgd-at"]
    scores = entry["validation_pgd20"]
    assert entry["chosen_index"] == max(range(2), key=lambda j: (scores[j], -j))
    for j in (1, 2):  # each setting was evaluated on the 32 held-out training images, not on the test set
        metrics = json.loads((out / "tuning" / f"tune-pgd-at-{j}" / "metrics.json").read_text())
        assert metrics["n_per_attack"] == {"clean": 32, "pgd20": 32}
    student = yaml.safe_load((out / "students" / "pgd-at-none-s0" / "config.yaml").read_text())
    assert {k: student["method_kwargs"][k] for k in entry["chosen"]} == entry["chosen"]
    assert student["resolved"]["dataset"]["n_train"] == 96  # 128 less the 32 held out
    assert json.loads((out / "students" / "pgd-at-none-s0" / "metrics.json").read_text())["n_per_attack"]["clean"] == 16
    report = (out / "report.md").read_text()
    assert "## Tuning" in report and "validation pgd20" in report


@pytest.mark.slow
def test_parallel_tuning_equals_one_at_a_time(tmp_path):
    """--jobs 2 trains the settings in two one-thread workers (each setting once) and chooses what a
    one-thread run chooses."""
    import shutil

    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    one = tmp_path / "one"
    assert main(["pipeline", "--config", str(config), "--out", str(one), "--device", "cpu", "--threads", "1"]) == 0
    two = tmp_path / "two"
    shutil.copytree(one, two)
    for name in ("tuning", "students"):
        shutil.rmtree(two / name)
    (two / "tuning.json").unlink()
    assert main(["pipeline", "--config", str(config), "--out", str(two), "--device", "cpu", "--resume", "--jobs", "2",
                 "--threads", "2"]) == 0
    assert json.loads((two / "tuning.json").read_text()) == json.loads((one / "tuning.json").read_text())
    assert (two / "students.csv").read_text() == (one / "students.csv").read_text()
    logs = [(two / "tuning" / f"worker-{j}.log").read_text() for j in range(2)]
    for j in (1, 2):  # each setting trained by exactly one worker, and both workers took one
        assert sum(f"tune-pgd-at-{j} (" in log for log in logs) == 1, logs
    assert all("tune-pgd-at-" in log for log in logs)
    assert not (two / "tuning" / ".claims").exists()

"""`darht pipeline`: config validation, dry runs of the shipped configs, a tiny end-to-end study."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from distill.cli import main
from distill.pipeline import load_study_config, validate_study_config
from distill.pipeline.config import student_runs
from transfer_analysis.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "experiments" / "configs"

TINY = {
    "study": "tiny",
    "dataset": "synthetic:num_classes=4,in_chans=1,image_size=8,n_train=128,n_test=48",
    "seed": 0,
    "eps": 0.1,
    "batch_size": 32,
    "pool": [
        {"name": "cnn_a", "arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn",
         "train": {"method": "standard", "epochs": 3, "lr": 0.05}},
        {"name": "cnn_b", "arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn",
         "train": {"method": "fast-at", "epochs": 3, "lr": 0.05}},
        {"name": "mlp", "arch": "mixer_cifar", "kwargs": {"patch_size": 4, "embed_dim": 8, "num_blocks": 1},
         "family": "mlp", "train": {"method": "standard", "epochs": 1, "lr": 0.05}},
    ],
    "matrix": {"n_samples": 48, "steps": 2, "batch_size": 48},
    "recommend": {"k": 2},
    "students": {"arch": "resnet18_cifar", "kwargs": {"width": 4}, "epochs": 1, "lr": 0.05, "seeds": [0],
                 "eval_samples": 8, "train_subset": 96, "method_kwargs": {"darht": {"steps": 1}, "pgd-at": {"steps": 1}},
                 "runs": [{"method": "darht", "teacher_set": "low-transfer"},
                          {"method": "darht", "teacher_set": "homogeneous", "family": "cnn"},
                          {"method": "pgd-at", "teacher_set": "none"}]},
    "evaluation": {"n_samples": 16, "attacks": ["clean", "fgsm", "pgd20"], "batch_size": 16,
                   "attack_samples": {"pgd20": 8}},
}


def _with(**changes):
    cfg = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        target = cfg
        *path, last = dotted.split("__")
        for key in path:
            target = target[key]
        target[last] = value
    return cfg


@pytest.mark.parametrize("changes,match", [
    ({"dataset": None}, "'dataset' is required"),
    ({"eps": "-1"}, "eps"),
    ({"matrx": {}}, "did you mean 'matrix'"),
    ({"recommend__k": 4}, "between 2 and the pool size \\(3\\)"),
    ({"recommend__objective": "max"}, "minimax or mean"),
    ({"students__runs": [{"method": "darht", "teacher_set": "everything"}]}, "teacher_set must be one of"),
    ({"students__runs": [{"method": "dahrt", "teacher_set": "low-transfer"}]}, "did you mean 'darht'"),
    ({"students__runs": [{"method": "pgd-at", "teacher_set": "single"}]}, "takes no teachers"),
    ({"students__runs": [{"method": "ard", "teacher_set": "low-transfer"}]}, "one teacher"),
    ({"students__runs": [{"method": "darht", "teacher_set": "homogeneous", "family": "mlp"}]},
     "family 'mlp' has 1 pool model"),
    ({"students__runs": [{"method": "darht", "teacher_set": "custom", "teachers": ["zz"]}]}, "not in the pool"),
    ({"students__seeds": []}, "seeds"),
    ({"students__train_subset": 0}, "students.train_subset must be a positive integer"),
    ({"evaluation__attack_samples": {"cw": 8}}, "evaluation.attack_samples: .*'cw', which is not among the attacks"),
    ({"evaluation__attack_samples": {"clean": 8}}, "evaluation.attack_samples: clean accuracy is always measured"),
    ({"evaluation__attack_samples": {"pgd20": -1}}, "evaluation.attack_samples: .*'pgd20' must be a positive integer"),
    ({"evaluation__attack_samples": [200]}, "evaluation.attack_samples: .*maps attack names to sample counts"),
    ({"pool": [{"name": "a", "arch": "resnet18_cifar"}, {"name": "b", "arch": "resnet18_cifar"}]}, "needs 'train:'"),
    ({"pool": [{"name": "a", "arch": "resnet18_cifar", "train": {"method": "ard", "epochs": 1}},
               {"name": "b", "arch": "resnet18_cifar", "train": {"epochs": 1}}]}, "train.method"),
])
def test_config_errors_name_the_key(changes, match):
    with pytest.raises(UserError, match=match):
        validate_study_config(_with(**changes))


def test_runs_expand_over_architectures_and_seeds():
    cfg = validate_study_config(_with(students__arch=["resnet18_cifar", "mixer_cifar"], students__seeds=[0, 1]))
    ids = [r["id"] for r in student_runs(cfg)]
    assert len(ids) == 3 * 2 * 2 and len(set(ids)) == len(ids)
    assert ids[:4] == ["darht-low-transfer-resnet18_cifar-s0", "darht-low-transfer-resnet18_cifar-s1",
                       "darht-low-transfer-mixer_cifar-s0", "darht-low-transfer-mixer_cifar-s1"]


@pytest.mark.parametrize("name", ["quickstart", "fashion-mnist", "cifar10", "cifar10-pretrained", "cifar100",
                                  "tiny-imagenet"])
def test_shipped_configs_dry_run(name, capsys):
    assert main(["pipeline", "--config", str(CONFIGS / f"{name}.yaml"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.startswith(f"study {name}:") and "5. evaluation:" in plan


def test_paper_configs_follow_the_protocol():
    for name in ("cifar10", "cifar100", "tiny-imagenet"):
        cfg = load_study_config(CONFIGS / f"{name}.yaml")
        assert cfg["eps_value"] == pytest.approx(8 / 255) and cfg["evaluation"]["n_samples"] >= 10000
        assert set(cfg["students"]["archs"]) == {"resnet18_cifar", "mobilenetv2_cifar"}
        assert {p["family"] for p in cfg["pool"]} >= {"cnn", "transformer", "mlp"}
        assert all(p["train"]["method"] == "pgd-at" for p in cfg["pool"])
        epochs = (cfg.get("training") or {}).get("epochs") or cfg["students"]["epochs"]
        assert epochs == 200 and "autoattack" in cfg["evaluation"]["attacks"]
    cifar10 = load_study_config(CONFIGS / "cifar10.yaml")  # the one protocol every student runs
    assert cifar10["training"]["milestones"] == [0.575, 0.8, 0.925] and cifar10["training"]["kl_reduction"] == \
        "batchmean"


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out, as the README's commands give it
    config = Path("tiny.yaml")
    config.write_text(yaml.safe_dump(TINY, sort_keys=False))
    out = Path("run")
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    for name in ("report.md", "students.csv", "recommendation.json", "recommendation.png", "transfer_matrix.csv",
                 "models.csv", "transfer_heatmap.png", "robustness_vs_accuracy.png", "training_curves.png",
                 "pool.yaml", "command.txt", "config.yaml", "env.json"):
        assert (out / name).is_file(), name
    students = pd.read_csv(out / "students.csv")
    assert list(students.columns) == ["method", "teacher_set", "teachers", "seed", "clean_acc", "fgsm_acc",
                                      "pgd20_acc", "cw_acc", "autoattack_acc"]
    assert list(students["teacher_set"]) == ["low-transfer", "homogeneous", "none"]
    assert students.loc[1, "teachers"] == "cnn_a+cnn_b" and pd.isna(students.loc[2, "teachers"])
    assert students["clean_acc"].between(0, 1).all() and students["cw_acc"].isna().all()
    pool = yaml.safe_load((out / "pool.yaml").read_text())["models"]  # relative: the run dir can move
    assert all(not Path(m["checkpoint"]).is_absolute() and (out / m["checkpoint"]).is_file() for m in pool)
    rec = json.loads((out / "recommendation.json").read_text())
    low = rec["low-transfer"]["sets"][0]["teachers"]
    assert students.loc[0, "teachers"] == "+".join(low)
    assert rec["single"]["teacher"] in {"cnn_a", "cnn_b", "mlp"}
    report = (out / "report.md").read_text()
    for section in ("## Pool", "## Transferability", "## Teacher sets", "## Students", "## What the numbers show",
                    "![transferability heatmap](transfer_heatmap.png)", "darht pipeline --config"):
        assert section in report, section
    metrics = json.loads((out / "students" / "pgd-at-none-s0" / "metrics.json").read_text())
    assert students.loc[2, "pgd20_acc"] == pytest.approx(metrics["accuracy"]["pgd20"])
    # PGD-20 on a nested 8 of the 16 evaluation images (evaluation.attack_samples), the same 8 for every student
    assert metrics["n_per_attack"] == {"clean": 16, "fgsm": 16, "pgd20": 8} and metrics["worst_case_n"] == 8
    subsets = [json.loads(p.read_text())["diagnostics"]["subsets"]["positions"]["pgd20"]
               for p in sorted(out.glob("students/*/metrics.json"))]
    assert len(subsets) == 3 and subsets[0] == subsets[1] == subsets[2]
    assert "pgd20 on a nested class-balanced 8 of them" in (out / "report.md").read_text()
    # students train on students.train_subset images; the teachers on the whole (synthetic) training set
    for p in out.glob("students/*/config.yaml"):
        assert yaml.safe_load(p.read_text())["resolved"]["dataset"]["n_train"] == 96
    # every student was evaluated on the same images
    idx = [json.loads(p.read_text())["indices"] for p in sorted(out.glob("students/*/final_eval_indices.json"))]
    assert len(idx) == 3 and idx[0] == idx[1] == idx[2]
    # each student with teachers was measured as a source against them (the matrix attack and images);
    # recomputed here with the matrix engine over {student, teachers}, the row is the same
    from distill.student import load_student
    from transfer_analysis.attacks import AttackConfig
    from transfer_analysis.data import load_dataset, load_indices
    from transfer_analysis.matrix import transfer_matrix
    from transfer_analysis.models import load_pool

    detail = pd.read_csv(out / "students_detail.csv")
    assert detail["student_teacher_transfer"].isna().tolist() == [False, False, True]  # PGD-AT has no teacher
    st = json.loads((out / "students" / "darht-homogeneous-cnn-s0" / "student_transfer.json").read_text())
    assert sorted(st["teachers"]) == ["cnn_a", "cnn_b"] and st["n_images"] == 48
    ds = load_dataset(TINY["dataset"])
    m_idx = load_indices(out / "matrix" / "indices.json")
    teachers = load_pool(out / "pool.yaml", 4, 1, 8, names=["cnn_a", "cnn_b"])
    ref = transfer_matrix({"student:darht-homogeneous-cnn-s0": load_student(out / "students" / "darht-homogeneous-cnn-s0"),
                           **teachers}, ds.images("test", m_idx), ds.labels("test", m_idx),
                          AttackConfig("pgd", eps=0.1, steps=2), batch_size=48, seed=0)
    for t in ("cnn_a", "cnn_b"):
        want = ref.matrix.loc["student:darht-homogeneous-cnn-s0", t]
        assert st["teachers"][t]["transfer_rate"] == pytest.approx(want, nan_ok=True)
    assert detail.loc[1, "student_teacher_transfer"] == pytest.approx(st["mean"], nan_ok=True)
    assert "student_teacher_transfer" in pd.read_csv(out / "set_study.csv").columns

    # a second run into the same directory is refused; --resume reuses every stage
    capsys.readouterr()
    assert main(["pipeline", "--config", str(config), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in out.glob("students/*/student.safetensors")}
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--resume", "--device", "cpu"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("students/*/student.safetensors")} == before
    assert pd.read_csv(out / "students.csv").equals(students)
    # a changed config cannot resume into the old run
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(_with(eps=0.2), sort_keys=False))
    assert main(["pipeline", "--config", str(changed), "--out", str(out), "--resume"]) == 2
    assert "changed: eps" in capsys.readouterr().err


def test_teachers_with_the_same_settings_get_their_own_seeds(tmp_path, monkeypatch):
    """Two pool entries that differ only in name must not train to the same weights."""
    import distill.teachers
    from distill.pipeline.runner import _stage_pool
    from transfer_analysis.models import init_seed_for

    seeds, sizes = {}, {}

    def fake_train_teacher(arch, ds, weights, *, name, seed, **kw):
        seeds[name] = seed
        sizes[name] = kw["input_size"]
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"")
        weights.with_suffix(".yaml").write_text(yaml.safe_dump({"models": [{
            "name": name, "arch": arch, "checkpoint": weights.name}]}))

    monkeypatch.setattr(distill.teachers, "train_teacher", fake_train_teacher)
    cfg = validate_study_config(_with(pool=[
        {"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn",
         "train": {"method": "standard", "epochs": 1}} for n in ("twin_a", "twin_b")]))
    cfg["pool"][1]["input_size"] = 16
    _stage_pool(cfg, tmp_path, None, "cpu")
    assert seeds == {"twin_a": init_seed_for(0, "twin_a"), "twin_b": init_seed_for(0, "twin_b")}
    assert sizes == {"twin_a": None, "twin_b": 16}  # the entry's input_size reaches the training
    assert seeds["twin_a"] != seeds["twin_b"]


@pytest.mark.slow
def test_parallel_students_equal_one_at_a_time(tmp_path):
    """--jobs 2 --threads 2 (two one-thread processes) gives the students of --jobs 1 --threads 1."""
    import shutil

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY, sort_keys=False))
    one = tmp_path / "one"
    assert main(["pipeline", "--config", str(config), "--out", str(one), "--device", "cpu", "--threads", "1"]) == 0
    two = tmp_path / "two"
    shutil.copytree(one, two)
    shutil.rmtree(two / "students")
    for name in ("students.csv", "students_detail.csv", "report.md"):
        (two / name).unlink()
    assert main(["pipeline", "--config", str(config), "--out", str(two), "--device", "cpu", "--resume", "--jobs", "2",
                 "--threads", "2"]) == 0
    a, b = pd.read_csv(one / "students.csv"), pd.read_csv(two / "students.csv")
    pd.testing.assert_frame_equal(a, b)
    assert json.loads((two / "env.json").read_text())["jobs"] == 2
    # two long-lived workers shared the queue: each student was trained by exactly one of them
    logs = [(two / "students" / f"worker-{j}.log").read_text() for j in range(2)]
    ids = list(pd.read_csv(two / "students_detail.csv")["id"])
    for i in ids:
        assert sum(f"{i} (" in log for log in logs) == 1, (i, logs)
    assert all(any(f"{i} (" in log for i in ids) for log in logs)  # both took work
    assert not (two / "students" / ".claims").exists()


def _own_models_study(root: Path) -> Path:
    """A study folder: its config names a ``local-dir:`` timm model and a teacher checkpoint relative to itself."""
    import timm
    from safetensors.torch import save_file

    import torch
    import torch.nn.functional as F

    from transfer_analysis.data import load_dataset

    ds = load_dataset(TINY["dataset"])
    x, y = ds.images("train"), ds.labels("train")
    torch.manual_seed(0)
    own = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    own.pretrained_cfg = {**own.pretrained_cfg, "mean": (0.0,), "std": (1.0,), "input_size": (1, 8, 8), "num_classes": 4}
    ckpt = timm.create_model("resnet18_cifar", num_classes=4, in_chans=1, width=4)
    for model in (own, ckpt):  # a few steps, so that both classify some images (a matrix needs them)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
    timm.models.save_for_hf(own, str(root / "models" / "own"), safe_serialization=True)
    (root / "teachers").mkdir()
    save_file(ckpt.state_dict(), str(root / "teachers" / "ckpt.safetensors"))
    cfg = _with(pool=[{"name": "own", "arch": "local-dir:models/own", "pretrained": True, "family": "cnn",
                       "input_size": 8},
                      {"name": "ckpt", "arch": "resnet18_cifar", "kwargs": {"width": 4}, "family": "cnn",
                       "checkpoint": "teachers/ckpt.safetensors"}],
                students__runs=[{"method": "darht", "teacher_set": "low-transfer"}],
                evaluation={"n_samples": 8, "attacks": ["clean"], "batch_size": 8})
    cfg["matrix"]["steps"] = 1
    (root / "study.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "study.yaml"


@pytest.mark.slow
def test_a_study_over_own_models_moves_with_its_files_and_resumes(tmp_path, capsys):
    """Paths in a study config are relative to the config (local-dir: folders too, not to the run
    directory); the run directory names them relative to itself, so the whole folder can move (another
    checkout, another machine) and the run resumes there without retraining."""
    import shutil

    config = _own_models_study(tmp_path / "project")
    out = tmp_path / "project" / "run"
    assert main(["pipeline", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    for name in ("pool.yaml", "config.yaml"):
        models = yaml.safe_load((out / name).read_text())["models" if name == "pool.yaml" else "pool"]
        assert [m["arch"] for m in models] == ["local-dir:../models/own", "resnet18_cifar"], name
        assert models[1]["checkpoint"] == "../teachers/ckpt.safetensors", name
    assert pd.read_csv(out / "matrix" / "models.csv")["weights"].tolist() == ["pretrained", "checkpoint"]

    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    shutil.move(tmp_path / "project", moved)
    before = {p.name: p.stat().st_mtime_ns for p in (moved / "run").glob("students/*/student.safetensors")}
    assert before
    capsys.readouterr()
    assert main(["pipeline", "--config", str(moved / "study.yaml"), "--out", str(moved / "run"), "--resume",
                 "--device", "cpu"]) == 0
    assert "[matrix] done (attacks run: 0, from cache: 2)" in capsys.readouterr().err  # its cache moved too
    after = {p.name: p.stat().st_mtime_ns for p in (moved / "run").glob("students/*/student.safetensors")}
    assert after == before

    # another teacher file is another study: refused, not silently mixed
    capsys.readouterr()
    cfg = yaml.safe_load((moved / "study.yaml").read_text())
    shutil.copy(moved / "teachers" / "ckpt.safetensors", moved / "teachers" / "other.safetensors")
    cfg["pool"][1]["checkpoint"] = "teachers/other.safetensors"
    (moved / "other.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["pipeline", "--config", str(moved / "other.yaml"), "--out", str(moved / "run"), "--resume"]) == 2
    assert "changed: pool" in capsys.readouterr().err


def test_a_run_started_with_absolute_pool_paths_still_resumes(tmp_path):
    """Runs written before pool paths were run-relative stored them absolute; at the same place they
    are the same paths."""
    from distill.pipeline.runner import _check_resume, _comparable

    (tmp_path / "teachers").mkdir()
    cfg = validate_study_config(_with(pool=[
        {"name": n, "arch": "resnet18_cifar", "family": "cnn",
         "checkpoint": str(tmp_path / "teachers" / f"{n}.safetensors")} for n in ("a", "b")]))
    out = tmp_path / "run"
    out.mkdir()
    old = {**_comparable(cfg, out), "pool": cfg["pool"]}  # absolute, as such runs wrote them
    assert Path(old["pool"][0]["checkpoint"]).is_absolute()
    (out / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    _check_resume(out, cfg)
    assert _comparable(cfg, out)["pool"][0]["checkpoint"] == "../teachers/a.safetensors"
    cfg["pool"][0]["checkpoint"] = str(tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="changed: pool"):
        _check_resume(out, cfg)


def test_every_path_in_a_study_config_is_relative_to_the_config(tmp_path):
    """checkpoint, pretrained_file, local-dir: folders and a RobustBench model_dir (its default too)
    are read relative to the study config's folder, whatever the working directory."""
    cfg = _with(pool=[
        {"name": "a", "arch": "local-dir:models/a", "pretrained": True, "pretrained_file": "w/a.safetensors",
         "family": "cnn"},
        {"name": "b", "arch": "resnet18_cifar", "checkpoint": "teachers/b.safetensors", "family": "cnn"},
        {"name": "c", "source": "robustbench", "robustbench": {"name": "Standard", "dataset": "cifar10"}},
        {"name": "d", "source": "robustbench", "robustbench": {"name": "Standard", "dataset": "cifar10",
                                                               "model_dir": "zoo"}}])
    path = tmp_path / "study" / "s.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    pool = {e["name"]: e for e in load_study_config(path)["pool"]}
    here = path.parent.resolve()
    assert pool["a"]["arch"] == f"local-dir:{here / 'models' / 'a'}"
    assert pool["a"]["pretrained_file"] == str(here / "w" / "a.safetensors")
    assert pool["b"]["checkpoint"] == str(here / "teachers" / "b.safetensors")
    assert pool["c"]["robustbench"]["model_dir"] == str(here / "models")
    assert pool["d"]["robustbench"]["model_dir"] == str(here / "zoo")
    # a RobustBench model needs neither checkpoint nor train: (the zoo's weights), and cannot be trained here
    cfg["pool"][2]["train"] = {"method": "pgd-at", "epochs": 1}
    with pytest.raises(UserError, match="'c': a RobustBench model is used as the zoo gives it"):
        validate_study_config(cfg)

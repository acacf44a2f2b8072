"""The thread policy: one rule for every subcommand, the CPUs a process may really use, recorded."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from transfer_analysis.errors import UserError
from transfer_analysis.threads import available_cpus, cgroup_cpu_limit, choose_threads, warn_if_oversubscribed


@pytest.mark.parametrize("files,limit", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "50000 100000\n"}, 0.5),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path, files, limit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == limit
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if limit is None else min(affinity, max(1, -(-limit // 1)))
    assert available_cpus(tmp_path) == expected


def test_a_quota_below_the_affinity_mask_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # a 16-core host
    (tmp_path / "cpu.max").write_text("400000 100000\n")  # a 4-CPU container
    assert available_cpus(tmp_path) == 4
    assert choose_threads(None, env={}, cgroup_root=tmp_path) == (4, "available CPUs (affinity and cgroup quota)")


def test_the_order_of_the_sources():
    assert choose_threads(2, env={"DARHT_THREADS": "3", "OMP_NUM_THREADS": "4"}) == (2, "--threads")
    assert choose_threads(None, env={"DARHT_THREADS": "3", "OMP_NUM_THREADS": "4"}) == (3, "DARHT_THREADS")
    assert choose_threads(None, env={"OMP_NUM_THREADS": "4"}) == (4, "OMP_NUM_THREADS")
    with pytest.raises(UserError, match="--threads must be a positive integer"):
        choose_threads(0, env={})
    with pytest.raises(UserError, match="DARHT_THREADS must be a positive integer"):
        choose_threads(None, env={"DARHT_THREADS": "many"})


def test_a_busy_machine_warns_once_naming_the_flag(monkeypatch, caplog):
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    with caplog.at_level(logging.WARNING):
        assert warn_if_oversubscribed(threads=2)
    assert "--threads 1" in caplog.text and "load average 64.0" in caplog.text
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert not warn_if_oversubscribed(threads=2)


def test_every_subcommand_takes_threads_and_records_it(tmp_path):
    from distill.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert "--threads" in p._option_string_actions, name
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump({"models": [{"name": n, "arch": "resnet18_cifar", "kwargs": {"width": 2}}
                                               for n in ("a", "b")]}))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DARHT_THREADS")}
    out = subprocess.run([sys.executable, "-m", "distill.cli", "matrix", "--pool", str(pool), "--dataset",
                          "synthetic:num_classes=2,in_chans=1,image_size=8,n_train=8,n_test=8", "--n-samples", "8",
                          "--attack", "fgsm", "--out", str(tmp_path / "m"), "--device", "cpu", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    threads = json.loads((tmp_path / "m" / "env.json").read_text())["threads"]
    assert threads["threads"] == 1 and threads["source"] == "--threads" and threads["torch_intra_op"] == 1


def test_a_flag_either_acts_or_is_not_offered():
    """recommend uses no device and no randomness; a study's seed is its config's `seed:`."""
    from distill.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    offered = {name: set(p._option_string_actions) for name, p in sub.choices.items()}
    assert "--seed" not in offered["recommend"] and "--device" not in offered["recommend"]
    assert "--seed" not in offered["pipeline"] and "--device" in offered["pipeline"]
    for name in ("matrix", "distill", "train-teacher", "evaluate"):
        assert {"--seed", "--device"} <= offered[name], name

"""A study as array jobs of a cluster scheduler: ``darht pipeline --emit-commands`` and ``--only ITEM``.

A study's stages become items that run anywhere the run directory is shared (a cluster's file
system), each a self-contained ``darht pipeline ... --only ITEM`` command:

1. ``teacher:NAME`` for every teacher trained here (no dependency);
2. ``matrix:I/N`` for I = 0..N-1 (after 1): the sources ``% N == I`` attacked into the matrix cache;
3. ``recommend`` (after 2): assembles the matrix from the cache (no new attack) and picks the sets;
4. ``tune`` (after 3, only when the study has ``students.tune``): every setting on the validation split;
5. ``student:ID`` for every student (after 4, else 3): training and its final evaluation;
6. ``darht pipeline ... --resume`` (after 5): the tables, the claim and the report (all cached).

``report`` writes the tables, the claim and the report over the students finished so far, at any
time and without training (an interim report: it says how many students stand behind it, and the
claim's verdict is ``interim`` until every student has finished).

``emit_commands`` initializes the run directory (its ``config.yaml``, once, so the array tasks never
race to write it) and writes each stage's commands, one per line, to ``OUT/commands/STAGE.txt``:
task ``i`` of a Slurm array runs line ``i + 1`` (see the README). Every item checks that the run
directory holds this study (the same config) and that its inputs exist, so a task started too
early fails with one line instead of computing something else.

Example:
    >>> parse_item("matrix:1/4"), parse_item("student:darht-low-transfer-s0")
    (('matrix', (1, 4)), ('student', 'darht-low-transfer-s0'))
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer_analysis.errors import UserError

__all__ = ["Stage", "parse_item", "run_item", "emit_commands"]

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """One stage of array tasks: its name, its commands (one task each, as argument lists) and the
    stage it waits for."""

    name: str
    argvs: list[list[str]]
    after: str | None
    file: Path | None = None

    @property
    def commands(self) -> list[str]:
        """The commands as shell lines (what ``OUT/commands/STAGE.txt`` holds)."""
        return [shlex.join(argv) for argv in self.argvs]


def parse_item(text: str) -> tuple[str, Any]:
    """``teacher:NAME``, ``matrix:I/N``, ``recommend``, ``tune``, ``student:ID``, ``tune-runs`` and
    ``students`` (workers of ``darht pipeline --jobs``: every unfinished tuning run, or student, no
    other worker claimed) or ``report`` (over the finished students) -> ``(kind, value)``."""
    kind, sep, value = str(text).partition(":")
    if kind in ("recommend", "tune", "tune-runs", "students", "report") and not sep:
        return kind, None
    if kind in ("teacher", "student") and sep and value:
        return kind, value
    if kind == "matrix" and sep:
        i, slash, n = value.partition("/")
        if slash and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n):
            return "matrix", (int(i), int(n))
    raise UserError(f"`only` takes teacher:NAME, matrix:I/N (0 <= I < N), recommend, tune, student:ID, tune-runs, "
                    f"students or report, got {text!r}")


def run_item(config_path: str | Path, out: str | Path, item: str, device: str = "auto", *,
             ema: float | None = None, tracking: dict[str, Any] | None = None) -> None:
    """Run one item of a study whose run directory ``out`` was initialized (by ``--emit-commands``
    or an earlier run) with the same config (and the same ``ema`` override; ``tracking`` as for
    :func:`~distill.pipeline.runner.run_pipeline`)."""
    from distill.pipeline.config import load_study_config, with_overrides
    from distill.pipeline.runner import (_check_resume, _stage_matrix, _stage_pool, _stage_recommend, _stage_students,
                                         _status)
    from transfer_analysis.data import load_dataset
    from transfer_analysis.utils import resolve_device

    from distill.tracking import check_tracking

    kind, value = parse_item(item)
    cfg = with_overrides(load_study_config(config_path), ema=ema)
    tracking = check_tracking(tracking)
    out = Path(out)
    if not (out / "config.yaml").is_file():
        raise UserError(f"{out} holds no study run; initialize it with `emit_commands` (or run the whole pipeline)")
    _check_resume(out, cfg)
    dev = str(resolve_device(device))
    ds = load_dataset(cfg["dataset"], cfg["data_root"])
    train_ds = ds.with_train_subset(cfg["train_subset"], cfg["seed"])
    _status("item", item)
    if kind == "teacher":
        _stage_pool(cfg, out, train_ds, dev, only=value, tracking=tracking)
        return
    pool_path = _stage_pool(cfg, out, train_ds, dev, train_missing=False)
    if kind == "matrix":
        _stage_matrix(cfg, out, pool_path, ds, dev, shard=value)
        return
    if kind == "recommend":
        _stage_recommend(cfg, out, _stage_matrix(cfg, out, pool_path, ds, dev))
        return
    rec_path = out / "recommendation.json"
    if not rec_path.is_file():
        raise UserError(f"{rec_path} is missing; run the recommend item first (`only` recommend)")
    rec = json.loads(rec_path.read_text())
    from distill.pipeline.runner import CLAIMS_DIR
    from distill.pipeline.tuning import stage_tuning, student_data

    student_ds, val_ds = student_data(cfg, ds, train_ds)
    if kind in ("tune", "tune-runs"):
        stage_tuning(cfg, out, pool_path, rec, val_ds, dev, tracking=tracking,
                     claims=out / "tuning" / CLAIMS_DIR if kind == "tune-runs" else None)
        return
    if kind == "report":
        from distill.pipeline.runner import study_progress, write_study_outputs
        from distill.pipeline.tuning import TUNING_FILE

        rows = _stage_students(cfg, out, pool_path, rec, student_ds, dev, train_missing=False)
        tuning = json.loads((out / TUNING_FILE).read_text()) if (out / TUNING_FILE).is_file() else None
        argv = shlex.split((out / "command.txt").read_text()) if (out / "command.txt").is_file() else []
        write_study_outputs(cfg, out, rec, rows, argv, tuning=tuning, progress=study_progress(cfg, out))
        return

    _stage_students(cfg, out, pool_path, rec, student_ds, dev, only=value, tracking=tracking,
                    claims=out / "students" / CLAIMS_DIR if kind == "students" else None)


def emit_commands(config_path: str | Path, out: str | Path, *, shards: int = 4, device: str = "auto",
                  resume: bool = False, force: bool = False, program: Sequence[str] = ("darht",),
                  ema: float | None = None, tracking: dict[str, Any] | None = None) -> list[Stage]:
    """Initialize ``out`` and write the study's stages as array-task command files (``OUT/commands``).

    Args:
        config_path, out: the study config and its run directory.
        shards: array tasks of the matrix stage (at most the number of pool models is useful).
        device: the ``--device`` every command passes.
        resume, force: as for a whole run (an existing run directory needs one of them).
        program: how the commands call the toolkit (default ``darht``).
        ema, tracking: as for :func:`~distill.pipeline.runner.run_pipeline`; every command passes them on.
    """
    from distill.pipeline.config import load_study_config, student_runs, with_overrides
    from distill.pipeline.runner import start_run
    from distill.tracking import check_tracking
    from transfer_analysis.checks import as_int
    from transfer_analysis.files import atomic_write_text

    cfg = with_overrides(load_study_config(config_path), ema=ema)
    tracking = check_tracking(tracking)
    out = Path(out)
    as_int(shards, "shards", 1, exact=True)
    base = [*program, "pipeline", "--config", str(Path(config_path)), "--out", str(out), "--device", device,
            *_option_flags(ema, tracking)]
    start_run(cfg, out, resume=resume, force=force, device=device,
              command=[*base, "--emit-commands", "--shards", str(shards)])

    def only(item: str) -> list[str]:
        return [*base, "--only", item]

    stages = [
        Stage("teachers", [only(f"teacher:{p['name']}") for p in cfg["pool"] if "train" in p], None),
        Stage("matrix", [only(f"matrix:{i}/{shards}") for i in range(shards)], "teachers"),
        Stage("recommend", [only("recommend")], "matrix"),
        Stage("tune", [only("tune")] if cfg["students"]["tune"] else [], "recommend"),
        Stage("students", [only(f"student:{r['id']}") for r in student_runs(cfg)],
              "tune" if cfg["students"]["tune"] else "recommend"),
        Stage("report", [[*base, "--resume"]], "students"),
    ]
    stages = [s for s in stages if s.argvs]
    for stage in stages:  # named by stage, not position: a pool without train: entries has no teachers.txt
        stage.file = out / "commands" / f"{stage.name}.txt"
        atomic_write_text(stage.file, "\n".join(stage.commands) + "\n")
    return stages


def _option_flags(ema: float | None, tracking: dict[str, Any]) -> list[str]:
    """The ``darht pipeline`` flags that carry ``ema`` and the tracking options to every command."""
    flags = ["--ema", repr(float(ema))] if ema is not None else []
    flags += ["--tensorboard"] if tracking.get("tensorboard") else []
    flags += ["--log-wandb"] if tracking.get("log_wandb") else []
    flags += ["--wandb-project", tracking["wandb_project"]] if tracking.get("wandb_project") else []
    return flags


def describe_stages(stages: Sequence[Stage]) -> str:
    """The stages as a shell-readable listing with a Slurm recipe (what ``--emit-commands`` prints)."""
    lines = []
    for k, stage in enumerate(stages, 1):
        lines.append(f"# stage {k}: {stage.name}, {len(stage.commands)} task(s)"
                     + (f", after {stage.after}" if stage.after else "") + f"; {stage.file}")
        lines += stage.commands
    lines.append("# Slurm: one array job per stage, each after the previous one, e.g.")
    prev = None
    for k, stage in enumerate(stages, 1):
        dep = f" --dependency=afterok:$j{prev}" if prev else ""
        lines.append(f"#   j{k}=$(sbatch --parsable{dep} --array=0-{len(stage.commands) - 1} --wrap "
                     f"'sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {stage.file} | bash')")
        prev = k
    return "\n".join(lines)

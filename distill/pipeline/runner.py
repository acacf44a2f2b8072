"""Run a study config end to end, every stage cached, the whole run resumable.

Layout of the run directory::

    config.yaml  env.json  command.txt        resolved config, versions, the exact command
    teachers/NAME.safetensors|.yaml|.run/     teachers trained here (pool entry beside each)
    pool.yaml                                 the pool the later stages use
    matrix/                                   darht matrix outputs (and its per-source cache)
    recommendation.json  recommendation.png   low-/high-transfer, per-family and single sets
    students/ID/                              one darht distill run directory per student and seed
    students.csv  report.md  *.png            the comparison

Each stage skips work whose outputs exist (teachers, students) or comes from its cache (matrix);
an interrupted student resumes from its last epoch checkpoint. So ``--resume`` after a crash or a
SIGTERM continues where the run stopped, and the result equals that of an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.pipeline.config import describe_plan, load_study_config, student_runs, student_train_config, with_overrides
from distill.pipeline.transfer import STUDENT_TRANSFER_FILE, student_transfer
from distill.pipeline.tuning import TUNING_FILE, chosen_settings, stage_tuning, student_data, tuning_runs
from distill.tracking import check_tracking
from transfer_analysis.errors import UserError
from transfer_analysis.models.entry import map_entry_paths
from transfer_analysis.rundir import update_env_json
from transfer_analysis.utils import (
    atomic_write_json,
    atomic_write_text,
    prepare_out_dir,
    resolve_device,
    write_env_json,
    write_run_config,
)

__all__ = ["PipelineResult", "run_pipeline", "STUDENT_COLUMNS"]

logger = logging.getLogger(__name__)

STUDENT_COLUMNS = ["method", "teacher_set", "teachers", "seed", "clean_acc", "fgsm_acc", "pgd20_acc", "cw_acc",
                   "autoattack_acc"]
_ATTACK_COLUMNS = {"clean": "clean_acc", "fgsm": "fgsm_acc", "pgd20": "pgd20_acc", "cw": "cw_acc",
                   "autoattack": "autoattack_acc"}


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` produced (paths in the run directory)."""

    out: Path
    config: dict[str, Any]
    teacher_sets: dict[str, list[str]] = field(default_factory=dict)
    students: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None


#: where the workers of ``--jobs`` claim students (removed when they end)
CLAIMS_DIR = ".claims"


def _status(stage: str, message: str) -> None:
    logger.info("[%s] %s", stage, message)


def _run_relative(out: Path) -> Callable[[str], str]:
    """How the run directory's own files (``config.yaml``, ``pool.yaml``) name a path: an absolute path
    (as a loaded study config holds them) relative to the run directory; a relative one is taken to be
    so already (as those files hold them). So a run directory moved together with the files it names (a
    checkout at another path, another machine) still resumes and still finds its teachers."""
    base = out.resolve()
    return lambda p: os.path.relpath(base / os.path.expanduser(p), base)


def _comparable(cfg: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """The parts of a resolved config that define results (not where or how fast they run), with the
    pool's paths as the run directory names them (an older run's absolute paths included)."""
    comparable = {k: v for k, v in cfg.items() if k not in ("device", "data_root")}
    if isinstance(comparable.get("pool"), list):
        comparable["pool"] = [map_entry_paths(e, _run_relative(out)) if isinstance(e, Mapping) else e
                              for e in comparable["pool"]]
    return comparable


def _with_new_defaults(old: Any, new: Any) -> Any:
    """``old`` with the keys it lacks and ``new`` holds as ``None`` (options added since that run,
    whose unset value is the old behaviour) filled in, so a run started before them still resumes."""
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [_with_new_defaults(o, n) for o, n in zip(old, new)]
    if not isinstance(old, dict) or not isinstance(new, dict):
        return old
    filled = {k: _with_new_defaults(v, new.get(k)) for k, v in old.items()}
    filled.update({k: None for k, v in new.items() if k not in old and v is None})
    return filled


def _check_resume(out: Path, cfg: Mapping[str, Any]) -> None:
    stored = out / "config.yaml"
    if not stored.is_file():
        return
    old = yaml.safe_load(stored.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(_comparable(cfg, out), sort_keys=False))
    old = _with_new_defaults(_comparable(old, out), new)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise UserError(f"{out} was started with a different config (changed: {', '.join(changed)}); "
                        "use a new `out`, or `force` to start over")


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------
def _stage_pool(cfg: Mapping[str, Any], out: Path, train_ds: Any, device: str, *, only: str | None = None,
                train_missing: bool = True, tracking: Mapping[str, Any] | None = None) -> Path | None:
    """Train (or find) every teacher made here and write ``pool.yaml``; with ``only``, train that one
    teacher and write nothing else (an array task); without ``train_missing``, a teacher not trained
    yet is an error (a later array task started too early)."""
    from distill.teachers import train_teacher
    from transfer_analysis.models import PoolEntry, init_seed_for

    entries: list[dict[str, Any]] = []
    for i, spec in enumerate(cfg["pool"]):
        if only is not None and spec["name"] != only:
            continue
        train = spec.get("train")
        entry = {k: v for k, v in spec.items() if k != "train"}
        if train is not None:
            weights = out / "teachers" / f"{spec['name']}.safetensors"
            written = weights.with_suffix(".yaml")
            if weights.is_file() and written.is_file():
                _status("pool", f"{spec['name']}: trained earlier ({weights})")
            elif not train_missing:
                raise UserError(f"teacher {spec['name']!r} is not trained yet ({weights} missing); run its "
                                f"stage first: `only` teacher:{spec['name']}")
            else:
                _status("pool", f"{spec['name']}: training {spec['arch']} with {train['method']} for "
                        f"{train['epochs']} epochs ({i + 1}/{len(cfg['pool'])})")
                t0 = time.time()
                train_teacher(
                    spec["arch"], train_ds, weights, method=train["method"],
                    # pretrained: true with train: fine-tunes the pretrained weights (a new head for the data)
                    model_kwargs={**(spec.get("kwargs") or {}), **({"pretrained": True} if spec.get("pretrained")
                                                                   else {})},
                    epochs=train["epochs"], eps=train["eps_value"], batch_size=train["batch_size"] or cfg["batch_size"],
                    lr=train["lr"], optimizer=train["optimizer"], weight_decay=train["weight_decay"],
                    name=spec["name"], family=spec.get("family"),
                    resume=(weights.parent / f"{spec['name']}.run" / "config.yaml").is_file(),
                    # each teacher's own seed: two entries with the same arch and training differ
                    seed=init_seed_for(cfg["seed"], spec["name"]), device=device,
                    final_eval_samples=min(1000, cfg["matrix"]["n_samples"]), input_size=spec.get("input_size"),
                    ema=train["ema"], **dict(tracking or {}))
                _status("pool", f"{spec['name']}: done in {time.time() - t0:.0f} s")
            trained = yaml.safe_load(written.read_text())
            trained = trained["models"][0] if isinstance(trained, Mapping) and "models" in trained else trained
            entry.update({k: trained[k] for k in ("checkpoint", "mean", "std", "input_size") if trained.get(k)})
            # W.yaml's checkpoint is relative to W.yaml; pool.yaml's are relative to the run directory
            entry["checkpoint"] = str((written.parent / entry["checkpoint"]).resolve())
            entry["training"] = f"{train['method']} x{train['epochs']} (eps {train['eps_value']:g})"
            for key in ("pretrained", "pretrained_file", "num_classes"):  # the checkpoint holds every weight
                entry.pop(key, None)
        entry = map_entry_paths(entry, _run_relative(out))  # the run directory moves as a whole
        PoolEntry(**entry)  # same schema as any pool file
        entries.append(entry)
    if only is not None:
        if not entries:
            raise UserError(f"no pool model {only!r} in the study; it has {', '.join(p['name'] for p in cfg['pool'])}")
        return None
    pool_path = out / "pool.yaml"
    atomic_write_text(pool_path, yaml.safe_dump({"models": entries}, sort_keys=False))
    return pool_path


def _stage_matrix(cfg: Mapping[str, Any], out: Path, pool_path: Path, ds: Any, device: str,
                  shard: tuple[int, int] | None = None) -> Path:
    """The transferability matrix of the pool (``shard``: one array task's sources into the cache)."""
    from transfer_analysis.matrix import run_matrix

    m = cfg["matrix"]
    attack = matrix_attack(cfg)
    _status("matrix", f"{m['attack']} on {m['n_samples']} test images, {len(cfg['pool'])} models"
            + (f", shard {shard[0]}/{shard[1]}" if shard else ""))
    result = run_matrix(pool_path, ds, out / "matrix", n_samples=m["n_samples"], attack=attack,
                        batch_size=m["batch_size"], seed=cfg["seed"], device=device, shard=shard)
    if result is not None:
        _status("matrix", f"done (attacks run: {result.stats['attacks_run']}, from cache: "
                f"{result.stats['sources_from_cache']})")
    return out / "matrix"


def matrix_attack(cfg: Mapping[str, Any]) -> Any:
    """The study's matrix attack (``matrix:`` at the study's ε): what measures teacher-to-teacher and
    student-to-teacher transfer alike."""
    from transfer_analysis.attacks import AttackConfig

    m = cfg["matrix"]
    return AttackConfig(name=m["attack"], eps=cfg["eps_value"], steps=m["steps"],
                        step_size=None if m["step_size"] is None else float(eval_fraction(m["step_size"])))


def eval_fraction(value: Any) -> float:
    from transfer_analysis.utils import parse_eps

    return parse_eps(value, "step_size")


def _stage_recommend(cfg: Mapping[str, Any], out: Path, matrix_dir: Path) -> dict[str, Any]:
    from transfer_analysis.selection import (
        read_matrix,
        select_teachers,
        select_teachers_by_family,
        transfer_graph,
        write_recommendation,
    )

    r = cfg["recommend"]
    matrix, models = read_matrix(matrix_dir)
    k = r["k"]
    low = select_teachers(matrix, k, objective=r["objective"], pair=r["pair"], top=5, models=models)
    # the opposite ranking: by default the sets whose pairs transfer most on average (minimax with
    # worst=True would maximize the single largest pair, so any set holding that pair would do)
    high = select_teachers(matrix, k, objective=r["high_objective"], pair=r["pair"], top=5, worst=True, models=models)
    try:  # families with k models; only a run with teacher_set homogeneous requires one
        by_family = select_teachers_by_family(matrix, k, objective=r["objective"], pair=r["pair"], models=models)
    except UserError as err:
        logger.info("no homogeneous set: %s", err)
        by_family = {}
    robust = models.set_index("model")["whitebox_robust_acc"] if models is not None else None
    if robust is None or robust.isna().all():
        raise UserError(f"{matrix_dir}/models.csv has no white-box robust accuracy; cannot pick the best single teacher")
    single = str(robust.astype(float).idxmax())
    graph = transfer_graph(matrix, models, pair=r["pair"])
    write_recommendation(low, out / "recommendation_low.json", graph=graph)
    summary = {
        "k": k, "objective": r["objective"], "pair": r["pair"],
        "low-transfer": low.to_dict(), "high-transfer": high.to_dict(),
        "homogeneous": {fam: rec.to_dict() for fam, rec in by_family.items()},
        "single": {"teacher": single, "whitebox_robust_acc": float(robust[single])},
    }
    sampled = [run for run in cfg["students"]["runs"] if run["teacher_set"] == "sampled"]
    if sampled:
        from transfer_analysis.set_sampling import sample_teacher_sets

        named = [summary[t]["sets"][0]["teachers"] for t in ("low-transfer", "high-transfer")]
        named += [fam_rec["sets"][0]["teachers"] for fam_rec in summary["homogeneous"].values()]
        n_sets = 1 + max(run["sample_index"] for run in sampled)
        draws = sample_teacher_sets(matrix, k, n_sets, seed=cfg["seed"], pair=r["pair"], exclude_sets=named)
        summary["sampled"] = {"n_sets": n_sets, "seed": cfg["seed"], "excluded": [sorted(t) for t in named],
                              "rule": "equal-width strata of the max-pair score, one set drawn per stratum",
                              "sets": [d.to_dict() for d in draws]}
        _status("recommend", f"{n_sets} sampled sets, max pair {draws[0].max_pair:.3f} to "
                f"{max(d.max_pair for d in draws):.3f}")
    atomic_write_json(out / "recommendation.json", summary)
    _status("recommend", f"low-transfer {low.best.teachers} (max pair {low.best.max_pair:.3f}); "
            f"high-transfer {high.best.teachers} (max pair {high.best.max_pair:.3f}); single {single}")
    return summary


def _teachers_for(run: Mapping[str, Any], rec: Mapping[str, Any]) -> list[str]:
    tset = run["teacher_set"]
    if tset == "none":
        return []
    if tset == "custom":
        return list(run["teachers"])
    if tset == "single":
        return [rec["single"]["teacher"]]
    if tset == "sampled":
        return list(rec["sampled"]["sets"][run["sample_index"]]["teachers"])
    if tset == "homogeneous":
        fam = run["family"]
        if fam not in rec["homogeneous"]:
            raise UserError(f"no set of k = {rec['k']} teachers within family {fam!r} (see recommendation.json)")
        return list(rec["homogeneous"][fam]["sets"][0]["teachers"])
    return list(rec[tset]["sets"][0]["teachers"])


def _claim(claims: Path, run_id: str) -> bool:
    """Take student ``run_id`` for this worker (an atomic create of ``claims/ID``); False when another
    worker of the same ``--jobs`` run has it."""
    claims.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(claims / run_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _stage_students(cfg: Mapping[str, Any], out: Path, pool_path: Path, rec: Mapping[str, Any], train_ds: Any,
                    device: str, only: str | None = None,
                    tracking: Mapping[str, Any] | None = None, claims: Path | None = None,
                    train_missing: bool = True) -> list[dict[str, Any]]:
    """Train and evaluate every unfinished student (or the one ``only`` names) and return one row per
    student. With ``claims`` (a worker of ``--jobs``), train the unfinished students no other worker
    has claimed, in study order, and return no rows (the parent gathers them). Without
    ``train_missing`` (an interim report), the rows of the finished students only."""
    from distill.pipeline.claim import convergence, student_protocol
    from distill.trainer import train
    from transfer_analysis.models import load_pool

    runs = student_runs(cfg)
    if only is not None:
        runs = [r for r in runs if r["id"] == only]
        if not runs:
            raise UserError(f"no student {only!r} in the study; ids: {', '.join(r['id'] for r in student_runs(cfg))}")
    pool = None
    rows = []
    chosen = chosen_settings(cfg, out)
    for i, run in enumerate(runs):
        teachers = _teachers_for(run, rec)
        run_dir = out / "students" / run["id"]
        metrics_path = run_dir / "metrics.json"
        if claims is not None and (metrics_path.is_file() or not _claim(claims, run["id"])):
            continue
        if not train_missing and not metrics_path.is_file():
            continue
        if not metrics_path.is_file():
            if teachers and pool is None:
                pool = load_pool(pool_path, train_ds.num_classes, train_ds.in_chans, train_ds.image_size)
            _status("students", f"{run['id']} ({i + 1}/{len(runs)}): {run['method']} from "
                    f"{', '.join(teachers) or 'no teacher'}")
            config = {**student_train_config(cfg, run, teachers, pool=str(pool_path), device=device,
                                             setting=chosen.get(run["method"])), **dict(tracking or {})}
            train(config, run_dir, resume=(run_dir / "config.yaml").is_file(), dataset=train_ds,
                  teachers={n: pool[n] for n in teachers} if teachers else None)
        else:
            _status("students", f"{run['id']}: finished earlier")
        transfer = None
        if teachers:
            if pool is None and not (run_dir / STUDENT_TRANSFER_FILE).is_file():
                pool = load_pool(pool_path, train_ds.num_classes, train_ds.in_chans, train_ds.image_size)
            transfer = student_transfer(cfg, out, run, teachers, pool, train_ds, device)
        if claims is not None:
            continue
        import json

        metrics = json.loads(metrics_path.read_text())
        row = {"method": run["method"], "teacher_set": run["teacher_set"], "teachers": "+".join(teachers),
               "seed": run["seed"], "label": run["label"], "student": run["arch"], "id": run["id"]}
        for attack, column in _ATTACK_COLUMNS.items():
            row[column] = metrics["accuracy"].get(attack)
        row["worst_case_acc"] = metrics.get("worst_case")
        row["student_teacher_transfer"] = transfer["mean"] if transfer else None
        row["flags"] = "; ".join(metrics.get("flags", []))
        row.update(student_protocol(run_dir))
        row.update(convergence(run_dir))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def _in_parallel(cfg: Mapping[str, Any], config_path: str | os.PathLike, out: Path, jobs: int,
                 device: str, ema: float | None, tracking: Mapping[str, Any] | None, *, stage: str = "students") -> None:
    """Train the unfinished runs of ``stage`` (``students``, or ``tuning``: the settings of
    ``students.tune``) with ``jobs`` worker processes of ``threads // jobs`` threads each (``darht
    pipeline --only students`` / ``--only tune-runs``). A worker imports torch and reads the data and
    the pool once, then takes the next run no other worker has claimed until none is left, so start-up
    is paid once per worker, not per run. Every run is seeded by itself, so the results are those of
    one process. Worker J's output goes to ``OUT/STAGE/worker-J.log``."""
    import shutil
    import subprocess
    import sys

    from distill.pipeline.jobs import _option_flags
    from transfer_analysis.threads import available_cpus, thread_policy

    runs, item = (student_runs(cfg), "students") if stage == "students" else (tuning_runs(cfg), "tune-runs")
    pending = [r for r in runs if not (out / stage / r["id"] / "metrics.json").is_file()]
    if not pending:
        return
    jobs = min(jobs, len(pending))
    threads = max(1, int(thread_policy().get("threads") or available_cpus()) // jobs)
    claims = out / stage / CLAIMS_DIR
    shutil.rmtree(claims, ignore_errors=True)  # this run's workers are the only claimants
    base = [sys.executable, "-m", "distill.cli", "pipeline", "--config", str(config_path), "--out", str(out),
            "--device", device, "--threads", str(threads), *_option_flags(ema, dict(tracking or {})),
            "--only", item]
    (out / stage).mkdir(parents=True, exist_ok=True)
    _status(stage, f"{len(pending)} run(s), {jobs} worker(s) of {threads} thread(s)")
    workers: list[tuple[int, subprocess.Popen, Any]] = []
    try:
        for j in range(jobs):
            log = open(out / stage / f"worker-{j}.log", "w")  # noqa: SIM115 - closed when it ends
            workers.append((j, subprocess.Popen(base, stdout=log, stderr=subprocess.STDOUT), log))
        for _, proc, log in workers:
            proc.wait()
            log.close()
    finally:
        for _, proc, log in workers:  # interrupted: stop the others too (each run resumes later)
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            log.close()
        shutil.rmtree(claims, ignore_errors=True)
    failed = [f"worker-{j}" for j, proc, _ in workers if proc.returncode != 0]
    unfinished = [r["id"] for r in pending if not (out / stage / r["id"] / "metrics.json").is_file()]
    if failed or unfinished:
        raise UserError(f"{len(unfinished)} {stage} run(s) unfinished ({', '.join(unfinished[:4])}"
                        f"{' ...' if len(unfinished) > 4 else ''}); see {out / stage}/worker-J.log, then "
                        "--resume")


def run_pipeline(config_path: str | os.PathLike, out: str | os.PathLike | None = None, *, resume: bool = False,
                 force: bool = False, device: str = "auto", dry_run: bool = False,
                 command: Sequence[str] | None = None, ema: float | None = None,
                 tracking: Mapping[str, Any] | None = None, jobs: int = 1) -> PipelineResult:
    """Run (or, with ``dry_run``, validate and plan) the study of a config file.

    Args:
        config_path: a study config (see :mod:`distill.pipeline.config`).
        out: the run directory (default ``runs/<study>``).
        resume: continue a run in ``out`` (its config must be the same).
        force: replace a run in ``out``.
        device: ``auto``, ``cpu``, ``cuda[:i]``.
        dry_run: validate the config, check the dataset and every architecture, log the plan,
            write nothing.
        command: the command line to record in the report (default: ``sys.argv``).
        ema: an exponential moving average of every student with this decay (overrides the
            config's ``students.ema``; recorded in the run's ``config.yaml``).
        tracking: ``tensorboard``, ``log_wandb`` and ``wandb_project`` for every training run
            (teachers and students; see :mod:`distill.tracking`). They do not change results, so a
            resumed run may use others.
    """
    cfg = with_overrides(load_study_config(config_path), ema=ema)
    tracking = check_tracking(tracking)
    out = Path(out) if out is not None else Path("runs") / str(cfg["study"])
    plan = describe_plan(cfg)
    if dry_run:
        _dry_run_checks(cfg)
        return PipelineResult(out=out, config=cfg)
    dev, ds, argv = start_run(cfg, out, resume=resume, force=force, device=device, command=command)
    for line in plan:
        logger.info("plan: %s", line)

    train_ds = ds.with_train_subset(cfg["train_subset"], cfg["seed"])
    pool_path = _stage_pool(cfg, out, train_ds, str(dev), tracking=tracking)
    matrix_dir = _stage_matrix(cfg, out, pool_path, ds, str(dev))
    rec = _stage_recommend(cfg, out, matrix_dir)
    student_ds, val_ds = student_data(cfg, ds, train_ds)
    if jobs > 1 and cfg["students"]["tune"] and not (out / TUNING_FILE).is_file():
        _in_parallel(cfg, config_path, out, jobs, str(dev), ema, tracking, stage="tuning")
    tuning = stage_tuning(cfg, out, pool_path, rec, val_ds, str(dev), tracking=tracking)
    update_env_json(out, jobs=int(jobs))  # students at once
    if jobs > 1:
        _in_parallel(cfg, config_path, out, jobs, str(dev), ema, tracking)
    rows = _stage_students(cfg, out, pool_path, rec, student_ds, str(dev), tracking=tracking)
    report = write_study_outputs(cfg, out, rec, rows, argv, tuning=tuning or None)
    sets = {"low-transfer": _teachers_for({"teacher_set": "low-transfer"}, rec),
            "high-transfer": _teachers_for({"teacher_set": "high-transfer"}, rec),
            "single": _teachers_for({"teacher_set": "single"}, rec)}
    return PipelineResult(out=out, config=cfg, teacher_sets=sets, students=rows, report=report)


def study_progress(cfg: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """How far the students of a study are: ``{finished, planned, missing}`` (ids, in study order); a
    student has finished when its ``metrics.json`` exists."""
    ids = [r["id"] for r in student_runs(cfg)]
    missing = [i for i in ids if not (out / "students" / i / "metrics.json").is_file()]
    return {"finished": len(ids) - len(missing), "planned": len(ids), "missing": missing}


def write_study_outputs(cfg: Mapping[str, Any], out: Path, rec: Mapping[str, Any], rows: list[dict[str, Any]],
                        argv: Sequence[str], *, tuning: Mapping[str, Any] | None = None,
                        progress: Mapping[str, Any] | None = None) -> Path:
    """The study's tables (``students.csv``, ``students_detail.csv``), its claim and ``report.md`` from
    the students' rows (the one place that writes them: a whole run and an interim report). With
    ``progress`` (:func:`study_progress`) of an unfinished study, the claim and the report say so."""
    import pandas as pd

    from distill.pipeline.claim import write_claim
    from distill.pipeline.report import write_report

    if not rows:
        raise UserError(f"no student of {out} has finished yet: nothing to report")
    students = pd.DataFrame(rows)
    atomic_write_text(out / "students.csv", students[STUDENT_COLUMNS].to_csv(index=False))
    atomic_write_text(out / "students_detail.csv", students.to_csv(index=False))
    claim = write_claim(out, cfg, rec, students, progress=progress)
    report = write_report(out, cfg, rec, students, argv, claim=claim, tuning=tuning, progress=progress)
    _status("report", f"wrote {report}" + (f" (interim: {progress['finished']} of {progress['planned']} students)"
                                           if progress and progress["missing"] else ""))
    return report


def start_run(cfg: Mapping[str, Any], out: Path, *, resume: bool, force: bool, device: str,
              command: Sequence[str] | None) -> tuple[Any, Any, list[str]]:
    """Claim and initialize a study's run directory (the one place that does): check ``--resume`` /
    ``--force``, load the dataset before anything is written, write ``config.yaml``, ``env.json`` and
    ``command.txt``. Returns ``(device, dataset, argv)``."""
    from transfer_analysis.data import load_dataset
    from transfer_analysis.rundir import check_run_dir

    check_run_dir(out, resume=resume, force=force, what="study run")
    dev = resolve_device(device)
    ds = load_dataset(cfg["dataset"], cfg["data_root"])  # before anything is written: a bad dataset leaves no dir
    if resume:
        _check_resume(out, cfg)
    prepare_out_dir(out, resume=resume, force=force)
    write_run_config(out, _comparable(cfg, out))
    write_env_json(out, dev)
    argv = list(command) if command is not None else ["darht", *sys.argv[1:]]
    atomic_write_text(out / "command.txt", shlex.join(argv) + "\n")
    return dev, ds, argv


def _dry_run_checks(cfg: Mapping[str, Any]) -> None:
    """Check, without data or training, that every model builds at the dataset's shape and that every
    method and attack exists (a dry run loads no dataset, so it works offline)."""
    import torch

    from distill.evaluation import parse_attacks
    from distill.methods import list_methods
    from distill.student import build_student
    from transfer_analysis.data import dataset_shape
    from transfer_analysis.models import PoolEntry, build_pool_model, merge_implied_kwargs

    in_chans, size, classes = dataset_shape(cfg["dataset"])
    for spec in cfg["pool"]:
        entry = PoolEntry(**{k: v for k, v in spec.items() if k != "train"})
        if entry.checkpoint and not Path(entry.checkpoint).is_file():
            raise UserError(f"pool model {entry.name!r}: checkpoint not found: {entry.checkpoint}")
        entry.checkpoint = None  # shapes only: the weights are checked when the run loads them
        entry.pretrained, entry.pretrained_file, entry.num_classes = False, None, None
        with torch.random.fork_rng(devices=[]):
            build_pool_model(entry, classes, in_chans, size, warn_random=False)
    n_teachers = max((cfg["recommend"]["k"] if r["teacher_set"] != "single" else 1) for r in cfg["students"]["runs"])
    for arch in cfg["students"]["archs"]:
        with torch.random.fork_rng(devices=[]):
            kwargs = merge_implied_kwargs(cfg["students"]["kwargs"], "students.kwargs", in_chans=in_chans,
                                          num_classes=classes)
            student = build_student(arch, classes, n_teachers, in_chans=in_chans, image_size=size, **kwargs)
            student.eval()(torch.rand(1, in_chans, size, size))
    methods = set(list_methods())
    for run in cfg["students"]["runs"]:
        if run["method"] not in methods:
            raise UserError(f"students.runs: method {run['method']!r} is not registered ({', '.join(sorted(methods))})")
    parse_attacks(cfg["evaluation"]["attacks"])

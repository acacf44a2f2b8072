"""``darht pipeline --launcher submitit``: a study's array stages submitted with submitit.

The stages are those of :func:`distill.pipeline.jobs.emit_commands` (teachers, matrix shards,
recommend, students, report). Each becomes one submitit job array; the launcher waits for a stage
to finish before it submits the next, and stops at the first stage with a failed task, naming the
task and its log. submitit is an optional extra (``pip install -e ".[submitit]"``), imported only
here; its ``local`` executor runs the same jobs as subprocesses of this machine (how it is tested),
``slurm`` submits them with ``sbatch``.

Example:
    >>> executor_parameters(timeout_min=60, slurm_partition="gpu", gpus_per_node=None)
    {'timeout_min': 60, 'slurm_partition': 'gpu'}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transfer_analysis.errors import UserError

__all__ = ["submit_stages", "run_task", "executor_parameters"]

logger = logging.getLogger(__name__)


def run_task(argv: Sequence[str]) -> int:
    """What one submitit job runs: the ``darht`` command ``argv`` (``argv[0]`` is the program name),
    in the job's own process. A non-zero exit code fails the job."""
    from distill.cli import main

    code = main(list(argv[1:]))
    if code:
        raise RuntimeError(f"{' '.join(argv)} exited with code {code}")
    return code


def executor_parameters(**given: Any) -> dict[str, Any]:
    """submitit's ``update_parameters`` keywords: the given ones that are set (``None``: the default)."""
    return {k: v for k, v in given.items() if v is not None}


def _import_submitit() -> Any:
    try:
        import submitit
    except ImportError as err:
        raise UserError('`launcher` submitit needs the submitit package: pip install -e ".[submitit]"') from err
    return submitit


def submit_stages(stages: Sequence[Any], folder: str | Path, *, cluster: str | None = None,
                  parameters: dict[str, Any] | None = None) -> list[list[str]]:
    """Submit each stage as a job array after the previous one has finished; return the job ids.

    Args:
        stages: :class:`~distill.pipeline.jobs.Stage` objects, in order.
        folder: submitit's folder (each job's pickles and logs, ``JOBID_TASK_log.err``...).
        cluster: ``slurm``, ``local`` or ``debug`` (``None``: submitit's choice, slurm where it exists).
        parameters: ``update_parameters`` keywords (``timeout_min``, ``slurm_partition``, ...).

    Raises:
        UserError: a stage had a failed task (named, with its stderr log); later stages are not submitted.
    """
    submitit = _import_submitit()
    executor = submitit.AutoExecutor(folder=str(Path(folder)), cluster=cluster)
    executor.update_parameters(name="darht", **(parameters or {}))
    ids: list[list[str]] = []
    for k, stage in enumerate(stages, 1):
        jobs = executor.map_array(run_task, stage.argvs)
        ids.append([job.job_id for job in jobs])
        logger.info("[launcher] stage %d (%s): %d job(s) submitted to %s: %s", k, stage.name, len(jobs),
                    executor.cluster, ", ".join(ids[-1]))
        failed = []
        for job, argv in zip(jobs, stage.argvs):
            try:
                job.result()
            except Exception as err:  # submitit re-raises the task's error (or its scheduler's) here
                failed.append((job, argv, err))
        if failed:
            job, argv, err = failed[0]
            raise UserError(f"stage {stage.name}: {len(failed)} of {len(jobs)} job(s) failed; first: job "
                            f"{job.job_id} ({' '.join(argv[-2:])}), log {job.paths.stderr}: "
                            f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")
        logger.info("[launcher] stage %d (%s) finished", k, stage.name)
    return ids

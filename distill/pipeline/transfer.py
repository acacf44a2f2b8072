"""How well each trained student's own adversarial examples transfer to its teachers: the study's
second predictor, measured with the matrix engine (the student as the one source).

Example:
    >>> STUDENT_TRANSFER_FILE
    'student_transfer.json'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transfer_analysis.utils import atomic_write_json

__all__ = ["STUDENT_TRANSFER_FILE", "student_transfer"]

#: per student with teachers: the transfer rate of its own adversarial examples to each teacher
STUDENT_TRANSFER_FILE = "student_transfer.json"


def student_transfer(cfg: Mapping[str, Any], out: Path, run: Mapping[str, Any], teachers: Sequence[str],
                     pool: Mapping[str, Any], ds: Any, device: str) -> dict[str, Any]:
    """How well a trained student's adversarial examples transfer to its teachers: the student is a
    source of the matrix engine (:func:`~transfer_analysis.matrix.transfer_rows`: the matrix attack,
    the matrix's test images and cache), each teacher a target. Written once to the student's
    ``student_transfer.json``; ``mean`` and ``max`` over the teachers."""
    import json
    import math

    from distill.pipeline.runner import matrix_attack
    from distill.student import load_student
    from transfer_analysis.data import load_indices
    from transfer_analysis.matrix import transfer_rows

    run_dir = out / "students" / run["id"]
    path = run_dir / STUDENT_TRANSFER_FILE
    if path.is_file():
        return json.loads(path.read_text())
    idx = load_indices(out / "matrix" / "indices.json")
    source = f"student:{run['id']}"
    models = {source: load_student(run_dir), **{t: pool[t] for t in teachers}}
    attack = matrix_attack(cfg)
    rows = transfer_rows(models, ds.images("test", idx), ds.labels("test", idx), [source], attack,
                         batch_size=cfg["matrix"]["batch_size"], device=device, cache_dir=out / "matrix" / "cache",
                         seed=cfg["seed"], dataset=ds.name, indices=idx)
    values = [r["value"] for r in rows if not math.isnan(r["value"])]
    result = {"attack": attack.to_dict(), "n_images": int(len(idx)),
              "teachers": {r["target"]: {"transfer_rate": r["value"], "k": r["k"], "n": r["n"]} for r in rows},
              "mean": sum(values) / len(values) if values else math.nan, "max": max(values) if values else math.nan}
    atomic_write_json(path, result)
    return result

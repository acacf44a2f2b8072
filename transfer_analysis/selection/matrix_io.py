"""Reading the matrix and the model table: ``transfer_matrix.csv`` and ``models.csv``, validated.

Example:
    >>> import pandas as pd
    >>> T = pd.DataFrame([[1.0, 0.2], [0.4, 1.0]], index=["a", "b"], columns=["a", "b"])
    >>> validate_matrix(T).shape
    (2, 2)
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UserError
from .results import _num

__all__ = ["read_matrix", "read_models_csv", "validate_matrix"]

logger = logging.getLogger("transfer_analysis.selection")

_MATRIX_FILE = "transfer_matrix.csv"
_MODELS_FILE = "models.csv"


_NA = {"", "nan", "na", "n/a", "none", "null"}


def _parse_cell(text: str, where: str) -> float:
    s = text.strip()
    if s.lower() in _NA:
        return math.nan
    try:
        v = float(s)
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a number; every cell must be a transfer rate in [0, 1]") \
            from None
    if math.isinf(v):
        raise UserError(f"{where}: {text!r} is not finite; every cell must be a transfer rate in [0, 1]")
    return v


def _resolve_matrix_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / _MATRIX_FILE
    if not p.is_file():
        raise UserError(f"transfer matrix not found: {p}; pass `matrix` as the directory (holding {_MATRIX_FILE}) "
                        "or the CSV itself, as written by 'darht matrix'")
    return p


def read_matrix(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read ``transfer_matrix.csv`` (a file, or a directory holding it) and ``models.csv`` beside it.

    The CSV has a first column ``source`` and one column per target; cell ``[s, t]`` is the rate
    at which adversarial examples crafted on ``s`` fool ``t``. Columns are reordered to match the
    rows. Anything malformed (non-square, row and column names differ, duplicate or missing names,
    non-numeric cells, a pair empty in both directions, values outside [0, 1]) is a
    :class:`UserError`.

    Args:
        path: the CSV, or a directory holding ``transfer_matrix.csv``.

    Returns:
        ``(matrix, models)``: the square DataFrame (index = sources, columns = targets) and the
        ``models.csv`` table (see :func:`read_models_csv`), or None when there is none.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "transfer_matrix.csv").write_text("source,a,b\\na,1.0,0.25\\nb,0.5,1.0\\n")
        >>> m, models = read_matrix(d)
        >>> float(m.loc["b", "a"]), models is None
        (0.5, True)
    """
    p = _resolve_matrix_path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read transfer matrix {p}: {err}") from err
    if not rows:
        raise UserError(f"transfer matrix {p} is empty; re-create it with 'darht matrix'")
    header = [c.strip() for c in rows[0]]
    if header[0].lower() not in ("source", ""):
        raise UserError(f"transfer matrix {p}: the first column must be 'source' (one row per source model), "
                        f"found {header[0]!r}")
    targets = header[1:]
    if not targets:
        raise UserError(f"transfer matrix {p} has no target columns")
    body = rows[1:]
    sources: list[str] = []
    values: list[list[float]] = []
    for lineno, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise UserError(f"transfer matrix {p} line {lineno}: {len(row)} cells, expected {len(header)} "
                            "(source name plus one per target)")
        sources.append(row[0].strip())
        values.append([_parse_cell(c, f"transfer matrix {p} line {lineno} column {targets[j] or j + 2}")
                       for j, c in enumerate(row[1:])])
    df = pd.DataFrame(values, index=sources, columns=targets, dtype=float)
    matrix = validate_matrix(df, where=f"transfer matrix {p}")
    models = None
    mp = p.parent / _MODELS_FILE
    if mp.is_file():
        models = read_models_csv(mp)
    return matrix, models


def validate_matrix(matrix: pd.DataFrame, where: str = "transfer matrix") -> pd.DataFrame:
    """Check a transfer matrix and return it as floats with columns in row order.

    Args:
        matrix: square DataFrame, index = sources, columns = targets, values in [0, 1].
        where: how messages name the matrix.

    Returns:
        A float copy whose columns follow the index order.

    Raises:
        UserError: non-square, names differ, duplicate or empty names, non-numeric cells, a pair
            empty (NaN) in both directions, values outside [0, 1].

    Example:
        >>> import pandas as pd
        >>> validate_matrix(pd.DataFrame([[1, 0.5], [0.2, 1]], index=["a", "b"], columns=["a", "b"])).shape
        (2, 2)
    """
    if not isinstance(matrix, pd.DataFrame):
        raise UserError(f"{where} must be a pandas DataFrame (index = sources, columns = targets)")
    rows = [str(r).strip() for r in matrix.index]
    cols = [str(c).strip() for c in matrix.columns]
    if not rows:
        raise UserError(f"{where} has no rows")
    for kind, names in (("source", rows), ("target", cols)):
        empty = [i for i, n in enumerate(names) if n == "" or n.lower() == "nan"]
        if empty:
            raise UserError(f"{where}: {kind} name missing at position {empty[0] + 1}; every row and column "
                            "needs a model name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"{where}: duplicate {kind} name(s) {', '.join(dup)}; model names must be unique")
    if len(rows) != len(cols):
        raise UserError(f"{where} is not square: {len(rows)} source rows and {len(cols)} target columns")
    if set(rows) != set(cols):
        only_r = sorted(set(rows) - set(cols))
        only_c = sorted(set(cols) - set(rows))
        raise UserError(f"{where}: row and column names differ (only as sources: {', '.join(only_r) or '-'}; "
                        f"only as targets: {', '.join(only_c) or '-'})")
    df = matrix.copy()
    df.index = rows
    df.columns = cols
    try:
        df = df.apply(pd.to_numeric, errors="raise").astype(float)
    except (ValueError, TypeError) as err:
        raise UserError(f"{where} holds a non-numeric cell ({err}); every cell must be a transfer rate in [0, 1]") \
            from None
    df = df.loc[rows, rows]
    arr = df.to_numpy()
    off = ~np.eye(len(rows), dtype=bool)
    # An empty cell is a transfer rate with no sample to count (no image both models classify correctly
    # and the source's attack fools); the pair score then uses the other direction. A pair empty both
    # ways has no score.
    bad = np.argwhere(off & np.isnan(arr) & np.isnan(arr.T))
    if len(bad):
        i, j = bad[0]
        raise UserError(f"{where}: cells [{rows[i]}, {rows[j]}] and [{rows[j]}, {rows[i]}] are both empty/NaN, so "
                        "the pair has no score; re-create the matrix with more `n_samples`")
    bad = np.argwhere(np.isinf(arr) | (arr < 0) | (arr > 1))
    if len(bad):
        i, j = bad[0]
        raise UserError(f"{where}: cell [{rows[i]}, {rows[j]}] = {arr[i, j]!r} is outside [0, 1]; "
                        "cells are transfer rates (fractions)")
    df.index.name = "source"
    return df


def read_models_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``models.csv``: ``model, clean_acc, whitebox_robust_acc, params`` (+ ``family``, ``arch``).

    Missing columns or empty cells mean unknown. Accuracies must be fractions in [0, 1].

    Returns:
        A DataFrame with one row per model and at least the column ``model``.
    """
    p = Path(path)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise UserError(f"cannot read {p}: {' '.join(str(err).split())}") from err
    return _check_models(df, where=str(p))


def _check_models(models: pd.DataFrame, where: str = "models") -> pd.DataFrame:
    df = models.copy()
    df.columns = [str(c).strip() for c in df.columns]
    if "model" not in df.columns:
        if df.index.name == "model" or (len(df.index) and not isinstance(df.index, pd.RangeIndex)):
            df = df.reset_index().rename(columns={df.index.name or "index": "model"})
        else:
            raise UserError(f"{where} needs a 'model' column (model, clean_acc, whitebox_robust_acc, params)")
    if "whitebox_robust_acc" not in df.columns and "robust_acc" in df.columns:
        df = df.rename(columns={"robust_acc": "whitebox_robust_acc"})
    df["model"] = [str(m).strip() for m in df["model"]]
    if (df["model"] == "").any():
        raise UserError(f"{where}: a row has no model name")
    dup = sorted(set(df["model"][df["model"].duplicated()]))
    if dup:
        raise UserError(f"{where}: duplicate model name(s) {', '.join(dup)}")
    for col in ("clean_acc", "whitebox_robust_acc", "params"):
        if col not in df.columns:
            df[col] = np.nan
            continue
        raw = df[col]
        num = pd.to_numeric(raw.replace({s: np.nan for s in ("", "nan", "NaN", "NA", "None", "null")})
                            if raw.dtype == object else raw, errors="coerce")
        bad = num.isna() & ~raw.isna() & ~raw.astype(str).str.strip().str.lower().isin(_NA)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{where}: {col} of {df['model'].iloc[i]} is {raw.iloc[i]!r}, not a number")
        if col != "params" and ((num < 0) | (num > 1)).any():
            i = int(np.flatnonzero(((num < 0) | (num > 1)).to_numpy())[0])
            raise UserError(f"{where}: {col} of {df['model'].iloc[i]} is {num.iloc[i]}; accuracies are "
                            "fractions in [0, 1]")
        if col == "params" and (num < 0).any():
            raise UserError(f"{where}: params must be >= 0")
        df[col] = num.astype(float)
    for col in ("family", "arch"):
        if col in df.columns:
            df[col] = pd.Series([_label(v) for v in df[col]], index=df.index, dtype=object)
    return df.reset_index(drop=True)


def _label(v: Any) -> str | None:
    """A free-text label (family, arch), or None when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    text = str(v).strip()
    return None if text.lower() in _NA else text


def _attributes(names: Sequence[str], models: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """name -> {clean_acc, robust_acc, params, family, arch} (None when unknown)."""
    out: dict[str, dict[str, Any]] = {n: {"clean_acc": None, "robust_acc": None, "params": None,
                                          "family": None, "arch": None} for n in names}
    if models is None:
        return out
    df = _check_models(models)
    known = set(names)
    extra = sorted(set(df["model"]) - known)
    if extra:
        logger.debug("models.csv lists models that are not in the matrix: %s", ", ".join(extra))
    missing = sorted(known - set(df["model"]))
    if missing:
        logger.warning("models.csv has no row for %s: accuracies and size unknown", ", ".join(missing))
    for row in df.itertuples(index=False):
        if row.model not in known:
            continue
        d = row._asdict()
        out[row.model] = {
            "clean_acc": _num(d.get("clean_acc")),
            "robust_acc": _num(d.get("whitebox_robust_acc")),
            "params": _num(d.get("params")),
            "family": _label(d.get("family")),
            "arch": _label(d.get("arch")),
        }
    return out

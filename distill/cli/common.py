"""Arguments and helpers shared by every ``darht`` subcommand."""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any

from transfer_analysis.errors import UserError


def add_common_arguments(p: argparse.ArgumentParser, offers: tuple[str, ...] = ("device", "seed")) -> None:
    """``--threads`` and ``--log-level`` (every subcommand), and ``--device``/``--seed`` where the
    subcommand uses them (``offers``): a flag either acts or is not offered."""
    g = p.add_argument_group("common")
    if "device" in offers:
        g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or cuda:N")
    if "seed" in offers:
        g.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: DARHT_THREADS, then OMP_NUM_THREADS, then the CPUs this process may "
                        "use: affinity and cgroup quota); on a shared machine 1 avoids a several-fold slowdown")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def add_data_arguments(p: argparse.ArgumentParser, n_samples: int | None = None) -> None:
    """``--dataset``, ``--data-root``, ``--no-download`` and optionally ``--n-samples``."""
    p.add_argument("--dataset", required=True,
                   help="cifar10, cifar100, tiny-imagenet, fashion-mnist, synthetic[:k=v,...], imagefolder:DIR, "
                        "imagenet:DIR (class sub-folders; options after ?, e.g. imagenet:DIR?size=224) or a .npz path")
    p.add_argument("--data-root", default=None, help="where named datasets live (default ~/.cache/darht/data)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the files are missing")
    if n_samples is not None:
        p.add_argument("--n-samples", type=int, default=n_samples,
                       help=f"evaluation images (class-balanced, seeded; default {n_samples})")


_AMOUNT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtTbB]?)[iI]?[bB]?\s*$")


def parse_amount(text: str, flag: str, binary: bool) -> float:
    """``25000000``, ``2.5e7``, ``25M``, ``1.5G`` -> a number (``binary``: K/M/G/T are powers of 1024,
    for bytes; otherwise of 1000, for parameter counts; ``B`` alone means 1e9 there).

    Example:
        >>> parse_amount("25M", "--max-params", binary=False), parse_amount("2G", "--max-model-memory", binary=True)
        (25000000.0, 2147483648.0)
    """
    m = _AMOUNT_RE.match(str(text))
    example = "4G or 4096M" if binary else "25000000, 2.5e7 or 25M"
    if not m:
        raise UserError(f"{flag} must be a number such as {example}, got {text!r}")
    base = 1024.0 if binary else 1000.0
    powers = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "b": 0 if binary else 3}
    value = float(m.group(1)) * base ** powers[m.group(2).lower()]
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"{flag} must be positive, got {text!r}")
    return value


def dir_files(path: str | None, names: tuple[str, ...]) -> list[str]:
    """``path`` itself when it is a file (or missing), else the files a command reads inside it."""
    import os

    if path is None:
        return []
    return [os.path.join(path, n) for n in names] if os.path.isdir(path) else [path]


def parse_json_kwargs(text: str | None, flag: str) -> dict[str, Any]:
    """Parse a ``--*-kwargs`` JSON object; a malformed one is a :class:`UserError`."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} is not valid JSON ({err.msg} at character {err.pos}): {text!r}") from err
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object such as '{{\"drop_rate\": 0.1}}', got {text!r}")
    return value


def require_files(*inputs: tuple[str | None, str]) -> None:
    """Refuse a missing input file before any heavy import (torch, timm): ``(path or None, what)``
    pairs, e.g. ``(args.pool, "pool file")``; the message is the one the loader would give.

    Example:
        >>> try:
        ...     require_files((None, "config file"), ("/nonexistent/p.yaml", "pool file"))
        ... except UserError as err:
        ...     str(err)
        'pool file not found: /nonexistent/p.yaml'
    """
    from pathlib import Path

    for path, what in inputs:
        if path is not None and not Path(path).exists():
            raise UserError(f"{what} not found: {path}")


def dataset_file(name: str | None) -> str | None:
    """The path in a ``--dataset`` value when it names an ``.npz`` file, else ``None``."""
    return name if name is not None and str(name).endswith(".npz") else None

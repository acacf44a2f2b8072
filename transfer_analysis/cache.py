"""On-disk cache of per-source results of the transferability matrix, so runs resume and grow.

For each source model the cache holds

- ``adv/<key>.pt``: its adversarial examples ``x_adv`` (float32, CPU) for one attack config, data
  and seed;
- ``preds/<key>.pt``: the predictions of every target evaluated so far on that ``x_adv``, keyed by
  the *target's* fingerprint, so a model added to the pool only needs its own row (one attack)
  and one evaluation on each existing source's cached ``x_adv``;
- ``clean/<key>.pt``: a model's clean predictions on the data.

Keys are hex SHA-256 digests of the model fingerprint (architecture, wrapper and weight content),
the resolved attack settings, the data (dataset name, sample indices and image content), the seed
and the torchattacks version, so they can never name a path outside the cache directory. Writes
are atomic (temp file, fsync, rename); reads use ``weights_only=True``. A truncated or otherwise
unreadable entry is logged and treated as missing, then rewritten.

Without a directory (``MatrixCache(None)``) predictions are kept in memory for the run only, which
still lets two pool entries with identical weights share their work. With ``background=True``
writes go to one worker thread so disk I/O overlaps the next attack; :meth:`MatrixCache.flush`
waits for them (the engine flushes before reporting a source as done and at the end).

Example:
    >>> import tempfile, torch
    >>> cache = MatrixCache(tempfile.mkdtemp())
    >>> key = MatrixCache.source_key("ab" * 32, "cd" * 32, "ef" * 32, seed=0)
    >>> cache.save_preds(key, {"12" * 32: torch.tensor([1, 0, 2])})
    >>> cache.load_preds(key, n=3)["12" * 32].tolist()
    [1, 0, 2]
    >>> cache.load_adv(key, shape=(3, 1, 2, 2)) is None
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .utils import atomic_torch_save, safe_torch_load

__all__ = ["MatrixCache", "CACHE_VERSION", "data_key", "digest"]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped when the layout or the meaning of an entry changes (old entries are then ignored)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


def digest(*parts: Any) -> str:
    """Hex SHA-256 of JSON-serializable parts (canonical: sorted keys, no spaces).

    Example:
        >>> digest("a", 1) == digest("a", 1) != digest("a", 2)
        True
    """
    blob = json.dumps(list(parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def data_key(x: torch.Tensor, y: torch.Tensor, dataset: str | None = None,
             indices: Sequence[int] | torch.Tensor | None = None) -> str:
    """Identify the evaluation data: dataset name, sample indices and the images' and labels' content.

    Hashing the content as well makes the key safe against two datasets with the same name (two
    ``.npz`` files, synthetic sets with different options).

    Example:
        >>> x, y = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])
        >>> data_key(x, y, "synthetic", [3, 5]) == data_key(x.clone(), y.clone(), "synthetic", [3, 5])
        True
        >>> data_key(x, y, "synthetic", [3, 5]) == data_key(x, y, "synthetic", [3, 6])
        False
    """
    h = hashlib.sha256()
    idx = None if indices is None else [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
    h.update(json.dumps({"dataset": dataset, "indices": idx, "x_shape": list(x.shape), "x_dtype": str(x.dtype),
                         "y_shape": list(y.shape)}, sort_keys=True).encode())
    for t in (x, y):
        arr = t.detach().to("cpu").contiguous()
        if arr.numel():
            h.update(arr.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _ta_version() -> str:
    try:
        import torchattacks

        return str(getattr(torchattacks, "__version__", "unknown"))
    except ImportError:  # pragma: no cover - a dependency of the toolkit
        return "missing"


class MatrixCache:
    """Per-source adversarial examples and predictions, on disk (``root``) or in memory (``None``).

    Args:
        root: cache directory (created on first write), or ``None`` for an in-memory cache.
        background: write entries from a worker thread (call :meth:`flush` / :meth:`close`).
    """

    def __init__(self, root: str | os.PathLike | None, background: bool = False) -> None:
        self.root = Path(root) if root is not None else None
        if self.root is not None and self.root.exists() and not self.root.is_dir():
            raise UserError(f"cache path {self.root} exists and is not a directory; choose another `cache_dir`")
        self._preds: dict[str, dict[str, torch.Tensor]] = {}
        self._clean: dict[str, torch.Tensor] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="matrix-cache") \
            if background and self.root is not None else None
        self._pending: list[Future] = []

    # ---------------------------------------------------------------- background writes
    def _write(self, obj: dict[str, Any], path: Path) -> None:
        """Atomic write, now or queued; ``obj`` must not be modified afterwards."""
        if self._writer is None:
            atomic_torch_save(obj, path)
        else:
            self._pending.append(self._writer.submit(atomic_torch_save, obj, path))

    def flush(self, raise_errors: bool = True) -> None:
        """Wait until every queued write is on disk; re-raise the first failure (or log it)."""
        pending, self._pending = self._pending, []
        first: BaseException | None = None
        for fut in pending:
            err = fut.exception()
            if err is not None:
                if raise_errors and first is None:
                    first = err
                else:
                    logger.warning("cache write failed: %s", err)
        if first is not None:
            raise first

    def close(self, raise_errors: bool = True) -> None:
        """Flush and stop the writer thread."""
        try:
            self.flush(raise_errors)
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    # ---------------------------------------------------------------- keys
    @staticmethod
    def source_key(model_fingerprint: str, attack_key: str, data: str, seed: int) -> str:
        """Key of one source's adversarial examples and target predictions."""
        return digest("source", CACHE_VERSION, model_fingerprint, attack_key, data, int(seed), _ta_version())

    @staticmethod
    def clean_key(model_fingerprint: str, data: str) -> str:
        """Key of one model's clean predictions."""
        return digest("clean", CACHE_VERSION, model_fingerprint, data)

    def _path(self, kind: str, key: str) -> Path:
        if not _HEX64.fullmatch(key):
            raise ValueError(f"cache keys are 64 hex digits, got {key!r}")
        assert self.root is not None
        return self.root / kind / f"{key}.pt"

    # ---------------------------------------------------------------- reading
    def _read(self, kind: str, key: str) -> dict[str, Any] | None:
        if self.root is None:
            return None
        path = self._path(kind, key)
        if not path.is_file():
            return None
        try:
            obj = safe_torch_load(path, what="cache entry", trust_hint=None)
        except (UserError, OSError, RuntimeError, ValueError, EOFError) as err:
            logger.warning("ignoring unreadable cache entry %s (%s); it will be recomputed", path, err)
            return None
        if not isinstance(obj, dict) or obj.get("version") != CACHE_VERSION:
            logger.warning("ignoring cache entry %s (unknown layout); it will be recomputed", path)
            return None
        return obj

    def load_adv(self, key: str, shape: Sequence[int]) -> torch.Tensor | None:
        """The cached adversarial examples of a source, or ``None`` (missing, corrupt, wrong shape)."""
        obj = self._read("adv", key)
        if obj is None:
            return None
        x_adv = obj.get("x_adv")
        if not isinstance(x_adv, torch.Tensor) or tuple(x_adv.shape) != tuple(shape) \
                or x_adv.dtype != torch.float32:
            logger.warning("ignoring cache entry %s (expected float32 %s)", self._path("adv", key), tuple(shape))
            return None
        return x_adv

    def load_preds(self, key: str, n: int) -> dict[str, torch.Tensor]:
        """Target fingerprint -> predictions on a source's ``x_adv`` (empty when nothing is cached)."""
        found = dict(self._preds.get(key, {}))
        obj = self._read("preds", key)
        if obj is not None:
            targets = obj.get("targets")
            if isinstance(targets, Mapping):
                for fp, p in targets.items():
                    if isinstance(fp, str) and _HEX64.fullmatch(fp) and isinstance(p, torch.Tensor) \
                            and p.shape == (n,) and not p.is_floating_point():
                        found.setdefault(fp, p.long())
        self._preds[key] = found
        return dict(found)

    def load_clean(self, key: str, n: int) -> torch.Tensor | None:
        """A model's cached clean predictions, or ``None``."""
        if key in self._clean:
            return self._clean[key]
        obj = self._read("clean", key)
        if obj is None:
            return None
        p = obj.get("preds")
        if not isinstance(p, torch.Tensor) or p.shape != (n,) or p.is_floating_point():
            return None
        self._clean[key] = p.long()
        return self._clean[key]

    # ---------------------------------------------------------------- writing
    def save_adv(self, key: str, x_adv: torch.Tensor, meta: Mapping[str, Any] | None = None) -> None:
        """Store a source's adversarial examples (no-op for an in-memory cache)."""
        if self.root is None:
            return
        self._write({"version": CACHE_VERSION, "x_adv": x_adv.detach().to("cpu", torch.float32).contiguous(),
                     "meta": _plain(meta)}, self._path("adv", key))

    def save_preds(self, key: str, preds: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        """Store target predictions on a source's ``x_adv``, merged with what is already stored."""
        merged = dict(self._preds.get(key, {}))
        if self.root is not None:
            obj = self._read("preds", key)  # another process may have added targets meanwhile
            if obj is not None and isinstance(obj.get("targets"), Mapping):
                for fp, p in obj["targets"].items():
                    if isinstance(fp, str) and _HEX64.fullmatch(fp) and isinstance(p, torch.Tensor):
                        merged.setdefault(fp, p)
        for fp, p in preds.items():
            if not _HEX64.fullmatch(fp):
                raise ValueError(f"target fingerprints are 64 hex digits, got {fp!r}")
            merged[fp] = p.detach().to("cpu", torch.int64)
        self._preds[key] = merged
        if self.root is not None:
            self._write({"version": CACHE_VERSION, "targets": dict(merged), "meta": _plain(meta)},
                        self._path("preds", key))

    def save_clean(self, key: str, preds: torch.Tensor, meta: Mapping[str, Any] | None = None) -> None:
        """Store a model's clean predictions."""
        self._clean[key] = preds.detach().to("cpu", torch.int64)
        if self.root is not None:
            self._write({"version": CACHE_VERSION, "preds": self._clean[key], "meta": _plain(meta)},
                        self._path("clean", key))


def _plain(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metadata reduced to JSON-plain values, so the entry loads with ``weights_only=True``."""
    return json.loads(json.dumps(dict(meta or {}), default=str))

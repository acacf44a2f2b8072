"""``darht matrix`` as a library call: :func:`run_matrix` validates, builds the pool, computes, and
writes the run directory (:func:`save_matrix_outputs`: tables and heatmap).

Example: see :func:`save_matrix_outputs`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed as dist_utils
from ..attacks import AttackConfig
from ..errors import UserError
from ..utils import atomic_write_text, format_eps, resolve_device
from .engine import model_info, transfer_matrix
from .result import TransferResult

__all__ = ["run_matrix", "save_matrix_outputs", "MATRIX_IDENTITY"]

logger = logging.getLogger("transfer_analysis.matrix")


def save_matrix_outputs(result: TransferResult, out_dir: str | Path, heatmap: bool = True) -> dict[str, Path]:
    """Write ``transfer_long.csv``, ``transfer_matrix.csv``, ``models.csv`` and the heatmap (atomically).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> pool = {"a": nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()}
        >>> res = transfer_matrix(pool, torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]), "fgsm")
        >>> sorted(p.name for p in save_matrix_outputs(res, tempfile.mkdtemp(), heatmap=False).values())
        ['models.csv', 'transfer_long.csv', 'transfer_matrix.csv']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"long": out / "transfer_long.csv", "matrix": out / "transfer_matrix.csv", "models": out / "models.csv"}
    atomic_write_text(paths["long"], result.long.to_csv(index=False))
    atomic_write_text(paths["matrix"], result.matrix.to_csv(index=True))
    atomic_write_text(paths["models"], result.models.to_csv(index=False))
    if heatmap:
        from ..plots import plot_heatmap

        title = f"transfer rate: {result.attack.name}, eps {format_eps(result.attack.eps)}, n={len(result.labels)}"
        # the conditional rate's diagonal is 1 by definition: show each model's white-box success there
        whitebox = np.diag(result.metric_matrix("target_error").to_numpy(dtype=float))
        paths["heatmap"] = plot_heatmap(result.matrix, out / "transfer_heatmap.png", title=title, diagonal=whitebox)
    return paths


def _check_matrix_out_dir(out: Path) -> None:
    """Refuse an output directory that holds another command's run."""
    import yaml

    if out.exists() and not out.is_dir():
        raise UserError(f"`out` {out} exists and is not a directory; choose another path")
    config = out / "config.yaml"
    if config.is_file():
        try:
            data = yaml.safe_load(config.read_text())
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict) or data.get("command") != "matrix":
            raise UserError(f"{out} holds another run (its config.yaml is not from 'darht matrix'); "
                            "choose another `out`")


#: the settings that define a matrix: a directory holding one with other values is not overwritten
MATRIX_IDENTITY = ("models", "dataset", "indices_sha256", "seed", "attack")


def _identity(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]`` as the matrix's identity sees it: a ``local-dir:`` model by its folder's name,
    not its path (its weights are in the fingerprint), so a run directory moved with its models is
    the same matrix."""
    value = config.get(key)
    if key != "models" or not isinstance(value, list):
        return value
    return [{**m, "arch": "local-dir:" + Path(m["arch"][len("local-dir:"):]).name}
            if isinstance(m, Mapping) and str(m.get("arch", "")).startswith("local-dir:") else m for m in value]


def _check_same_matrix(out: Path, config: Mapping[str, Any], force: bool) -> None:
    """Refuse to replace the tables of another matrix (other models, data, seed or attack) in ``out``
    unless ``force``; re-running the same matrix into its directory is free (the cache)."""
    import yaml

    path = out / "config.yaml"
    if force or not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        old = {}
    new = yaml.safe_load(yaml.safe_dump(dict(config), sort_keys=False))
    changed = [k for k in MATRIX_IDENTITY if _identity(old, k) != _identity(new, k)]
    if changed:
        raise UserError(f"{out} holds another matrix (different {', '.join(changed)}); choose another `out`, or "
                        "pass `force` to replace its tables")


def run_matrix(pool_path: str | Path, dataset: str | Any, out: str | Path, *, attack: AttackConfig,
               n_samples: int = 1000, batch_size: int = 256, seed: int = 0, device: str | torch.device = "cpu",
               cache_dir: str | Path | None = None, names: Sequence[str] | None = None,
               data_root: str | None = None, download: bool = True, force: bool = False,
               shard: tuple[int, int] | None = None, max_model_bytes: int | None = None) -> TransferResult | None:
    """Everything ``darht matrix`` does: validate, build the pool, compute, write the run directory.

    Args:
        pool_path: the pool YAML file.
        dataset: a dataset name or ``.npz`` path, or an already loaded ``ImageDataset``.
        out: the run directory (re-running into it updates the outputs; the cache makes it cheap).
        attack: the attack settings.
        n_samples: test images (seeded class-balanced subset; all, in order, when at least the test set).
        cache_dir: the per-source cache (default ``out/cache``).
        names: a subset of the pool's models (pool order is kept).
        force: replace the tables of another matrix (other models, data, seed or attack) in ``out``.
        shard: ``(i, n)``: attack only the sources with index ``% n == i`` into the cache (an array
            task; see :func:`transfer_matrix`); writes ``out/shards/I-of-N.json`` instead of the tables
            and returns ``None``.
        max_model_bytes: most bytes of model weights held in memory at once (a
            :class:`~transfer_analysis.models.LazyPool`: models are built when used and the least
            recently used let go). Default: a quarter of the memory available at the start; the
            peak is recorded in ``env.json``.

    Every input is checked before anything is written, so a mistake leaves no output behind.
    """
    from transfer_analysis.data import balanced_subset, load_dataset
    from transfer_analysis.models import open_pool, read_pool_config
    from transfer_analysis.runtime import available_memory

    attack = attack.resolved()
    if batch_size < 1:
        raise UserError(f"`batch_size` must be a positive integer, got {batch_size}")
    if names is not None:
        if not names:
            raise UserError("`models` is empty; give model names, e.g. a,b")
        if len(set(names)) != len(names):
            raise UserError(f"`models` names a model twice: {','.join(names)}")
    out = Path(out)
    from transfer_analysis.rundir import check_output_path

    check_output_path(out)
    _check_matrix_out_dir(out)
    ds = load_dataset(dataset, data_root, download=download) if isinstance(dataset, (str, Path)) else dataset
    indices = balanced_subset(ds.y_test, n_samples, seed=seed)
    entries = read_pool_config(pool_path)
    known = [e.name for e in entries]
    if names is not None and set(names) - set(known):
        unknown = [n for n in names if n not in known]
        raise UserError(f"model(s) {', '.join(unknown)} not in {pool_path}; the pool has {', '.join(known)}")
    # rows/columns in pool order; random-init models get weights from (seed, name) only, so their
    # cached results stay valid whatever subset or order is run
    if max_model_bytes is not None and (isinstance(max_model_bytes, bool) or max_model_bytes < 1):
        raise UserError(f"`max_model_bytes` must be a positive number of bytes, got {max_model_bytes!r}")
    if max_model_bytes is None:
        avail = available_memory()
        max_model_bytes = avail // 4 if avail else None
    pool = open_pool(pool_path, ds.num_classes, ds.in_chans, ds.image_size,
                     names=[e.name for e in entries if names is None or e.name in names], init_seed=seed,
                     data_crop_pct=getattr(getattr(ds, "options", None), "crop_pct", None), max_bytes=max_model_bytes,
                     warn_random=False)

    with dist_utils.process_group(resolve_device(device)):
        return _run_matrix_outputs(pool, ds, dataset, out, pool_path=pool_path, attack=attack, indices=indices,
                                   n_samples=n_samples, batch_size=batch_size, seed=seed, device=device,
                                   cache_dir=cache_dir, data_root=data_root, force=force, shard=shard)


def _run_matrix_outputs(pool: Mapping[str, nn.Module], ds: Any, dataset: str | Any, out: Path, *,
                        pool_path: str | Path, attack: AttackConfig, indices: torch.Tensor, n_samples: int,
                        batch_size: int, seed: int, device: str | torch.device, cache_dir: str | Path | None,
                        data_root: str | None, force: bool = False,
                        shard: tuple[int, int] | None = None) -> TransferResult | None:
    """Write the run directory and compute the matrix (under ``torchrun``: rank 0 writes, all compute)."""
    from transfer_analysis.data import save_indices
    from transfer_analysis.utils import prepare_out_dir, write_env_json, write_run_config

    from ..attacks import attack_record

    main = dist_utils.rank() == 0
    cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
    if main:
        indices_sha = hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()
        config = {
            "command": "matrix",
            "pool": str(Path(pool_path).resolve()),
            "models": [{"name": n, "arch": model_info(pool, n).entry.arch, "family": model_info(pool, n).entry.family,
                        "fingerprint": model_info(pool, n).fingerprint} for n in pool],
            "weights": {n: model_info(pool, n).weights for n in pool},
            "dataset": str(dataset) if isinstance(dataset, (str, Path)) else ds.name, "data_root": data_root,
            "n_samples": n_samples, "n": int(len(indices)), "indices_sha256": indices_sha, "seed": seed,
            "attack": attack.to_dict(), "eps_readable": format_eps(attack.eps), "batch_size": batch_size,
            # what ran: the settings plus the torchattacks class and the defaults it kept
            "attack_ran": attack_record(attack),
            "device": str(device), "cache": str(cache_dir.resolve()), "metrics": ["transfer_rate", "target_error"],
        }
        if dist_utils.world_size() > 1:
            config["processes"] = dist_utils.world_size()
        _check_same_matrix(out, config, force)  # before anything is written
        from transfer_analysis.models import warn_random_weights

        for n in pool:  # after every refusal: a refusal stays one line
            if config["weights"][n] == "random":
                warn_random_weights(n)
        prepare_out_dir(out, resume=True, lock=shard is None)  # array tasks share the directory by design
        if shard is None:
            save_indices(out / "indices.json", indices, dataset=ds.name, split="test", seed=seed)
            write_run_config(out, config)
            write_env_json(out, device)
    dist_utils.barrier()
    logger.info("%d models, %d test images of %s, attack %s", len(pool), len(indices), ds.name, attack.describe())
    result = transfer_matrix(pool, ds.images("test", indices), ds.labels("test", indices), attack,
                             batch_size=batch_size, device=device, cache_dir=cache_dir, seed=seed, dataset=ds.name,
                             indices=indices, shard=shard)
    if result is None:  # a shard: say what it did; the unsharded run writes the tables
        from transfer_analysis.utils import atomic_write_json

        sources = [n for i, n in enumerate(pool) if i % shard[1] == shard[0]]
        if main:
            atomic_write_json(out / "shards" / f"{shard[0]}-of-{shard[1]}.json",
                              {"shard": list(shard), "sources": sources, "cache": str(cache_dir.resolve()),
                               "config": config})
        logger.info("shard %d/%d: sources %s are in the cache %s; run without --shard to assemble the matrix",
                    shard[0], shard[1], ", ".join(sources) or "(none)", cache_dir)
        return None
    if main:
        _record_memory(out, pool, device)
        paths = save_matrix_outputs(result, out)
        logger.info("wrote %s (attacks run: %d, target evaluations: %d, sources fully cached: %d)",
                    ", ".join(p.name for p in paths.values()), result.stats["attacks_run"],
                    result.stats["target_evaluations"], result.stats["sources_from_cache"])
    return result


def _record_memory(out: Path, pool: Mapping[str, nn.Module], device: str | torch.device) -> None:
    """Add the run's peak memory and the pool's residency to ``env.json``."""
    from transfer_analysis.rundir import update_env_json
    from transfer_analysis.runtime import peak_memory

    update_env_json(out, memory={**peak_memory(resolve_device(device)),
                     "max_model_bytes": getattr(pool, "max_bytes", None),
                     "peak_model_bytes_held": getattr(pool, "peak_held_bytes", None),
                     "pool_model_bytes": sum(model_info(pool, n).nbytes for n in pool),
                     "model_builds": getattr(pool, "builds", None)})

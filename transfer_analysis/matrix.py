"""The transferability matrix: attack each source once, evaluate every target on its examples.

For source s and target t on n images, the engine keeps four booleans per sample (DESIGN.md,
Transferability): ``cs``/``ct`` (s/t classify the clean image correctly), ``fs`` (s is fooled by
its own ``x_adv_s``) and ``ft`` (t is fooled by ``x_adv_s``). Every metric is computed from them:

- ``transfer_rate`` (default cell): ``#(cs & ct & fs & ft) / #(cs & ct & fs)``;
- ``target_error``: ``#(ct & ft) / #(ct)``, the DVERGE/Mahmood-style "1 - accuracy" reading;
- more in :data:`METRICS` (``unconditional``, ``trs``), and :func:`register_metric` adds others.

Each cell carries its count n and a 95% Wilson interval (NaN and n = 0 for an empty denominator).
On the diagonal ``transfer_rate`` is 1 by definition and ``target_error[s, s]`` is s's white-box
success rate (what the heatmap draws there). Cost: N attacks, N² evaluation passes and N clean passes, and
with a cache (:mod:`transfer_analysis.cache`) a re-run costs nothing and one added model costs one
attack plus about 2N + 1 evaluation passes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> pool = {n: nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval() for n in ("a", "b")}
    >>> x, y = torch.rand(8, 1, 2, 2), torch.arange(8) % 3
    >>> res = transfer_matrix(pool, x, y, AttackConfig("pgd", eps=0.5, steps=3), batch_size=4)
    >>> list(res.matrix.columns), res.matrix.index.name
    (['a', 'b'], 'source')
    >>> sorted(res.long.metric.unique())
    ['target_error', 'transfer_rate']
    >>> res.stats["attacks_run"]
    2
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import distributed as dist_utils
from .attacks import AttackConfig, build_attack
from .cache import MatrixCache, data_key
from .errors import UserError
from .utils import atomic_write_text, format_eps, progress, resolve_device

__all__ = [
    "TransferResult",
    "transfer_matrix",
    "wilson_interval",
    "source_seed",
    "register_metric",
    "METRICS",
    "DEFAULT_METRICS",
    "save_matrix_outputs",
]

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile."""

DEFAULT_METRICS = ("transfer_rate", "target_error")


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def wilson_interval(k: int | np.ndarray, n: int | np.ndarray, z: float = Z_95) -> tuple[Any, Any]:
    """Wilson score interval for ``k`` successes in ``n`` trials (scalars or arrays).

    ``n = 0`` gives ``(nan, nan)``.

    Example:
        >>> lo, hi = wilson_interval(3, 4)
        >>> round(lo, 4), round(hi, 4)
        (0.3006, 0.9544)
        >>> wilson_interval(0, 0)
        (nan, nan)
    """
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k_arr / n_arr
        z2 = z * z
        denom = 1.0 + z2 / n_arr
        center = (p + z2 / (2 * n_arr)) / denom
        half = z * np.sqrt(p * (1 - p) / n_arr + z2 / (4 * n_arr * n_arr)) / denom
        # exact ends at k = 0 and k = n (the formula gives them up to rounding), so the interval
        # always brackets the estimate
        lo = np.where(k_arr <= 0, 0.0, np.clip(center - half, 0.0, 1.0))
        hi = np.where(k_arr >= n_arr, 1.0, np.clip(center + half, 0.0, 1.0))
        lo = np.where(n_arr > 0, np.minimum(lo, p), np.nan)
        hi = np.where(n_arr > 0, np.maximum(hi, p), np.nan)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


MetricFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
METRICS: dict[str, MetricFn] = {}
"""Metric name -> ``fn(cs, ct, fs, ft) -> (successes, denominator)`` boolean masks.

Arguments broadcast: ``cs`` (S, 1, n), ``ct`` (1, T, n), ``fs`` (S, 1, n), ``ft`` (S, T, n).
"""


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator: add a pairwise metric computed from the four booleans.

    Example:
        >>> @register_metric("both_fooled_demo")
        ... def _m(cs, ct, fs, ft):
        ...     return fs & ft, torch.ones_like(fs & ft)
        >>> "both_fooled_demo" in METRICS
        True
        >>> _ = METRICS.pop("both_fooled_demo")
    """

    def decorator(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return decorator


@register_metric("transfer_rate")
def _transfer_rate(cs, ct, fs, ft):
    """Both clean-correct and the source fooled: fraction that also fools the target."""
    den = cs & ct & fs
    return den & ft, den


@register_metric("target_error")
def _target_error(cs, ct, fs, ft):
    """Target clean-correct: fraction the target gets wrong on the source's examples."""
    return ct & ft, ct.expand_as(ft)


@register_metric("unconditional")
def _unconditional(cs, ct, fs, ft):
    """All samples: fraction that fools the target (TransferAttack's success rate)."""
    return ft, torch.ones_like(ft)


@register_metric("trs")
def _trs(cs, ct, fs, ft):
    """Both clean-correct: fraction that fools both (TRS's definition)."""
    den = (cs & ct).expand_as(ft)
    return den & fs & ft, den


# --------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------
@dataclass
class TransferResult:
    """Predictions, booleans and tables of one transferability run.

    Attributes:
        names: model names, in pool order (rows and columns of every table).
        attack: the resolved attack configuration.
        labels: true labels, shape (n,).
        clean_pred: clean predictions, shape (N, n).
        adv_pred: ``adv_pred[s, t]`` = predictions of model t on ``x_adv_s``, shape (N, N, n).
        params: parameter count per model.
        families, archs: pool labels (``None`` for plain modules).
        fingerprints: content fingerprints (the cache keys' model part).
        stats: work done: ``attacks_run``, ``target_evaluations``, ``clean_evaluations``,
            ``sources_from_cache``.
        long: tidy table (source, target, attack, eps, metric, value, n, ci_low, ci_high).
        matrix: ``transfer_rate`` pivot, index ``source``, one column per target.
        models: per model: clean_acc, whitebox_robust_acc, params, family, arch.
    """

    names: list[str]
    attack: AttackConfig
    labels: torch.Tensor = field(repr=False)
    clean_pred: torch.Tensor = field(repr=False)
    adv_pred: torch.Tensor = field(repr=False)
    params: list[int]
    families: list[str | None]
    archs: list[str | None]
    fingerprints: list[str]
    stats: dict[str, int] = field(default_factory=dict)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    long: pd.DataFrame = field(init=False, repr=False)
    matrix: pd.DataFrame = field(init=False, repr=False)
    models: pd.DataFrame = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.long = self.long_table(self.metrics)
        self.matrix = self.metric_matrix("transfer_rate")
        self.models = self.models_table()

    # ------------------------------------------------------------ booleans
    @property
    def clean_correct(self) -> torch.Tensor:
        """``cs``/``ct``: (N, n) bool."""
        return self.clean_pred == self.labels[None, :]

    @property
    def fooled(self) -> torch.Tensor:
        """``fooled[s, t]``: target t wrong on ``x_adv_s``, (N, N, n) bool; ``fs`` is the diagonal."""
        return self.adv_pred != self.labels[None, None, :]

    def booleans(self, source: str, target: str) -> dict[str, torch.Tensor]:
        """The four per-sample booleans of one pair: ``cs``, ``ct``, ``fs``, ``ft`` (each (n,))."""
        s, t = self._index(source), self._index(target)
        cc, fo = self.clean_correct, self.fooled
        return {"cs": cc[s], "ct": cc[t], "fs": fo[s, s], "ft": fo[s, t]}

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise UserError(f"model {name!r} is not in this result; it has {', '.join(self.names)}") from None

    # ------------------------------------------------------------ metrics
    def counts(self, metric: str = "transfer_rate") -> tuple[np.ndarray, np.ndarray]:
        """Successes and denominators of a metric, each (N, N) int64."""
        if metric not in METRICS:
            raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        cc, fo = self.clean_correct, self.fooled
        idx = torch.arange(len(self.names))
        cs, ct, fs = cc[:, None, :], cc[None, :, :], fo[idx, idx][:, None, :]
        num, den = METRICS[metric](cs, ct, fs, fo)
        return num.sum(-1).numpy().astype(np.int64), den.sum(-1).numpy().astype(np.int64)

    def values(self, metric: str = "transfer_rate") -> np.ndarray:
        """Metric values (N, N), NaN where the denominator is empty."""
        k, n = self.counts(metric)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, k / np.maximum(n, 1), np.nan)

    def metric_matrix(self, metric: str = "transfer_rate") -> pd.DataFrame:
        """Source x target pivot of a metric (index named ``source``)."""
        df = pd.DataFrame(self.values(metric), index=pd.Index(self.names, name="source"), columns=list(self.names))
        return df

    def long_table(self, metrics: Sequence[str] = DEFAULT_METRICS) -> pd.DataFrame:
        """Tidy table: one row per (metric, source, target) with value, n and the Wilson interval."""
        rows: list[dict[str, Any]] = []
        for metric in metrics:
            k, n = self.counts(metric)
            lo, hi = wilson_interval(k, n)
            vals = self.values(metric)
            for i, s in enumerate(self.names):
                for j, t in enumerate(self.names):
                    rows.append({"source": s, "target": t, "attack": self.attack.name, "eps": float(self.attack.eps),
                                 "metric": metric, "value": float(vals[i, j]), "n": int(n[i, j]),
                                 "ci_low": float(lo[i, j]), "ci_high": float(hi[i, j])})
        return pd.DataFrame(rows, columns=["source", "target", "attack", "eps", "metric", "value", "n",
                                           "ci_low", "ci_high"])

    def models_table(self) -> pd.DataFrame:
        """Per model: clean accuracy, white-box robust accuracy (accuracy on its own ``x_adv``), size."""
        idx = torch.arange(len(self.names))
        clean_acc = self.clean_correct.double().mean(-1).tolist()
        robust_acc = (~self.fooled[idx, idx]).double().mean(-1).tolist()
        return pd.DataFrame({"model": self.names, "clean_acc": clean_acc, "whitebox_robust_acc": robust_acc,
                             "params": [int(p) for p in self.params], "family": self.families, "arch": self.archs})


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def source_seed(seed: int, fingerprint: str) -> int:
    """The RNG seed of one source's attack, from the run seed and the source's fingerprint.

    A source's adversarial examples therefore do not depend on the pool order or on which other
    sources came from the cache. The engine calls ``torch.manual_seed(source_seed(...))`` right
    before attacking the source's batches in order.

    Example:
        >>> source_seed(0, "ab" * 32) == source_seed(0, "ab" * 32) != source_seed(1, "ab" * 32)
        True
    """
    return int(hashlib.sha256(f"{int(seed)}:{fingerprint}".encode()).hexdigest()[:15], 16)


def _fingerprint(model: nn.Module) -> str:
    fp = getattr(model, "fingerprint", None)
    if isinstance(fp, str) and len(fp) == 64:
        return fp
    from .pool import model_fingerprint

    return model_fingerprint(model)


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


class _Placement:
    """Keep models on the device only while in use: least-recently-used ones go back to the CPU
    when the next would exceed ``budget`` bytes; everything returns to its original device at the end."""

    def __init__(self, pool: Mapping[str, nn.Module], device: torch.device, budget: int | None) -> None:
        self.pool, self.device, self.budget = pool, device, budget
        self.home = {name: _model_device(m) for name, m in pool.items()}
        self.size = {name: _model_bytes(m) for name, m in pool.items()}
        self.resident: OrderedDict[str, None] = OrderedDict()

    def use(self, name: str) -> nn.Module:
        model = self.pool[name]
        if name in self.resident:
            self.resident.move_to_end(name)
            return model
        if self.budget is not None:
            while self.resident and sum(self.size[n] for n in self.resident) + self.size[name] > self.budget:
                old, _ = self.resident.popitem(last=False)
                self.pool[old].to("cpu")
        model.to(self.device)
        self.resident[name] = None
        return model

    def is_resident(self, name: str) -> bool:
        return name in self.resident

    def release(self) -> None:
        for name in list(self.resident):
            self.pool[name].to(self.home[name])
        self.resident.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _default_budget(device: torch.device, reserve: int) -> int | None:
    if device.type != "cuda":
        return None  # CPU (and unified-memory MPS): moving is free or meaningless
    free, _ = torch.cuda.mem_get_info(device)
    return max(int(0.5 * (free - reserve)), 0)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was = model.training
    if not was:  # pool models are frozen in eval mode: skip the walk over every submodule
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted classes of ``model`` on ``x`` (already on the model's device), int64 on the CPU."""
    out = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(x), batch_size):
            out.append(model(x[start:start + batch_size]).argmax(1))
    return torch.cat(out).to("cpu", torch.int64) if out else torch.empty(0, dtype=torch.int64)


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _attack_source(model: nn.Module, cfg: AttackConfig, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                   seed: int, device: torch.device, desc: str) -> torch.Tensor:
    """``x_adv`` of one source, batch by batch, fp32, RNG seeded with ``seed`` (restored afterwards)."""
    with _eval_mode(model), torch.inference_mode():
        num_classes = int(model(x[:1]).shape[1])
    out = torch.empty_like(x)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), _fp32(device):
        torch.manual_seed(seed)
        atk = build_attack(cfg, model, num_classes=num_classes, seed=seed)
        for start in progress(range(0, len(x), batch_size), desc=f"attack {desc}", unit="batch"):
            stop = start + batch_size
            out[start:stop] = atk(x[start:stop], y[start:stop]).detach()
    return out


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------
def transfer_matrix(pool: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                    attack: AttackConfig | str = "pgd", *, batch_size: int = 256,
                    device: str | torch.device = "cpu", cache_dir: str | Path | None = None, seed: int = 0,
                    dataset: str | None = None, indices: Sequence[int] | torch.Tensor | None = None,
                    max_resident_bytes: int | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
                    on_source_done: Callable[[str], None] | None = None,
                    shard: tuple[int, int] | None = None) -> TransferResult | None:
    """Attack each source once and evaluate every target on its adversarial examples.

    Args:
        pool: name -> model taking [0, 1] images and returning logits (pool models normalize
            inside ``forward``); kept in order for rows and columns.
        x: images in [0, 1], (n, C, H, W), on the CPU.
        y: labels, (n,).
        attack: an :class:`~transfer_analysis.attacks.AttackConfig` or a name (default settings).
        batch_size: images per attack and evaluation batch.
        device: where attacks and evaluations run; each model is moved there only while in use.
        cache_dir: directory of the per-source cache (``None``: in memory, for this run only).
        seed: run seed; each source's attack is seeded with :func:`source_seed` (seed, fingerprint).
        dataset, indices: what ``x`` is (name and sample indices), part of the cache key with
            the content of ``x`` and ``y``.
        max_resident_bytes: most model bytes on the device at once (default: unlimited on CPU,
            half the free memory on CUDA); 0 moves every model back to the CPU after each use.
        metrics: metrics of the long table.
        on_source_done: called with each source's name once its row is complete (and cached).
        shard: ``(i, n)``: an array task of a cluster job; only the sources with index ``% n == i``
            are attacked (and every target evaluated on them) into ``cache_dir``, and ``None`` is
            returned. A run without ``shard`` over the same cache then assembles the whole matrix
            with no new attack, identical to an unsharded run.

    Under ``torchrun`` (an initialized process group of more than one process) the sources are
    shared out, source ``i`` to rank ``i % world``; each rank attacks its sources and evaluates
    every target on them, then the predictions are gathered, so every rank returns the whole
    result (``stats`` summed over the ranks). The cache directory must then be on a filesystem
    every rank sees; ranks write different source keys (clean predictions may be written by
    several ranks, atomically and with the same content).

    Returns:
        A :class:`TransferResult` with the predictions, the booleans and the tables.

    Raises:
        UserError: bad inputs (shapes, labels, batch size, attack settings).

    Example: see the module docstring.
    """
    dev = dist_utils.rank_device(resolve_device(device))
    world, rank = dist_utils.world_size(), dist_utils.rank()
    cfg = (AttackConfig(attack) if isinstance(attack, str) else attack).resolved()
    names = list(pool)
    if not names:
        raise UserError("the pool is empty; give at least one model")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size!r}")
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"unknown metric {m!r}; choose one of {', '.join(METRICS)}")
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    y = torch.as_tensor(y).detach().to("cpu", torch.int64)
    if x.ndim != 4 or y.shape != (len(x),) or len(x) == 0:
        raise UserError(f"expected images (n, C, H, W) and n labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise UserError("images must be in [0, 1] (pool models normalize inside forward)")
    n = len(y)
    if shard is not None:
        i_shard, n_shards = shard
        if not (isinstance(i_shard, int) and isinstance(n_shards, int) and 0 <= i_shard < n_shards):
            raise UserError(f"shard must be I/N with 0 <= I < N, got {i_shard}/{n_shards}")
        if cache_dir is None:
            raise UserError("a shard writes its rows to the cache for a later run to assemble: give a cache "
                            "directory")

    fps = [_fingerprint(pool[name]) for name in names]
    dkey = data_key(x, y, dataset, indices)
    akey = cfg.key()
    cache = MatrixCache(cache_dir, background=True)  # disk writes overlap the next attack
    reserve = 2 * x.numel() * x.element_size()
    placement = _Placement(pool, dev, max_resident_bytes if max_resident_bytes is not None
                           else _default_budget(dev, reserve))
    stats = {"attacks_run": 0, "target_evaluations": 0, "clean_evaluations": 0, "sources_from_cache": 0}
    clean: dict[str, torch.Tensor] = {}
    rows: dict[str, dict[str, torch.Tensor]] = {}
    x_dev = x.to(dev)
    y_dev = y.to(dev)
    logger.info("transfer matrix: %d models, %d images, %s, cache %s", len(names), n, cfg.describe(),
                cache_dir if cache_dir is not None else "in memory")

    def ensure_clean(name: str, fp: str) -> None:
        if fp in clean:
            return
        ck = MatrixCache.clean_key(fp, dkey)
        cached = cache.load_clean(ck, n)
        if cached is None:
            cached = _predict(placement.use(name), x_dev, batch_size)
            cache.save_clean(ck, cached, {"model": name, "fingerprint": fp, "dataset": dataset})
            stats["clean_evaluations"] += 1
        clean[fp] = cached

    finished = False
    try:
        mine = [(i, s) for i, s in enumerate(names) if i % world == rank
                and (shard is None or i % shard[1] == shard[0])]
        for i, s in progress(mine, desc="sources", unit="model"):
            t0 = time.perf_counter()
            fp_s = fps[i]
            skey = MatrixCache.source_key(fp_s, akey, dkey, seed)
            meta = {"source": s, "fingerprint": fp_s, "attack": cfg.to_dict(), "dataset": dataset, "seed": seed}
            preds = cache.load_preds(skey, n)
            ensure_clean(s, fp_s)
            missing: dict[str, str] = {}  # fingerprint -> a target name with that fingerprint
            for t, fp_t in zip(names, fps):
                if fp_t not in preds and fp_t not in missing:
                    missing[fp_t] = t
            attacked = False
            if missing:
                x_adv = cache.load_adv(skey, tuple(x.shape))
                if x_adv is None:
                    x_adv = _attack_source(placement.use(s), cfg, x_dev, y_dev, batch_size,
                                           source_seed(seed, fp_s), dev, s)
                    cache.save_adv(skey, x_adv.to("cpu"), meta)
                    stats["attacks_run"] += 1
                    attacked = True
                x_adv_dev = x_adv.to(dev)
                # targets already on the device first, so fewer models move
                order = sorted(missing.items(), key=lambda kv: not placement.is_resident(kv[1]))
                for fp_t, t in progress(order, desc=f"targets of {s}", unit="model"):
                    preds[fp_t] = _predict(placement.use(t), x_adv_dev, batch_size)
                    stats["target_evaluations"] += 1
                    ensure_clean(t, fp_t)
                cache.save_preds(skey, {fp: preds[fp] for fp in missing}, meta)
                del x_adv, x_adv_dev
            else:
                stats["sources_from_cache"] += 1
            rows[fp_s] = preds
            wb = preds[fp_s] != y
            cs = clean[fp_s] == y
            k, d = int((wb & cs).sum()), int(cs.sum())
            logger.info("source %d/%d %s: white-box success %s (n=%d), robust acc %.4f; %s, %d target(s) "
                        "evaluated, %.1fs", i + 1, len(names), s, f"{k / d:.4f}" if d else "nan", d,
                        float((~wb).double().mean()), "attacked" if attacked else
                        ("adv. examples from cache" if missing else "all from cache"), len(missing),
                        time.perf_counter() - t0)
            if on_source_done is not None:
                cache.flush()  # the row is on disk before anyone is told it is done
                on_source_done(s)
        if shard is not None:  # an array task: its rows are in the cache, another run assembles them
            finished = True
            return None
        if world > 1:
            _gather_rows(rows, clean, stats)
        for name, fp in zip(names, fps):
            ensure_clean(name, fp)
        finished = True
    finally:
        placement.release()
        cache.close(raise_errors=finished)  # on an error, still finish the queued writes

    clean_pred = torch.stack([clean[fp] for fp in fps])
    adv_pred = torch.stack([torch.stack([rows[fs][ft] for ft in fps]) for fs in fps])
    from .pool import count_params

    entries = [getattr(pool[name], "entry", None) for name in names]
    return TransferResult(
        names=names, attack=cfg, labels=y, clean_pred=clean_pred, adv_pred=adv_pred,
        params=[count_params(pool[name]) for name in names],
        families=[getattr(e, "family", None) for e in entries],
        archs=[getattr(e, "arch", None) or type(pool[name]).__name__ for e, name in zip(entries, names)],
        fingerprints=fps, stats=stats, metrics=tuple(metrics),
    )


def _gather_rows(rows: dict[str, dict[str, torch.Tensor]], clean: dict[str, torch.Tensor],
                 stats: dict[str, int]) -> None:
    """Merge every rank's source rows, clean predictions and counters into this rank's (in place)."""
    parts = dist_utils.all_gather_object(({fp: {t: p.cpu() for t, p in r.items()} for fp, r in rows.items()},
                                          {fp: p.cpu() for fp, p in clean.items()}, dict(stats)))
    totals = dict.fromkeys(stats, 0)
    for their_rows, their_clean, their_stats in parts:
        for fp, row in their_rows.items():
            rows.setdefault(fp, {}).update(row)
        for fp, pred in their_clean.items():
            clean.setdefault(fp, pred)
        for key, value in their_stats.items():
            totals[key] = totals.get(key, 0) + int(value)
    stats.update(totals)


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
        from .plots import plot_heatmap

        title = f"transfer rate: {result.attack.name}, eps {format_eps(result.attack.eps)}, n={len(result.labels)}"
        # the conditional rate's diagonal is 1 by definition: show each model's white-box success there
        whitebox = np.diag(result.metric_matrix("target_error").to_numpy(dtype=float))
        paths["heatmap"] = plot_heatmap(result.matrix, out / "transfer_heatmap.png", title=title, diagonal=whitebox)
    return paths


def _check_matrix_out_dir(out: Path) -> None:
    """Refuse an output directory that holds another command's run."""
    import yaml

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    config = out / "config.yaml"
    if config.is_file():
        try:
            data = yaml.safe_load(config.read_text())
        except yaml.YAMLError:
            data = None
        if not isinstance(data, dict) or data.get("command") != "matrix":
            raise UserError(f"{out} holds another run (its config.yaml is not from 'darht matrix'); "
                            "choose another --out")


#: the settings that define a matrix: a directory holding one with other values is not overwritten
MATRIX_IDENTITY = ("models", "dataset", "indices_sha256", "seed", "attack")


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
    changed = [k for k in MATRIX_IDENTITY if old.get(k) != new.get(k)]
    if changed:
        raise UserError(f"{out} holds another matrix (different {', '.join(changed)}); choose another --out, or "
                        "pass --force to replace its tables")


def run_matrix(pool_path: str | Path, dataset: str | Any, out: str | Path, *, attack: AttackConfig,
               n_samples: int = 1000, batch_size: int = 256, seed: int = 0, device: str | torch.device = "cpu",
               cache_dir: str | Path | None = None, names: Sequence[str] | None = None,
               data_root: str | None = None, download: bool = True, force: bool = False,
               shard: tuple[int, int] | None = None) -> TransferResult | None:
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

    Every input is checked before anything is written, so a mistake leaves no output behind.
    """
    from transfer_analysis.data import balanced_subset, load_dataset
    from transfer_analysis.pool import build_pool_model, read_pool_config

    attack = attack.resolved()
    if batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}")
    if names is not None:
        if not names:
            raise UserError("--models is empty; give comma-separated model names, e.g. --models a,b")
        if len(set(names)) != len(names):
            raise UserError(f"--models names a model twice: {','.join(names)}")
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
    pool = {e.name: build_pool_model(e, ds.num_classes, ds.in_chans, ds.image_size, device="cpu", init_seed=seed)
            for e in entries if names is None or e.name in names}

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
    from transfer_analysis.attacks import attack_record
    from transfer_analysis.data import save_indices
    from transfer_analysis.utils import prepare_out_dir, write_env_json, write_run_config

    main = dist_utils.rank() == 0
    cache_dir = Path(cache_dir) if cache_dir is not None else out / "cache"
    if main:
        indices_sha = hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()
        config = {
            "command": "matrix",
            "pool": str(Path(pool_path).resolve()),
            "models": [{"name": n, "arch": m.entry.arch, "family": m.entry.family, "fingerprint": m.fingerprint}
                       for n, m in pool.items()],
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
        prepare_out_dir(out, resume=True)
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
        paths = save_matrix_outputs(result, out)
        logger.info("wrote %s (attacks run: %d, target evaluations: %d, sources fully cached: %d)",
                    ", ".join(p.name for p in paths.values()), result.stats["attacks_run"],
                    result.stats["target_evaluations"], result.stats["sources_from_cache"])
    return result

"""The engine: attack each source once, evaluate every target on its examples, with a cache.

Cost: N attacks, N² evaluation passes and N clean passes; with a cache
(:mod:`transfer_analysis.cache`) a re-run costs nothing and one added model costs one attack plus
about 2N + 1 evaluation passes. Each source's attack is seeded from the run seed and the source's
fingerprint (:func:`source_seed`), so its examples do not depend on the pool order.

Example: see the package docstring.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import distributed as dist_utils
from ..attacks import AttackConfig, build_attack
from ..cache import MatrixCache, data_key
from ..errors import UserError
from ..models import ModelInfo, count_params
from ..runtime import eval_mode, model_device, resolve_device, seeded
from ..utils import progress
from .metrics import DEFAULT_METRICS, METRICS
from .result import TransferResult

__all__ = ["transfer_matrix", "transfer_rows", "source_seed", "model_info"]

logger = logging.getLogger("transfer_analysis.matrix")


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


def model_info(pool: Mapping[str, nn.Module], name: str) -> ModelInfo:
    """What is known of a pool model (fingerprint, size, entry, weights); a :class:`LazyPool`
    answers from what it recorded when it built the model, a plain mapping from the model."""
    info = getattr(pool, "info", None)
    if callable(info):
        return info(name)
    model = pool[name]
    return ModelInfo(name, _fingerprint(model), count_params(model), _model_bytes(model), getattr(model, "entry", None),
                     getattr(model, "weights", None), bool(getattr(model, "new_head", False)))


def _fingerprint(model: nn.Module) -> str:
    fp = getattr(model, "fingerprint", None)
    if isinstance(fp, str) and len(fp) == 64:
        return fp
    from ..models import model_fingerprint

    return model_fingerprint(model)


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


class _Placement:
    """Keep models on the device only while in use: least-recently-used ones go back to the CPU
    when the next would exceed ``budget`` bytes; everything returns to its original device at the end.

    A model is resident only as the very object the pool gives now: a pool that rebuilds models
    (:class:`~transfer_analysis.models.LazyPool`) hands out a new object after letting one go.
    """

    def __init__(self, pool: Mapping[str, nn.Module], device: torch.device, budget: int | None) -> None:
        self.pool, self.device, self.budget = pool, device, budget
        self.home: dict[str, torch.device] = {}
        self.size: dict[str, int] = {}
        # weak references: a model the pool lets go of is freed (and its device memory with it)
        self.resident: OrderedDict[str, weakref.ref] = OrderedDict()

    def _alive(self) -> None:
        for name in [n for n, ref in self.resident.items() if ref() is None]:
            del self.resident[name]

    def use(self, name: str) -> nn.Module:
        model = self.pool[name]
        ref = self.resident.get(name)
        if ref is not None and ref() is model:
            self.resident.move_to_end(name)
            return model
        self.resident.pop(name, None)  # a stale object the pool has let go of
        self._alive()
        self.home.setdefault(name, model_device(model))
        self.size[name] = _model_bytes(model)
        if self.budget is not None:
            while self.resident and sum(self.size[n] for n in self.resident) + self.size[name] > self.budget:
                old, old_ref = self.resident.popitem(last=False)
                old_model = old_ref()
                if old_model is not None:
                    old_model.to("cpu")
        model.to(self.device)
        self.resident[name] = weakref.ref(model)
        return model

    def is_resident(self, name: str) -> bool:
        """On the device now, or at least held in memory by a lazy pool (no rebuild)."""
        self._alive()
        held = getattr(self.pool, "held", None)
        return name in self.resident or (callable(held) and name in held())

    def release(self) -> None:
        for name, ref in list(self.resident.items()):
            model = ref()
            if model is not None:
                model.to(self.home.get(name, "cpu"))
        self.resident.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _default_budget(device: torch.device, reserve: int) -> int | None:
    if device.type != "cuda":
        return None  # CPU (and unified-memory MPS): moving is free or meaningless
    free, _ = torch.cuda.mem_get_info(device)
    return max(int(0.5 * (free - reserve)), 0)


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted classes of ``model`` on ``x`` (already on the model's device), int64 on the CPU."""
    out = []
    with eval_mode(model), torch.inference_mode():
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
    with eval_mode(model), torch.inference_mode():
        num_classes = int(model(x[:1]).shape[1])
    out = torch.empty_like(x)
    with seeded(seed, device), torch.enable_grad(), _fp32(device):
        atk = build_attack(cfg, model, num_classes=num_classes, seed=seed)
        for start in progress(range(0, len(x), batch_size), desc=f"attack {desc}", unit="batch"):
            stop = start + batch_size
            out[start:stop] = atk(x[start:stop], y[start:stop]).detach()
    return out


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
    world, rank = dist_utils.world_size(), dist_utils.rank()
    names = list(pool)
    x, y = _check_matrix_inputs(names, x, y, batch_size, metrics, shard, cache_dir)
    run = _new_run(pool, x, y, attack, batch_size=batch_size, device=device, cache_dir=cache_dir, seed=seed,
                   dataset=dataset, indices=indices, max_resident_bytes=max_resident_bytes)
    fps = run.fps
    finished = False
    try:
        mine = [(i, s) for i, s in enumerate(names) if i % world == rank
                and (shard is None or i % shard[1] == shard[0])]
        for i, s in progress(mine, desc="sources", unit="model"):
            run.source_row(i, s)
            if on_source_done is not None:
                run.cache.flush()  # the row is on disk before anyone is told it is done
                on_source_done(s)
        if shard is not None:  # an array task: its rows are in the cache, another run assembles them
            finished = True
            return None
        if world > 1:
            _gather_rows(run.rows, run.clean, run.stats)
        for name, fp in zip(names, fps):
            run.ensure_clean(name, fp)
        finished = True
    finally:
        run.placement.release()
        run.cache.close(raise_errors=finished)  # on an error, still finish the queued writes
    return run.result(metrics)


def _new_run(pool: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, attack: AttackConfig | str, *,
             batch_size: int, device: str | torch.device, cache_dir: str | Path | None, seed: int,
             dataset: str | None, indices: Sequence[int] | torch.Tensor | None,
             max_resident_bytes: int | None) -> _Run:
    """The state of one computation over checked inputs: device, attack, fingerprints, cache keys,
    the cache and the device placement (shared by :func:`transfer_matrix` and :func:`transfer_rows`)."""
    dev = dist_utils.rank_device(resolve_device(device))
    cfg = (AttackConfig(attack) if isinstance(attack, str) else attack).resolved()
    names = list(pool)
    reserve = 2 * x.numel() * x.element_size()
    logger.info("transfer matrix: %d models, %d images, %s, cache %s", len(names), len(y), cfg.describe(),
                cache_dir if cache_dir is not None else "in memory")
    return _Run(pool=pool, names=names, fps=[model_info(pool, name).fingerprint for name in names], cfg=cfg, x=x,
                y=y, x_dev=x.to(dev), y_dev=y.to(dev), batch_size=batch_size, device=dev, seed=seed, dataset=dataset,
                dkey=data_key(x, y, dataset, indices), akey=cfg.key(), cache=MatrixCache(cache_dir, background=True),
                placement=_Placement(pool, dev, max_resident_bytes if max_resident_bytes is not None
                                     else _default_budget(dev, reserve)))


def transfer_rows(pool: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, sources: Sequence[str],
                  attack: AttackConfig | str = "pgd", *, metric: str = "transfer_rate", batch_size: int = 256,
                  device: str | torch.device = "cpu", cache_dir: str | Path | None = None, seed: int = 0,
                  dataset: str | None = None, indices: Sequence[int] | torch.Tensor | None = None,
                  max_resident_bytes: int | None = None) -> list[dict[str, object]]:
    """Rows of the matrix for some sources only: each of ``sources`` is attacked (exactly as
    :func:`transfer_matrix` attacks it, same seed, same cache) and every other pool model evaluated
    on its examples; the other models are never attacked.

    This is how a trained student is measured as a source against its teachers: one attack, ``k``
    target evaluations, the metric's one definition.

    Returns:
        One dict per (source, target) pair with ``source``, ``target``, ``metric``, ``value`` (NaN
        when the denominator is empty), ``k`` and ``n`` (successes and denominator).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> pool = {n: nn.Sequential(nn.Flatten(), nn.Linear(12, 3)) for n in ("student", "t1", "t2")}
        >>> rows = transfer_rows(pool, torch.rand(20, 3, 2, 2), torch.randint(0, 3, (20,)), ["student"],
        ...                      AttackConfig("fgsm", eps=0.5))
        >>> [(r["source"], r["target"]) for r in rows]
        [('student', 't1'), ('student', 't2')]
    """
    names = list(pool)
    unknown = [s for s in sources if s not in pool]
    if unknown or not sources:
        raise UserError(f"`sources` must name models of the pool ({', '.join(names)}), got {list(sources)}")
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    x, y = _check_matrix_inputs(names, x, y, batch_size, (metric,), None, cache_dir)
    run = _new_run(pool, x, y, attack, batch_size=batch_size, device=device, cache_dir=cache_dir, seed=seed,
                   dataset=dataset, indices=indices, max_resident_bytes=max_resident_bytes)
    finished = False
    try:
        for s in sources:
            run.source_row(names.index(s), s)
        for name, fp in zip(names, run.fps):  # a row read from the cache leaves the targets' clean ones to do
            run.ensure_clean(name, fp)
        finished = True
    finally:
        run.placement.release()
        run.cache.close(raise_errors=finished)
    out: list[dict[str, object]] = []
    for s in sources:
        fp_s = run.fps[names.index(s)]
        cs, fs = run.clean[fp_s] == y, run.rows[fp_s][fp_s] != y
        for t, fp_t in zip(names, run.fps):
            if t == s:
                continue
            num, den = METRICS[metric](cs, run.clean[fp_t] == y, fs, run.rows[fp_s][fp_t] != y)
            k, n = int(num.sum()), int(den.sum())
            out.append({"source": s, "target": t, "metric": metric, "value": k / n if n else float("nan"),
                        "k": k, "n": n})
    return out


def _check_matrix_inputs(names: Sequence[str], x: torch.Tensor, y: torch.Tensor, batch_size: int,
                         metrics: Sequence[str], shard: tuple[int, int] | None,
                         cache_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of :func:`transfer_matrix`, checked; images as float32 and labels as int64 on the CPU."""
    if not names:
        raise UserError("the pool is empty; give at least one model")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise UserError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"unknown metric {m!r}; choose one of {', '.join(METRICS)}")
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    y = torch.as_tensor(y).detach().to("cpu", torch.int64)
    if x.ndim != 4 or y.shape != (len(x),) or len(x) == 0:
        raise UserError(f"expected images (n, C, H, W) and n labels, got {tuple(x.shape)} and {tuple(y.shape)}")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise UserError("images must be in [0, 1] (pool models normalize inside forward)")
    if shard is not None:
        i_shard, n_shards = shard
        if not (isinstance(i_shard, int) and isinstance(n_shards, int) and 0 <= i_shard < n_shards):
            raise UserError(f"`shard` must be I/N with 0 <= I < N, got {i_shard}/{n_shards}")
        if cache_dir is None:
            raise UserError("a shard writes its rows to the cache for a later run to assemble: give a cache "
                            "directory")
    return x, y


@dataclass
class _Run:
    """One matrix computation: the pool, the data, the cache, and the rows found so far."""

    pool: Mapping[str, nn.Module]
    names: list[str]
    fps: list[str]
    cfg: AttackConfig
    x: torch.Tensor
    y: torch.Tensor
    x_dev: torch.Tensor
    y_dev: torch.Tensor
    batch_size: int
    device: torch.device
    seed: int
    dataset: str | None
    dkey: str
    akey: str
    cache: MatrixCache
    placement: _Placement
    clean: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"attacks_run": 0, "target_evaluations": 0,
                                                           "clean_evaluations": 0, "sources_from_cache": 0})

    def ensure_clean(self, name: str, fp: str) -> None:
        """Clean predictions of model ``name`` (fingerprint ``fp``), from the cache or computed once."""
        if fp in self.clean:
            return
        ck = MatrixCache.clean_key(fp, self.dkey)
        cached = self.cache.load_clean(ck, len(self.y))
        if cached is None:
            cached = _predict(self.placement.use(name), self.x_dev, self.batch_size)
            self.cache.save_clean(ck, cached, {"model": name, "fingerprint": fp, "dataset": self.dataset})
            self.stats["clean_evaluations"] += 1
        self.clean[fp] = cached

    def source_row(self, i: int, s: str) -> None:
        """Row ``s`` of the matrix: every target's predictions on ``x_adv_s`` (attacked only when
        the cache lacks them), each target evaluated once per fingerprint."""
        t0 = time.perf_counter()
        n, fp_s = len(self.y), self.fps[i]
        skey = MatrixCache.source_key(fp_s, self.akey, self.dkey, self.seed)
        meta = {"source": s, "fingerprint": fp_s, "attack": self.cfg.to_dict(), "dataset": self.dataset,
                "seed": self.seed}
        preds = self.cache.load_preds(skey, n)
        self.ensure_clean(s, fp_s)
        missing: dict[str, str] = {}  # fingerprint -> a target name with that fingerprint
        for t, fp_t in zip(self.names, self.fps):
            if fp_t not in preds and fp_t not in missing:
                missing[fp_t] = t
        attacked = False
        if missing:
            x_adv = self.cache.load_adv(skey, tuple(self.x.shape))
            if x_adv is None:
                x_adv = _attack_source(self.placement.use(s), self.cfg, self.x_dev, self.y_dev, self.batch_size,
                                       source_seed(self.seed, fp_s), self.device, s)
                self.cache.save_adv(skey, x_adv.to("cpu"), meta)
                self.stats["attacks_run"] += 1
                attacked = True
            x_adv_dev = x_adv.to(self.device)
            # targets already on the device first, so fewer models move
            order = sorted(missing.items(), key=lambda kv: not self.placement.is_resident(kv[1]))
            for fp_t, t in progress(order, desc=f"targets of {s}", unit="model"):
                preds[fp_t] = _predict(self.placement.use(t), x_adv_dev, self.batch_size)
                self.stats["target_evaluations"] += 1
                self.ensure_clean(t, fp_t)
            self.cache.save_preds(skey, {fp: preds[fp] for fp in missing}, meta)
            del x_adv, x_adv_dev
        else:
            self.stats["sources_from_cache"] += 1
        self.rows[fp_s] = preds
        wb = preds[fp_s] != self.y
        cs = self.clean[fp_s] == self.y
        k, d = int((wb & cs).sum()), int(cs.sum())
        logger.info("source %d/%d %s: white-box success %s (n=%d), robust acc %.4f; %s, %d target(s) "
                    "evaluated, %.1fs", i + 1, len(self.names), s, f"{k / d:.4f}" if d else "nan", d,
                    float((~wb).double().mean()), "attacked" if attacked else
                    ("adv. examples from cache" if missing else "all from cache"), len(missing),
                    time.perf_counter() - t0)

    def result(self, metrics: Sequence[str]) -> TransferResult:
        """The whole matrix as a :class:`TransferResult` (every row and clean prediction present)."""
        fps, pool, names = self.fps, self.pool, self.names
        clean_pred = torch.stack([self.clean[fp] for fp in fps])
        adv_pred = torch.stack([torch.stack([self.rows[fs][ft] for ft in fps]) for fs in fps])
        infos = [model_info(pool, name) for name in names]
        return TransferResult(
            names=names, attack=self.cfg, labels=self.y, clean_pred=clean_pred, adv_pred=adv_pred,
            params=[i.params for i in infos], families=[getattr(i.entry, "family", None) for i in infos],
            archs=[getattr(i.entry, "arch", None) or type(pool[name]).__name__ for i, name in zip(infos, names)],
            fingerprints=fps, stats=self.stats, metrics=tuple(metrics), weights=[i.weights for i in infos],
            new_heads=[i.new_head for i in infos],
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

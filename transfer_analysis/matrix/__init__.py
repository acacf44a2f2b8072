"""The transferability matrix: attack each source once, evaluate every target on its examples.

Modules: :mod:`.metrics` (the metrics and the Wilson interval), :mod:`.result`
(:class:`TransferResult`), :mod:`.engine` (:func:`transfer_matrix`) and :mod:`.run`
(:func:`run_matrix`, the run directory).

For source s and target t on n images, the engine keeps four booleans per sample (docs/design.md,
Transferability): ``cs``/``ct`` (s/t classify the clean image correctly), ``fs`` (s is fooled by
its own ``x_adv_s``) and ``ft`` (t is fooled by ``x_adv_s``). Every metric is computed from them:

- ``transfer_rate`` (default cell): ``#(cs & ct & fs & ft) / #(cs & ct & fs)``;
- ``target_error``: ``#(ct & ft) / #(ct)``, the DVERGE/Mahmood-style "1 - accuracy" reading;
- more in :data:`METRICS` (``unconditional``, ``trs``), and :func:`register_metric` adds others.

Each cell carries its count n and a 95% Wilson interval (NaN and n = 0 for an empty denominator).
On the diagonal ``transfer_rate`` is 1 by definition and ``target_error[s, s]`` is s's white-box
success rate (what the heatmap draws there). Cost: see :mod:`.engine`.

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

from ..attacks import AttackConfig  # noqa: F401 - the docstring's example and earlier imports
from . import engine, metrics, result, run  # noqa: F401 - the submodules
from .engine import _attack_source, _Placement, source_seed, transfer_matrix, transfer_rows  # noqa: F401 - private: tests
from .metrics import DEFAULT_METRICS, METRICS, Z_95, register_metric, wilson_interval
from .result import TransferResult
from .run import MATRIX_IDENTITY, run_matrix, save_matrix_outputs

__all__ = [
    "TransferResult",
    "transfer_matrix",
    "transfer_rows",
    "wilson_interval",
    "source_seed",
    "register_metric",
    "METRICS",
    "DEFAULT_METRICS",
    "Z_95",
    "MATRIX_IDENTITY",
    "run_matrix",
    "save_matrix_outputs",
]

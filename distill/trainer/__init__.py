"""The trainer: one loop for every method (DARHT, its baselines, teacher training).

``train(config, out)`` builds the student, loads and freezes the teachers, and runs the epochs:
SGD with momentum and weight decay (or AdamW), a step (milestones as fractions of training), cosine,
cyclic or constant LR schedule stepped per iteration, the dataset's training augmentation, bf16
autocast on CUDA (attack gradients stay fp32: ``pgd_attack`` turns autocast off), optional
channels_last and ``torch.compile``. Each method's ``step`` returns named loss parts; all of them
are logged.

The run directory (docs/cli.md, ``darht distill``):

- ``config.yaml``: the resolved configuration (every :class:`TrainConfig` field, plus a
  ``resolved`` section: the method's full hyperparameters, the student's spec, the dataset);
- ``env.json``: versions, device, git revision;
- ``summary.csv``: one row per finished epoch: ``epoch`` (1-based), ``lr`` (at the epoch's first
  iteration), ``loss`` and every loss part (batch-size-weighted epoch means), ``train_acc``
  (accuracy of the logits the method trains on: adversarial for PGD-AT, clean for TRADES, see each
  method), ``test_clean_acc`` and ``test_pgd_acc`` on a seeded class-balanced test subset
  (``eval_samples``, indices in ``eval_indices.json``; PGD with ``eval_pgd_steps`` steps of ε/4
  from a uniform start), and ``epoch_time_s``;
- ``checkpoint.pt``: the resume checkpoint (student, optimizer, scheduler, finished epochs, every
  RNG state including the data-order generator, the method's state, the summary rows), written
  atomically after every epoch, tensors and plain types only (loads with ``weights_only=True``);
- ``student.safetensors``: the last epoch's student (no model selection on the test set), with
  its spec in the metadata (:func:`distill.student.load_student`);
- ``metrics.json``: :func:`distill.evaluation.evaluate_robustness` on the test set
  (``final_eval_samples``, default all; indices in ``final_eval_indices.json``; an expensive
  attack can run on a nested class-balanced part of them, ``final_attack_samples``) plus a
  ``training`` section.

``resume=True`` continues from the checkpoint and ends with the same weights as an uninterrupted
run (bit-identical on CPU). A non-finite loss stops training with a :class:`NumericalFault`
naming the epoch and batch; the checkpoint of the last finished epoch is kept.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel over the processes, with
``batch_size`` as the global batch, and rank 0 alone writes the run directory (see :func:`_train`).

Example:
    >>> from transfer_analysis.data import make_synthetic
    >>> import tempfile
    >>> data = make_synthetic(num_classes=3, in_chans=1, image_size=8, n_train=64, n_test=30)
    >>> cfg = {"method": "standard", "student": "resnet18_cifar", "student_kwargs": {"width": 4},
    ...        "dataset": "synthetic", "epochs": 1, "batch_size": 32, "eval_samples": 9,
    ...        "final_attacks": ["clean"], "device": "cpu"}
    >>> result = train(cfg, tempfile.mkdtemp(), dataset=data)
    >>> result.completed, len(result.history), sorted(result.metrics["accuracy"])
    (True, 1, ['clean'])
"""

from . import checkpoint, config, loop  # noqa: F401 - the submodules
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, FINAL_EVAL_STATE
from .config import (
    DEFAULT_FINAL_ATTACKS,
    LR_SCHEDULES,
    OPTIMIZERS,
    NumericalFault,
    TrainConfig,
    TrainResult,
    lr_factor,
    read_config_file,
    resolve_config,
)
from transfer_analysis.runtime import peak_memory  # noqa: F401 - re-exported (the one rule of peak memory)

from .loop import _make_ema, train, train_one_epoch  # noqa: F401 - _make_ema for tests

__all__ = [
    "TrainConfig",
    "TrainResult",
    "NumericalFault",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "DEFAULT_FINAL_ATTACKS",
    "CHECKPOINT_NAME",
    "CHECKPOINT_FORMAT",
    "FINAL_EVAL_STATE",
    "peak_memory",
    "resolve_config",
    "read_config_file",
    "lr_factor",
    "train",
    "train_one_epoch",
]

"""The command line's console: logging, progress bars, signals (no torch, so ``darht --help`` and
refusals answer at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["is_rank_zero", "progress", "setup_logging", "Interrupted", "handle_signals"]


def is_rank_zero() -> bool:
    """True unless this is a non-zero rank of a ``torch.distributed`` job (torch is not imported for it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def progress(iterable: Iterable | None = None, **kwargs: Any):
    """A tqdm bar that is silent when stderr is not a terminal or on non-zero ranks."""
    from tqdm.auto import tqdm

    disable = kwargs.pop("disable", None)
    if disable is None:
        disable = not (sys.stderr.isatty() and is_rank_zero())
    return tqdm(iterable, disable=disable, dynamic_ncols=True, leave=kwargs.pop("leave", False), **kwargs)


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger for the command line (library code only calls ``getLogger``)."""
    level = level if isinstance(level, int) else getattr(logging, str(level).upper(), logging.INFO)
    if not is_rank_zero():  # under torchrun, the other ranks only report problems
        level = max(level, logging.WARNING)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Third-party warnings (deprecations in timm, RobustBench's pkg_resources, ...) go through
    # logging as "py.warnings", shown only with --log-level DEBUG: a refusal stays one line.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.CRITICAL)
    for noisy in ("timm", "huggingface_hub", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)


# --------------------------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: unwind (``finally`` blocks run, atomic writes are dropped).

    A subclass of :class:`KeyboardInterrupt`, so ``except Exception`` never swallows it. The
    ``darht`` command reports it in one line and exits with ``128 + signum`` (130, 143).
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + the signal number."""
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        """``SIGTERM`` or ``SIGINT``."""
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def handle_signals(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` inside the block; restore the old handlers after.

    Work already checkpointed (the last epoch, finished cache entries) stays on disk; a half-written
    file never replaces a good one, because every write goes through :func:`atomic_write`. Outside
    the main thread (where handlers cannot be installed) this does nothing.

    Example:
        >>> import os, signal
        >>> try:
        ...     with handle_signals():
        ...         os.kill(os.getpid(), signal.SIGTERM)
        ... except Interrupted as err:
        ...     err.exit_code
        143
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signal API's signature
        raise Interrupted(signum)

    previous = {}
    for sig in signals:
        previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

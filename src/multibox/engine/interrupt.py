"""Stopping a training run cleanly: SIGINT (Ctrl-C) and SIGTERM (``kill``, a cluster's pre-emption, torchrun)
become a request that training honours at the end of the batch in progress, after writing a resumable
``last.pt`` (:mod:`multibox.engine.fit`). A second Ctrl-C stops at once, without saving."""
from __future__ import annotations

import logging
import signal
import threading

from multibox.errors import MultiboxError

__all__ = ["StopRequest", "TrainingInterrupted"]

logger = logging.getLogger("multibox.train")


class TrainingInterrupted(MultiboxError):
    """Training stopped on a signal after saving its state; the message says where and how to continue.

    ``exit_status``: 128 + the signal's number, the status a shell reports for a process the signal stopped
    (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


class StopRequest:
    """While the ``with`` block runs, the first SIGINT or SIGTERM sets :attr:`signum` (the loop checks
    :attr:`requested` after every batch); a second SIGINT raises ``KeyboardInterrupt`` at once.

    Handlers can only be installed from the main thread: elsewhere (a run started from a worker thread) the block
    runs with the process's own handlers. The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: saving last.pt after this batch, then stopping (Ctrl-C again stops at once, "
                       "without saving)", signal.Signals(signum).name)

"""Stopping cleanly: SIGINT and SIGTERM are deferred to a step boundary and held while a checkpoint is written
(docs/design.md section 6), so that an interrupted run resumes bit-exactly."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal (``signum``: SIGINT for Ctrl-C, SIGTERM from a scheduler or ``kill``)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _deferred_signals(enabled: bool = True) -> Iterator[Callable[[], int]]:
    """Defer SIGINT (Ctrl-C) and SIGTERM to the next step boundary, so that the checkpoint written on interrupt is
    the state after a whole step and resuming stays bit-exact; a second signal interrupts at once. Yields
    ``interrupted()``: the first signal's number, or 0. Only in the main thread of a single process (elsewhere
    the signals act immediately, as usual)."""
    hit: list[int] = []
    if not enabled or not _main_thread():
        yield lambda: 0
        return

    def handler(signum, frame):
        if hit:
            raise Interrupted(f"interrupted again ({signal.Signals(signum).name})", signum)
        hit.append(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield lambda: hit[0] if hit else 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a checkpoint is written (they are delivered right after), so that its files
    are all from one step; a no-op outside the main thread or where signal masks do not exist."""
    if not (_main_thread() and hasattr(signal, "pthread_sigmask")):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

"""Preemption: SIGTERM and the signal submitit sends before a time limit (SIGUSR2) let the loop
finish its step and write a checkpoint; then the process exits with 75 (EX_TEMPFAIL), after
handing the signal to the handler that was there before (submitit's: it requeues the job)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
EX_TEMPFAIL = 75
_previous: dict[int, Any] = {}


@contextmanager
def preemption(signals: tuple[int, ...] = SIGNALS) -> Iterator[Callable[[], int]]:
    """Within the block, a listed signal is only noted; the yielded function returns it (0: none).
    Outside the main thread (where handlers cannot be set) nothing is installed."""
    received = [0]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: received[0]
        return

    def note(signum: int, frame: Any) -> None:
        received[0] = signum

    saved = {s: signal.signal(s, note) for s in signals}
    _previous.update(saved)
    try:
        yield lambda: received[0]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def chain(signum: int) -> None:
    """Call the handler that was installed before :func:`preemption` (submitit requeues there)."""
    handler = _previous.get(signum)
    if callable(handler):
        handler(signum, None)

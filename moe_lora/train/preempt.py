"""Preemption and ^C: SIGTERM, the signal submitit sends before a time limit (SIGUSR2) and SIGINT
let the loop finish its step and write a checkpoint. Then the process exits with 75 (EX_TEMPFAIL)
after handing the signal to the handler that was there before (submitit's: it requeues the job),
or with 130 after a ^C. Outside the loop, :func:`interruptible` turns SIGINT and SIGTERM into
:class:`Interrupted`, which the CLI reports in one line (exit 128 + the signal)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
EX_TEMPFAIL = 75
_previous: dict[int, Any] = {}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM outside the training loop. A ``KeyboardInterrupt``, so that no
    ``except Exception`` (Hydra's, a job's failure record) turns it into a traceback or a failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(name(signum))
        self.signum = signum


def name(signum: int) -> str:
    """``SIGTERM`` for 15 (the number itself where the platform has no name for it)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """After a checkpoint: 130 for ^C (what a shell reports), 75 for a scheduler's signal (the job
    may be requeued)."""
    return 128 + signum if signum == signal.SIGINT else EX_TEMPFAIL


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def interruptible(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` within the block (SIGTERM would otherwise end
    the process without a word); the previous handlers come back after it. Where a handler other
    than Python's default is installed (submitit's), or outside the main thread, nothing changes."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for s in signals:
            if signal.getsignal(s) is defaults.get(s, signal.SIG_DFL):
                saved[s] = signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@contextmanager
def preemption(signals: tuple[int, ...] = SIGNALS, forward: bool = False) -> Iterator[Callable[[], int]]:
    """Within the block, a listed signal is only noted; the yielded function returns it (0: none).
    A second ^C does not wait for the step: it raises :class:`Interrupted`. ``forward``: a
    scheduler's signal is passed on to this process's child processes (the local ranks of
    ``recipe.nproc_per_node``, which a signal sent to this process alone would not reach; a ^C
    reaches them from the terminal, and a second one would stop them before their checkpoint).
    Outside the main thread (where handlers cannot be set) nothing is installed."""
    received = [0]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: received[0]
        return

    def note(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and received[0] == signal.SIGINT:
            raise Interrupted(signum)
        received[0] = signum
        if forward and signum != signal.SIGINT:
            _forward(signum)

    saved = {s: signal.signal(s, note) for s in signals}
    _previous.update(saved)
    try:
        yield lambda: received[0]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _forward(signum: int) -> None:
    """Send ``signum`` to the live child processes (one that just exited is skipped)."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(ProcessLookupError, TypeError):  # gone, or not started (pid None)
            os.kill(child.pid, signum)


def chain(signum: int) -> None:
    """Call the handler that was installed for ``signum`` before :func:`preemption` (submitit
    requeues there). Python's own handlers and :func:`interruptible`'s are not called: the
    checkpoint is written, and the exit code already says why the run stopped."""
    handler = _previous.get(signum)
    if callable(handler) and handler not in (signal.default_int_handler, _raise_interrupted):
        handler(signum, None)

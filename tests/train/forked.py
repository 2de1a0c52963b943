"""``moe-lora train`` in a forked copy of the test process (no re-import: a tiny run costs ~2 s),
for tests that signal or break a run from inside it.

Every run here, forked or in-process, takes one thread (``recipe.threads=1`` after the shared
overrides): a child forked from a parent whose OpenMP team had two threads waits forever at that
team's barrier the first time MKL runs a parallel region (seen in rotary ``cos``: libgomp is not
fork-safe), and runs to be compared bitwise need one thread count. A watchdog ends a child that
hangs anyway, with its stack on stderr, instead of the test session."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import TINY

WATCHDOG_S = 240


def main(args: list[str], cache_dir: Path) -> int:
    """``moe-lora train args`` in this process, on one thread."""
    from moe_lora.cli import main as cli_main

    return cli_main(["train", *args, *TINY, f"cache_dir={cache_dir}", "recipe.threads=1"])


def fresh_signals() -> None:
    """The signal state of a process started from a shell: whatever the test worker holds (a handler
    or a blocked mask that a library, xdist or an earlier test left; the fork inherits both) is
    not what `moe-lora` meets when a user runs it. Once, under xdist, a SIGINT sent to the child
    was never delivered and its run ended 0."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGUSR2})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(s, signal.SIG_DFL)


def in_child(args: list[str], cache_dir: Path, arm: Callable[[], None] = lambda: None, err: Path | None = None) -> int:
    """:func:`main` in a forked child in which ``arm()`` ran (its stderr in ``err``); the child's
    exit status (negative: the signal that ended it)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            import torch

            torch.set_num_threads(1)
            if err is not None:
                os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115  (pytest replaced it)
            faulthandler.dump_traceback_later(WATCHDOG_S, exit=True, file=sys.__stderr__)
            fresh_signals()
            arm()
            code = main(args, cache_dir)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

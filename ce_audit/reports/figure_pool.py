"""Figures drawn on two cores: a forked child draws every other figure while this process draws the rest.

Matplotlib draws on one core, and report.html's figures are drawn after the run, when the cores are
free. Where ``os.fork`` exists and this process may use two cores, a child forked from this process (its
modules, fonts and data already here) draws figures 1, 3, 5 … and sends their results back through a pipe
(pickled); this process draws 0, 2, 4 … meanwhile. The same code draws each figure in either process, so
the PNGs are byte for byte those of one process.

The child is forked with the run's signals held, and lets them through only once it has restored their
default action: SIGINT, SIGTERM or SIGHUP sent to the group end it at once, and the run handles its own as
before. Whatever the child does not deliver (it failed, was killed, or sent something unreadable), this
process draws itself; if this process stops early (an exception, an interruption) the child is killed and
reaped. The child never returns into the caller's code: it leaves through ``os._exit``, and it calls
nothing but the draws (matplotlib and NumPy), so the threads this process may hold (torch's, the
generation pool's) are not needed there.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

from ce_audit.run.interruption import HANDLED, held_signals
from ce_audit.threads import default_threads

T = TypeVar("T")


def draw_all(draws: Sequence[Callable[[], T]]) -> list[T]:
    """``[draw() for draw in draws]``, every other one drawn in a forked child where two cores are here."""
    if len(draws) < 2 or not hasattr(os, "fork") or default_threads() < 2:
        return [draw() for draw in draws]
    theirs = list(range(1, len(draws), 2))
    read_end, write_end = os.pipe()
    with held_signals(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python ≥ 3.12 on fork with threads: see above
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (its coverage is not collected)
            _child(draws, theirs, read_end, write_end)
    os.close(write_end)
    drawn: dict[int, T] = {}
    done = False
    try:
        drawn.update((index, draws[index]()) for index in range(0, len(draws), 2))
        with os.fdopen(read_end, "rb") as pipe:
            read_end = -1
            data = pipe.read()  # up to the child's end: it has written all, or stopped
        done = True
        with contextlib.suppress(Exception):  # nothing, or less than all: drawn here below
            drawn.update(zip(theirs, pickle.loads(data), strict=True))
    finally:
        if read_end >= 0:
            os.close(read_end)
        _reap(pid, kill=not done)
    return [drawn[index] if index in drawn else draws[index]() for index in range(len(draws))]


def _child(draws: Sequence[Callable[[], object]], theirs: list[int], read_end: int, write_end: int) -> None:
    """Draw ``theirs``, write them pickled to ``write_end``, and exit (0 when they were all written)."""
    status = 1
    try:
        os.close(read_end)
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        data = pickle.dumps([draws[index]() for index in theirs])
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)
        status = 0
    finally:
        os._exit(status)


def _reap(pid: int, kill: bool) -> None:
    """Wait for the child to exit; ``kill``: end it first (this process stopped before reading it)."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)

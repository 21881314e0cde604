"""Ctrl-C, SIGTERM and SIGHUP during a sweep or replay: stop between units, keep the work done.

While ``stop_on_signals()`` is active (the CLI's sweep and replay), the first SIGINT, SIGTERM or SIGHUP
(a terminal closed) only records the request, whether it was sent to the process or to its group. A run
checks ``stop_requested()`` at the boundary between its (case, dtype) units and stops there; an isolated
call in flight is dropped with its unit (``Interrupted``). The run returns what it completed, marked
partial, and the CLI writes it and exits 130 (SIGINT), 143 (SIGTERM) or 129 (SIGHUP). Worker processes
leave the run's process group as they start (``held_signals`` keeps the signals from them until then),
so a signal to the group is the run's alone to handle. A second signal exits at once. Outside
``stop_on_signals()`` nothing changes: ``stop_requested()`` is False and signals keep their usual meaning.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ce_audit.printable import plural

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # the signals received while stop_on_signals() is active


class Interrupted(BaseException):
    """Raised where a unit in flight is dropped because the run is stopping (not an implementation's
    failure: a BaseException, so that ``except Exception`` around a call lets it through)."""


@dataclass
class UnitCount:
    """How many of a run's (case, dtype) units were completed."""

    total: int
    done: int = 0


def stop_requested() -> bool:
    """True once SIGINT, SIGTERM or SIGHUP arrived during ``stop_on_signals()``: finish the unit, start
    no other."""
    return bool(_received)


def received_signal() -> int | None:
    """The first signal received (``signal.SIGINT``, ``signal.SIGTERM`` or ``signal.SIGHUP``), or None."""
    return _received[0] if _received else None


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal number (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _handle(signum: int, frame: Any) -> None:
    if _received:  # the second signal: leave now, the partial report is not waited for
        os.write(2, f"ce-audit: {signal_name(signum)} again: stopped at once, nothing written\n".encode())
        os._exit(exit_code(_received[0]))
    _received.append(signum)
    if signum == signal.SIGHUP:
        _leave_the_terminal()


def _leave_the_terminal() -> None:
    """After SIGHUP (the terminal closed): output meant for the terminal goes nowhere, so that writing the
    partial report and its closing lines does not fail on it (a pipe or a file is kept)."""
    for fd in (1, 2):
        try:
            if not os.isatty(fd):
                continue
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except OSError:
            continue


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP ask the run to stop at the next unit boundary."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    _received.clear()
    for signum in HANDLED:
        signal.signal(signum, _handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()  # the run has recorded it in its result (AuditResult.interrupted)


@dataclass(frozen=True)
class Interruption:
    """How a run stopped by SIGINT / SIGTERM ends: a status line on the report (left out when quiet), one
    line for stderr, and the exit code (130 / 143)."""

    status: str
    message: str
    code: int


def interruption_of(result: Any, out: Path) -> Interruption | None:
    """After SIGINT / SIGTERM, during the run (``result.interrupted``) or while its reports were written
    (called within ``stop_on_signals()``): what the report in ``out`` holds; None when no signal came."""
    late = received_signal()
    name = result.interrupted or (signal_name(late) if late else "")
    if not name:
        return None
    done, total = result.units_done, result.units_total
    status = f"partial report: {done} of {plural(total, 'unit')} completed (interrupted by {name})"
    if not result.partial:
        status = f"interrupted by {name} after the last unit: the report is complete"
    what = "the partial report" if result.partial else "the report"
    message = f"interrupted by {name}: {what} of {done} of {plural(total, 'unit')} is in {out}"
    return Interruption(status, message, exit_code(signal.Signals[name].value))


@contextmanager
def held_signals(signals: Iterable[int] = HANDLED) -> Iterator[None]:
    """Within the block, ``signals`` wait (blocked in this thread) and arrive after it: a process started
    here inherits the block, and lets them through once it has left the run's process group."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

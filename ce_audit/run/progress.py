"""Progress of a long audit, on stderr, in the form that fits where it runs.

On a terminal: a Rich bar with the count of units done, the elapsed time and the time left. Elsewhere (a
file, a pipe, a CI log): a plain line every ``interval`` seconds, e.g.
``ce-audit: 840/2470 cases, 4 s elapsed, ~8 s left``. Nothing with ``quiet``. Stdout is never touched, so a
report redirected to a file (``ce-audit sweep > out.txt``) still shows the run moving on the screen.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

PLAIN_INTERVAL_S = 5.0  # seconds between two plain progress lines ($CE_AUDIT_PROGRESS_INTERVAL overrides)


def plain_interval() -> float:
    """Seconds between two plain progress lines: ``$CE_AUDIT_PROGRESS_INTERVAL``, else PLAIN_INTERVAL_S."""
    text = os.environ.get("CE_AUDIT_PROGRESS_INTERVAL", "")
    try:
        value = float(text)
    except ValueError:
        return PLAIN_INTERVAL_S
    return value if value >= 0 else PLAIN_INTERVAL_S


def _duration(seconds: float) -> str:
    """4 s, 2 min 5 s, 1 h 3 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def progress_line(done: float, total: float, elapsed: float, unit: str = "cases") -> str:
    """``ce-audit: 840/2470 cases, 4 s elapsed, ~8 s left`` (the time left from the rate so far, once a
    whole unit is done: the first one carries the start-up, torch's import among it)."""
    text = f"ce-audit: {int(done)}/{int(total)} {unit}, {_duration(elapsed)} elapsed"
    if 1 <= done < total and elapsed > 0:
        text += f", ~{_duration(elapsed * (total - done) / done)} left"
    return text


class PlainProgress:
    """A line on ``stream`` at most every ``interval`` seconds, the first after ``interval``."""

    def __init__(
        self,
        total: float,
        stream: TextIO,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "cases",
    ) -> None:
        self.total, self.stream, self.clock, self.unit = total, stream, clock, unit
        self.interval = plain_interval() if interval is None else interval
        self.done = 0.0
        self.started = clock()
        self.last = self.started

    def advance(self, units: float) -> None:
        self.done += units
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            print(progress_line(self.done, self.total, now - self.started, self.unit), file=self.stream)
            self.stream.flush()


@contextmanager
def progress_reporter(
    total: float, *, quiet: bool = False, stream: TextIO | None = None, unit: str = "cases"
) -> Iterator[Callable[[float], None]]:
    """A callback ``advance(units)`` for the audit, showing progress on ``stream`` (stderr) while open."""
    stream = stream if stream is not None else sys.stderr
    if quiet or total <= 0:
        yield lambda units: None
        return
    if not (hasattr(stream, "isatty") and stream.isatty()):
        yield PlainProgress(total, stream, unit=unit).advance
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("auditing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("elapsed,"),
        TimeRemainingColumn(),
        TextColumn("left"),
        console=Console(file=stream),
        transient=True,
    )
    task = progress.add_task("audit", total=total)
    with progress:
        yield lambda units: progress.advance(task, units)

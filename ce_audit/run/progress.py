"""Progress of a long audit, on stderr, in the form that fits where it runs.

Both count cells, the unit of the summary's closing line (implementations × dtypes × devices × cases). On
a terminal: a Rich bar with the count of cells done, the elapsed time and the time left. Elsewhere (a
file, a pipe, a CI log): a plain line every ``interval`` seconds, e.g.
``ce-audit: 840/2470 cells, 4 s elapsed, ~8 s left``. The time left is shown only once it means something
(``time_left``). Nothing with ``quiet``. Stdout is never touched, so a report redirected to a file
(``ce-audit sweep > out.txt``) still shows the run moving on the screen.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PLAIN_INTERVAL_S = 5.0  # seconds between two plain progress lines ($CE_AUDIT_PROGRESS_INTERVAL overrides)
# The time left is estimated once this fraction of the cells is done and this many seconds have passed:
# before, the rate is that of the first few cells (the start-up, a large vocabulary) and misleads by far.
ESTIMATE_AFTER_FRACTION = 0.1
ESTIMATE_AFTER_S = 3.0


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


def time_left(
    done: float, total: float, elapsed: float, first: tuple[float, float] = (0.0, 0.0)
) -> float | None:
    """Seconds left at the rate since ``first`` (cells done, seconds elapsed at the first report: the
    start-up before it, worker processes and imports, is no part of the rate): (total − done) · (elapsed −
    first[1]) / (done − first[0]). None (not shown) until ESTIMATE_AFTER_FRACTION of the total is done and
    ESTIMATE_AFTER_S have passed, and once all is done."""
    if not 0 < done < total - 1e-6 or done < ESTIMATE_AFTER_FRACTION * total or elapsed < ESTIMATE_AFTER_S:
        return None
    cells, seconds = done - first[0], elapsed - first[1]
    return (total - done) * seconds / cells if cells > 0 and seconds > 0 else None


def _count(value: float) -> int:
    """A count of cells reached by fractions of units: 2469.9999… is 2470."""
    return int(value + 1e-6)


def progress_line(
    done: float, total: float, elapsed: float, unit: str = "cells", first: tuple[float, float] = (0.0, 0.0)
) -> str:
    """``ce-audit: 840/2470 cells, 4 s elapsed, ~8 s left`` (the time left once ``time_left`` gives it)."""
    text = f"ce-audit: {_count(done)}/{_count(total)} {unit}, {_duration(elapsed)} elapsed"
    left = time_left(done, total, elapsed, first)
    if left is not None:
        text += f", ~{_duration(left)} left"
    return text


class PlainProgress:
    """A line on ``stream`` at most every ``interval`` seconds, the first after ``interval``."""

    def __init__(
        self,
        total: float,
        stream: TextIO,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "cells",
    ) -> None:
        self.total, self.stream, self.clock, self.unit = total, stream, clock, unit
        self.interval = plain_interval() if interval is None else interval
        self.done = 0.0
        self.started = clock()
        self.last = self.started
        self.first: tuple[float, float] | None = None  # (cells, seconds) at the first report

    def advance(self, cells: float) -> None:
        self.done += cells
        now = self.clock()
        if self.first is None:
            self.first = (self.done, now - self.started)
        if now - self.last >= self.interval:
            self.last = now
            line = progress_line(self.done, self.total, now - self.started, self.unit, self.first)
            print(line, file=self.stream)
            self.stream.flush()


def time_left_column() -> Any:
    """A Rich column: ``~2 min 5 s left`` once ``time_left`` gives it, ``time left: estimating`` before."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class TimeLeftColumn(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self.first: dict[Any, tuple[float, float]] = {}  # per task: (cells, seconds) first seen moving

        def render(self, task: Any) -> Text:
            elapsed = task.elapsed or 0.0
            if task.completed > 0:
                self.first.setdefault(task.id, (task.completed, elapsed))
            start = self.first.get(task.id, (0.0, 0.0))
            left = time_left(task.completed, task.total or 0.0, elapsed, start)
            return Text("time left: estimating" if left is None else f"~{_duration(left)} left")

    return TimeLeftColumn()


@contextmanager
def progress_reporter(
    total: float, *, quiet: bool = False, stream: TextIO | None = None, unit: str = "cells"
) -> Iterator[Callable[[float], None]]:
    """A callback ``advance(cells)`` for the audit, showing progress on ``stream`` (stderr) while open."""
    stream = stream if stream is not None else sys.stderr
    if quiet or total <= 0:
        yield lambda units: None
        return
    if not (hasattr(stream, "isatty") and stream.isatty()):
        yield PlainProgress(total, stream, unit=unit).advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("auditing"),
        BarColumn(),
        TextColumn(f"{{task.completed:.0f}}/{{task.total:.0f}} {unit}"),
        TimeElapsedColumn(),
        TextColumn("elapsed,"),
        time_left_column(),
        console=Console(file=stream),
        transient=True,
    )
    task = progress.add_task("audit", total=total)
    with progress:
        yield lambda units: progress.advance(task, units)

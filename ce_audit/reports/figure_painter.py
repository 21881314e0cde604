"""report.html's figures drawn by processes started ahead, while the audit runs.

A sweep that will draw figures starts *painters* (``painter_ahead``): ``python -m
ce_audit.reports.figure_painter``, one per dtype that draws figures (``painters_worth``) and per core, two
at most, each of which imports matplotlib and draws a
throwaway figure (fonts, mathtext, colour maps loaded) while this process audits, then waits. When the report
is written, ``FigureDrawing`` sends them every figure to draw (``plots.FigureJob``s, pickled once): the
first draws the list from its start, the second from its end, each figure streamed back as soon as it is
drawn, so that together they are done when they meet (one figure at most is drawn twice). The PNGs are those
the run's process would draw itself, byte for byte (same code, same matplotlib, same environment):
tests/test_figure_painter.py holds it.

Failure costs nothing but time: a painter that cannot start, dies or answers nonsense drops out (the other
draws the whole list); when none answers, or none has delivered a figure for ``STALL_SECONDS``, what is
missing is drawn here. Painters run in their own process group (a Ctrl-C at the terminal does not reach
them), end when their standard input closes (a run that is killed leaves none behind), and are killed and
reaped as soon as the figures are in, and at the end of ``painter_ahead``'s block.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from ce_audit.reports import plots
from ce_audit.results import KEY_COLUMNS, Cell, column_value, with_significant_digits
from ce_audit.threads import default_threads

# Seconds without a figure from any painter after which they count as stalled (a figure takes < 1 s).
STALL_SECONDS = 60.0
# The work (executors.sweep_cost, about 3.6·10⁷ a second on one core) of an audit that lasts as long as a
# painter takes to start and warm up (about 0.8 s).
WARM_UP_COST = 30_000_000
# Painters at most: two draw the list from both ends; a third would have nothing left to start on.
PAINTERS = 2
# How much lower the second painter's priority is than the run's (nice): its start-up and warm-up use what
# CPU the audit and the first painter leave, never theirs (the first, at the run's priority, fits beside the
# run's own start-up on a second core); once the audit is done the run's process waits and they have it all.
NICENESS = 10
# A painter's first statements, before any import: lower its priority by {niceness}, take the run's module
# search path (so that it imports the very modules the run did: this ce_audit, the same matplotlib), then
# run this module.
_BOOTSTRAP = (
    "import os, sys, json; os.nice({niceness}); sys.path[:] = json.loads(os.environ.pop({variable!r})); "
    "import runpy; runpy.run_module('ce_audit.reports.figure_painter', run_name='__main__', alter_sys=True)"
)
_PATH_VARIABLE = "CE_AUDIT_PAINTER_SYS_PATH"
_LENGTH = struct.Struct("<Q")
_ACTIVE: list[PainterPool] = []  # the painters of the run in progress (one pool at most)


def _send(stream: BinaryIO, payload: Any) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    """The next message, or None at the end of the stream (a message cut short counts as the end)."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(header)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None


class _Board:
    """What the painters have delivered, and how many still answer."""

    def __init__(self, painters: int) -> None:
        self.changed = threading.Condition()
        self.figures: dict[int, plots.Figure] = {}
        self.wanted: range = range(0)  # the indices of the request's jobs
        self.alive = painters


class Painter:
    """One painter process; a thread reads what it sends onto the pool's board."""

    def __init__(self, board: _Board, niceness: int = 0) -> None:
        env = {**os.environ, _PATH_VARIABLE: json.dumps(sys.path)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP.format(niceness=niceness, variable=_PATH_VARIABLE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            process_group=0,  # not a session: one would be its own scheduling autogroup, where nice is void
        )  # fmt: skip
        self._board = board
        with board.changed:
            board.alive += 1  # before its reader runs, which counts it out when its output ends
        self._reader = threading.Thread(target=self._read, name="ce-audit-painter", daemon=True)
        self._reader.start()

    def submit(self, order: list[int], jobs: list[plots.FigureJob]) -> None:
        """Ask for ``jobs``' figures, drawn in ``order`` (a painter that cannot take it is closed)."""
        try:
            assert self.process.stdin is not None
            _send(self.process.stdin, (order, jobs))
        except (OSError, ValueError, pickle.PicklingError):
            self.close()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while True:
            try:
                message = _receive(self.process.stdout)
            except Exception:  # noqa: BLE001 - anything unreadable ends this painter's part
                message = None
            with self._board.changed:
                valid = (
                    isinstance(message, tuple) and len(message) == 2 and isinstance(message[1], plots.Figure)
                )
                if valid:
                    self._board.figures.setdefault(*message)
                else:
                    self._board.alive -= 1
                self._board.changed.notify_all()
            if not valid:
                return

    def close(self) -> None:
        """Kill and reap the painter; its reader thread ends with its output."""
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(OSError, ValueError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._reader.join(timeout=5)


class PainterPool:
    """Painters started ahead for one report's figures (used once: killed as soon as those are drawn)."""

    def __init__(self, count: int) -> None:
        self.board = _Board(0)
        self.painters: list[Painter] = []
        for _ in range(count):
            try:
                self.painters.append(Painter(self.board, NICENESS if self.painters else 0))
            except OSError:
                break  # fewer painters (none: the figures are drawn here)
        self.used = False
        self.submitted: list[plots.FigureJob] = []

    def submit(self, jobs: list[plots.FigureJob]) -> bool:
        """Send ``jobs`` to every painter, each its own order (the first from the first job, the second
        from the last), so that together they cover the list in about 1/count of the time."""
        if self.used or not self.painters:
            return False
        self.used = True
        self.submitted = jobs
        with self.board.changed:
            self.board.wanted = range(len(jobs))
        forward = list(range(len(jobs)))
        for number, painter in enumerate(self.painters):
            painter.submit(forward if number % 2 == 0 else forward[::-1], jobs)
        return True

    def collect(self, jobs: list[plots.FigureJob], draw: Callable[[plots.FigureJob], plots.Figure]) -> list:
        """Every job's figure, from the painters while any answers; what they do not deliver (all gone, or
        none heard from in STALL_SECONDS) is drawn here with ``draw``. The painters are closed after."""
        board = self.board
        with board.changed:
            while len(board.figures) < len(jobs) and board.alive > 0:
                if not board.changed.wait(timeout=STALL_SECONDS):
                    break
            delivered = dict(board.figures)
        self.close()
        return [delivered[i] if i in delivered else draw(job) for i, job in enumerate(jobs)]

    def close(self) -> None:
        for painter in self.painters:
            painter.close()
        self.painters = []


def painters_worth(dtype_cases: Iterable[tuple[str, Any]], cost: float) -> int:
    """How many painters started now pay for a sweep of these (dtype, case) pairs, of work ``cost``
    (executors.sweep_cost): one per dtype that will draw figures (two of its cases differ in a dimension a
    figure runs along; a one-case audit draws none) — one painter draws a dtype's three figures in about
    the time the page's own work takes after the audit, and every painter costs matplotlib's import —
    and none unless they will be warm when they are needed (this process has torch's import ahead of it,
    about a second, or the audit's work passes WARM_UP_COST; else the run would wait for them, where a
    process that drew before draws as fast). ``painter_ahead`` caps the number at PAINTERS and the cores."""
    if not plots.plotting_available() or ("torch" in sys.modules and cost < WARM_UP_COST):
        return 0
    dimensions = dict.fromkeys([*plots.DIMENSIONS, *plots.CURVE_DIMENSIONS])
    seen: dict[tuple[str, str], Any] = {}
    drawn: set[str] = set()
    for dtype, case in dtype_cases:
        for dimension in dimensions:
            value = getattr(case, dimension, None)
            if seen.setdefault((dtype, dimension), value) != value:
                drawn.add(dtype)
    return len(drawn)


@contextlib.contextmanager
def painter_ahead(wanted: int) -> Iterator[None]:
    """Painters for the figures drawn inside the block, ``wanted`` of them started now (at most PAINTERS
    and one per core) where this process may use more than one core (on one core they would only take the
    run's time); killed at the block's end."""
    cores = default_threads()
    if wanted < 1 or _ACTIVE or cores < 2:
        yield
        return
    pool = PainterPool(min(wanted, PAINTERS, cores))
    _ACTIVE.append(pool)
    try:
        yield
    finally:
        _ACTIVE.remove(pool)
        pool.close()


def job_key(job: plots.FigureJob) -> tuple[Any, ...]:
    """What a job's figure is drawn from: its kind, dtype, dimension, rtol and each cell's key columns and
    ``plots.FIGURE_FIELDS`` (NaN as the string "nan", so that equal keys mean equal figures)."""

    def plain(value: Any) -> Any:
        return "nan" if isinstance(value, float) and math.isnan(value) else value

    cells = tuple(
        tuple(plain(column_value(cell, name)) for name in KEY_COLUMNS)
        + tuple(plain(getattr(cell, name)) for name in plots.FIGURE_FIELDS)
        for cell in job.cells
    )
    return (job.kind, job.dtype, job.dimension, job.rtol, cells)


def draw_ahead(cells: list[Cell], rtols: dict[str, float]) -> None:
    """Send the figures of ``cells`` (as summary.csv will hold them) to the run's painters now, before the
    last work on the cells that no figure reads (the shown cells' traces): the page's ``FigureDrawing`` then
    collects them if its figures are drawn from the same values (``job_key``), and draws its own if not."""
    if _ACTIVE and not _ACTIVE[0].used:
        _ACTIVE[0].submit(plots.figure_jobs([with_significant_digits(cell) for cell in cells], rtols))


class FigureDrawing:
    """The figures of ``jobs``, sent to the run's painters now (if they run) and collected by
    ``figures()``; drawn here otherwise."""

    def __init__(self, jobs: list[plots.FigureJob]) -> None:
        self.jobs = jobs
        pool = _ACTIVE[0] if _ACTIVE and jobs else None
        if pool is not None and pool.used:  # sent ahead: the same figures, or drawn here
            same = len(pool.submitted) == len(jobs) and all(map(_same_job, pool.submitted, jobs))
            self._pool = pool if same else None
        else:
            self._pool = pool if pool is not None and pool.submit(jobs) else None
        self._figures: list[plots.Figure] | None = None

    def figures(self) -> list[plots.Figure]:
        if self._figures is None:
            if self._pool is None:
                self._figures = [plots.draw_figure(job) for job in self.jobs]
            else:
                self._figures = self._pool.collect(self.jobs, plots.draw_figure)
        return self._figures


def _same_job(sent: plots.FigureJob, wanted: plots.FigureJob) -> bool:
    return sent is wanted or job_key(sent) == job_key(wanted)


def _warm_up() -> None:
    """Draw a throwaway figure with the parts the real ones use (text, mathtext ticks, a log axis, an image,
    a colour bar), so that their one-time costs are paid before the request comes."""
    from ce_audit.reports.figure_layout import text_points

    text_points("10⁻³", 10)
    text_points("warm", 8)
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(2, 1), dpi=plots.DPI)
    axis = figure.subplots()
    image = axis.imshow([[0.0, 1.0]], cmap="viridis")
    axis.text(0, 0, "warm", fontsize=7)
    axis.set_yscale("log")
    figure.colorbar(image)
    figure.suptitle("warm")
    plots._png(figure)


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The painter's loop: each request's figures in its order, each sent as soon as it is drawn; returns
    when ``requests`` ends."""
    _warm_up()
    while True:
        message = _receive(requests)
        if message is None:
            return
        order, jobs = message
        for index in order:
            _send(answers, (index, plots.draw_figure(jobs[index])))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, sys.stdout.buffer)

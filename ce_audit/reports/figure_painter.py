"""report.html's figures drawn by processes started ahead, while the audit runs.

A sweep that will draw figures starts a *painter* (``painter_ahead``): ``python -m
ce_audit.reports.figure_painter``, which imports matplotlib and draws a throwaway figure (fonts, colour maps
loaded) while this process audits, then forks a *sibling* for each further channel the run opened (two
painters at most, one per core): a sibling is as warm as the first for the cost of a fork. When the report
is written, ``FigureDrawing`` sends every painter the figures to draw (``plots.FigureJob``s, pickled once),
then asks each for one at a time: the first from the list's start, the second from its end, each figure
streamed back as soon as it is drawn and the painter asked for the next one left, so that together they
are done when they meet, none drawn twice. The PNGs are those the run's process would draw itself, byte
for byte (same code, same matplotlib, same environment): tests/test_figure_painter.py holds it.

Failure costs nothing but time: a painter that cannot start, dies or answers nonsense drops out (the other
draws the whole list); when none answers, or none has delivered a figure for ``STALL_SECONDS``, what is
missing is drawn here. Painters run in their own process group (a Ctrl-C at the terminal does not reach
them), end when their requests' pipe closes (a run that is killed leaves none behind), and are killed (the
whole group) and reaped as soon as the figures are in, and at the end of ``painter_ahead``'s block.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from ce_audit import collector
from ce_audit.reports import plots
from ce_audit.results import KEY_COLUMNS, Cell, column_value, rounded_cells
from ce_audit.threads import default_threads

# Seconds without a figure from any painter after which they count as stalled (a figure takes < 1 s).
STALL_SECONDS = 60.0
# The work (executors.sweep_cost, about 3.6·10⁷ a second on one core) of an audit that lasts as long as a
# painter takes to start and warm up (about 0.8 s).
WARM_UP_COST = 30_000_000
# Painters at most: two draw the list from both ends; a third would have nothing left to start on.
PAINTERS = 2
# Where the first painter forks its siblings: Linux (elsewhere, where forking a process that has loaded
# system frameworks is not safe, one painter draws every figure).
SIBLINGS_FORKED = sys.platform.startswith("linux")
# A painter's first statements, before any import: take the run's module search path (so that it imports the
# very modules the run did: this ce_audit, the same matplotlib), pause the garbage collector for its start-up
# (ce_audit.collector; ``serve`` resumes it once warm), then run this module.
_BOOTSTRAP = (
    "import os, sys, json; sys.path[:] = json.loads(os.environ.pop({variable!r})); "
    "from ce_audit import collector; collector.pause(); "
    "import runpy; runpy.run_module('ce_audit.reports.figure_painter', run_name='__main__', alter_sys=True)"
)
_PATH_VARIABLE = "CE_AUDIT_PAINTER_SYS_PATH"
# The descriptors of each sibling's channel in the painter, "requests,answers" separated by spaces.
_SIBLINGS_VARIABLE = "CE_AUDIT_PAINTER_SIBLINGS"
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
    """What the painters have delivered, the jobs none has been asked for yet, and how many still answer."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.figures: dict[int, plots.Figure] = {}
        self.pending: list[int] = []  # the request's jobs no painter is drawing, in the page's order
        self.idle: list[Painter] = []  # painters that answer and have nothing to draw
        self.alive = 0

    def next_job(self, painter: Painter) -> int | None:
        """The job ``painter`` draws next (the first one pending, or the last for a painter that works from
        the end), or None: it waits, idle (call with ``changed`` held)."""
        if not self.pending:
            self.idle.append(painter)
            return None
        return self.pending.pop(-1 if painter.from_end else 0)


class Painter:
    """One painter's channel: requests written to it, and a thread that reads what it sends onto the pool's
    board (the first painter's are its standard input and output; a sibling's, pipes it inherited). It is
    sent the jobs once, then asked for one figure at a time: each painter takes the next job as it delivers
    one, so that none is drawn twice, and a job left by a painter that drops out goes to one still there."""

    def __init__(self, board: _Board, requests: BinaryIO, answers: BinaryIO, from_end: bool = False) -> None:
        self.requests, self.answers, self.from_end = requests, answers, from_end
        self.drawing: int | None = None  # the job asked for and not delivered
        self._board = board
        with board.changed:
            board.alive += 1  # before its reader runs, which counts it out when its output ends
        self._reader = threading.Thread(target=self._read, name="ce-audit-painter", daemon=True)
        self._reader.start()

    def submit(self, jobs: bytes) -> None:
        """Send the jobs (pickled) and ask for the first figure this painter draws (if one is left)."""
        with self._board.changed:
            self.drawing = first = self._board.next_job(self)
        self._request((first, jobs))

    def _request(self, message: tuple[int | None, bytes | None]) -> None:
        try:
            _send(self.requests, message)
        except (OSError, ValueError):
            self.close()  # it ends, and its reader hands its job on

    def _read(self) -> None:
        board = self._board
        while True:
            try:
                message = _receive(self.answers)
            except Exception:  # noqa: BLE001 - anything unreadable ends this painter's part
                message = None
            asked: list[tuple[Painter, int]] = []
            with board.changed:
                valid = (
                    isinstance(message, tuple) and len(message) == 2 and isinstance(message[1], plots.Figure)
                )
                if valid:
                    board.figures.setdefault(*message)
                    self.drawing = board.next_job(self)
                    if self.drawing is not None:
                        asked.append((self, self.drawing))
                else:
                    board.alive -= 1
                    if self in board.idle:
                        board.idle.remove(self)
                    if self.drawing is not None and self.drawing not in board.figures:
                        board.pending.insert(0, self.drawing)
                    self.drawing = None
                    while board.pending and board.idle:  # a job left behind: to a painter waiting
                        other = board.idle.pop()
                        other.drawing = board.next_job(other)
                        asked.append((other, other.drawing))  # type: ignore[arg-type]
                board.changed.notify_all()
            for painter, index in asked:
                painter._request((index, None))
            if not valid:
                return

    def close(self) -> None:
        """Close its requests (a painter ends when they do); its reader thread ends with its output."""
        with contextlib.suppress(OSError, ValueError):
            self.requests.close()

    def join(self) -> None:
        self._reader.join(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            self.answers.close()


def _start_painter(channels: int) -> tuple[subprocess.Popen[bytes], list[tuple[BinaryIO, BinaryIO]]]:
    """The painter process, in a process group of its own, and ``channels`` (requests, answers) pairs: its
    standard input and output, then a pair of pipes for each sibling it forks once warm."""
    opened: list[int] = []
    kept: list[tuple[int, int]] = []  # the run's ends
    given: list[tuple[int, int]] = []  # the painter's ends
    try:
        for _ in range(channels - 1):
            request_read, request_write = os.pipe()
            opened += [request_read, request_write]
            answer_read, answer_write = os.pipe()
            opened += [answer_read, answer_write]
            kept.append((request_write, answer_read))
            given.append((request_read, answer_write))
        env = {
            **os.environ,
            _PATH_VARIABLE: json.dumps(sys.path),
            _SIBLINGS_VARIABLE: " ".join(f"{reading},{writing}" for reading, writing in given),
        }
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP.format(variable=_PATH_VARIABLE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            pass_fds=[fd for pair in given for fd in pair],
            process_group=0,  # not a session: one would be its own scheduling autogroup
        )  # fmt: skip
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    for pair in given:
        for fd in pair:
            os.close(fd)
    assert process.stdin is not None and process.stdout is not None
    pairs: list[tuple[BinaryIO, BinaryIO]] = [(process.stdin, process.stdout)]
    pairs += [(os.fdopen(write, "wb"), os.fdopen(read, "rb")) for write, read in kept]
    return process, pairs


class PainterPool:
    """Painters started ahead for one report's figures (used once: killed as soon as those are drawn)."""

    def __init__(self, count: int) -> None:
        self.board = _Board()
        self.painters: list[Painter] = []
        self.process: subprocess.Popen[bytes] | None = None
        if count > 0:
            try:
                self.process, pairs = _start_painter(count)
            except OSError:
                pairs = []  # no painter: the figures are drawn here
            self.painters = [
                Painter(self.board, requests, answers, from_end=number % 2 == 1)
                for number, (requests, answers) in enumerate(pairs)
            ]
        self.used = False
        self.submitted: list[plots.FigureJob] = []

    def submit(self, jobs: list[plots.FigureJob]) -> bool:
        """Send ``jobs`` to every painter: the first draws from the first job on, the second from the last
        back, each taking the next job left as it delivers one, so that together they cover the list in about
        1/count of the time."""
        if self.used or not self.painters:
            return False
        self.used = True
        self.submitted = jobs
        with self.board.changed:
            self.board.pending = list(range(len(jobs)))
        try:
            pickled = pickle.dumps(jobs, protocol=pickle.HIGHEST_PROTOCOL)  # once for every painter
        except (pickle.PicklingError, TypeError, AttributeError):
            self.close()
            return True  # the painters are gone: collect draws every figure here
        for painter in self.painters:
            painter.submit(pickled)
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
        """Kill the painter and its siblings (its process group) and reap it."""
        process, self.process = self.process, None
        if process is not None:
            if process.returncode is None:  # not reaped: its group is still there
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
            for painter in self.painters:
                painter.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        for painter in self.painters:
            painter.close()
            painter.join()
        self.painters = []


def painters_worth(dtype_cases: Iterable[tuple[str, Any]], cost: float) -> int:
    """How many painters started now pay for a sweep of these (dtype, case) pairs, of work ``cost``
    (executors.sweep_cost): as many as it will draw figures (a dtype draws its heatmap where two of its
    cases differ in a dimension a figure runs along, and a curve for each such curve dimension; a one-case
    audit draws none), since a painter after the first costs a fork; and none unless they will be warm when
    they are needed (this process has torch's import ahead of it, about a second, or the audit's work passes
    WARM_UP_COST; else the run would wait for them, where a process that drew before draws as fast).
    ``painter_ahead`` caps the number at PAINTERS and the cores."""
    if not plots.plotting_available() or ("torch" in sys.modules and cost < WARM_UP_COST):
        return 0
    dimensions = dict.fromkeys([*plots.DIMENSIONS, *plots.CURVE_DIMENSIONS])
    seen: dict[tuple[str, str], Any] = {}
    varying: set[tuple[str, str]] = set()
    for dtype, case in dtype_cases:
        for dimension in dimensions:
            value = getattr(case, dimension, None)
            if seen.setdefault((dtype, dimension), value) != value:
                varying.add((dtype, dimension))
    heatmaps = {dtype for dtype, _ in varying}
    return len(heatmaps) + sum(dimension in plots.CURVE_DIMENSIONS for _, dimension in varying)


@contextlib.contextmanager
def painter_ahead(wanted: int) -> Iterator[None]:
    """Painters for the figures drawn inside the block, ``wanted`` of them (at most PAINTERS and one per
    core: one process, and on Linux the siblings it forks once warm) started now where this process may
    use more than one core (on one core they would only take the run's time); killed at the block's end."""
    cores = default_threads()
    if wanted < 1 or _ACTIVE or cores < 2:
        yield
        return
    pool = PainterPool(min(wanted, PAINTERS if SIBLINGS_FORKED else 1, cores))
    _ACTIVE.append(pool)
    try:
        yield
    finally:
        _ACTIVE.remove(pool)
        pool.close()


def _plain(value: Any) -> Any:
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def cell_key(cell: Cell) -> tuple[Any, ...]:
    """What a figure reads of a cell: its key columns and ``plots.FIGURE_FIELDS`` (NaN as the string "nan",
    so that equal keys mean equal figures)."""
    return tuple(_plain(column_value(cell, name)) for name in KEY_COLUMNS) + tuple(
        _plain(getattr(cell, name)) for name in plots.FIGURE_FIELDS
    )


def job_key(job: plots.FigureJob) -> tuple[Any, ...]:
    """What a job's figure is drawn from: its kind, dtype, dimension, rtol and each cell's ``cell_key``."""
    return (job.kind, job.dtype, job.dimension, job.rtol, tuple(cell_key(cell) for cell in job.cells))


def draw_ahead(cells: list[Cell], rtols: dict[str, float]) -> None:
    """Send the figures of ``cells`` (as summary.csv will hold them) to the run's painters now, before the
    last work on the cells that no figure reads (the shown cells' traces): the page's ``FigureDrawing`` then
    collects them if its figures are drawn from the same values (``job_key``), and draws its own if not."""
    if _ACTIVE and not _ACTIVE[0].used:
        _ACTIVE[0].submit(plots.figure_jobs(rounded_cells(cells), rtols))


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


def _job_head(job: plots.FigureJob) -> tuple[Any, ...]:
    return (job.kind, job.dtype, job.dimension, job.rtol, len(job.cells))


def _same_job(sent: plots.FigureJob, wanted: plots.FigureJob) -> bool:
    """Whether two jobs give the same figure (``job_key``), a cell that is the same object taken as it is
    (the summary's cells are the figures' own where the traces left them: ``results.rounded_cells``)."""
    if sent is wanted:
        return True
    return _job_head(sent) == _job_head(wanted) and all(
        mine is theirs or cell_key(mine) == cell_key(theirs)
        for mine, theirs in zip(sent.cells, wanted.cells, strict=True)
    )


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


def _siblings(description: str) -> list[tuple[int, int]]:
    return [(int(pair.split(",")[0]), int(pair.split(",")[1])) for pair in description.split()]


def _fork_siblings(siblings: list[tuple[int, int]]) -> tuple[int, int] | None:
    """Fork a warm sibling for each channel; in a sibling, its channel's descriptors (its standard input
    and output, the first painter's, then lead nowhere), else None. A sibling that cannot be forked drops
    out: its channel closes."""
    for number, (reading, writing) in enumerate(siblings):
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            for other in siblings[number + 1 :]:
                for fd in other:
                    os.close(fd)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            return reading, writing
        os.close(reading)
        os.close(writing)
    return None


def serve(requests: BinaryIO, answers: BinaryIO, siblings: list[tuple[int, int]] | None = None) -> None:
    """The painter's loop: warm up, fork ``siblings`` (their channels' descriptors), then draw each figure
    asked for (a request: the job's index or None, and the pickled jobs the first time), sent as soon as
    it is drawn; returns when the requests end."""
    _warm_up()
    collector.resume(automatic=False)  # the siblings fork with the start-up frozen; one collection a figure
    channel = _fork_siblings(siblings or [])
    if channel is not None:
        requests, answers = os.fdopen(channel[0], "rb"), os.fdopen(channel[1], "wb")
    jobs: list[plots.FigureJob] = []
    while True:
        message = _receive(requests)
        if message is None:
            return
        index, sent = message
        jobs = pickle.loads(sent) if sent is not None else jobs
        if index is not None:
            _send(answers, (index, plots.draw_figure(jobs[index])))
            collector.collect()  # the figure's matplotlib objects, once sent


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(sys.stdin.buffer, sys.stdout.buffer, _siblings(os.environ.pop(_SIBLINGS_VARIABLE, "")))

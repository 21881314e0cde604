"""report.html's figures drawn by painter processes started ahead (ce_audit.reports.figure_painter): the same
PNG bytes as drawn in the run's process, whatever the painters do (die, answer nonsense, stall, never start);
none left behind, whether the run ends, is killed, or is interrupted at the terminal."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from ce_audit.cli import main
from ce_audit.config import load_config
from ce_audit.plan.units import plan_units
from ce_audit.plugins import isolated
from ce_audit.reports import figure_painter, plots
from ce_audit.reports.csv import read_cells
from ce_audit.run.executors import sweep_cost
from ce_audit.run.sweep import painters_wanted

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not plots.plotting_available(), reason="matplotlib (the html extra)")
SWEEP = [
    "sweep", "--impl", "naive", "--impl", "shifted", "--dtype", "float16", "--dtype", "bfloat16",
    "--device", "cpu", "--distribution", "normal", "--scale", "1", "--scale", "100", "--offset", "0",
    "--offset", "10000", "--vocab", "64", "--batch", "8", "-q",
]  # fmt: skip


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> list[plots.FigureJob]:
    out = tmp_path_factory.mktemp("painter") / "report"
    with isolated():
        main([*SWEEP, "--out", str(out)])
    found = plots.figure_jobs(read_cells(out / "summary.csv").cells, {})
    assert len(found) == 6  # per dtype: the heatmap, the curves along scale and along offset
    return found


@pytest.fixture(scope="module")
def drawn_here(jobs: list[plots.FigureJob]) -> list[bytes]:
    return [plots.draw_figure(job).png for job in jobs]


def _siblings(pool: figure_painter.PainterPool, count: int = 1) -> list[int]:
    """The pids of the siblings the pool's painter forked once warm (waited for)."""
    assert pool.process is not None
    pid = pool.process.pid
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
        if len(children) >= count:
            return children
        time.sleep(0.02)
    raise AssertionError("the painter forked no sibling")


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")


@needs_proc
def test_two_painters_deliver_the_figures_drawn_here_byte_for_byte(jobs, drawn_here, monkeypatch):
    received: list[int] = []
    real_receive = figure_painter._receive

    def counted(stream):
        message = real_receive(stream)
        if message is not None:
            received.append(message[0])
        return message

    monkeypatch.setattr(figure_painter, "_receive", counted)  # what the pool's readers receive
    pool = figure_painter.PainterPool(2)
    assert len(pool.painters) == 2 and pool.process is not None
    process = pool.process
    (sibling,) = _siblings(pool)  # forked once warm: one process started, two painters
    assert os.getpgid(process.pid) != os.getpgid(0)  # no Ctrl-C reaches them
    assert os.getpgid(sibling) == process.pid
    assert pool.submit(jobs)
    local: list[int] = []
    figures = pool.collect(jobs, lambda job: local.append(1) or plots.draw_figure(job))
    assert [figure.png for figure in figures] == drawn_here
    assert [figure.name for figure in figures] == [plots.draw_figure(job).name for job in jobs]
    assert local == []  # the painters drew every one
    assert sorted(received) == list(range(len(jobs)))  # each figure drawn once, by one painter or the other
    assert received[0] in (0, len(jobs) - 1) and {0, len(jobs) - 1} <= set(received)  # from both ends
    assert process.poll() is not None and not _running(sibling)  # killed (and reaped) once done
    assert not pool.submit(jobs)  # a pool is used once


@needs_proc
def test_a_dead_painter_leaves_the_list_to_the_other(jobs, drawn_here):
    pool = figure_painter.PainterPool(2)
    (sibling,) = _siblings(pool)
    os.kill(sibling, signal.SIGKILL)
    assert pool.submit(jobs)
    figures = pool.collect(jobs, lambda job: pytest.fail("drawn here although a painter answers"))
    assert [figure.png for figure in figures] == drawn_here


def test_a_job_left_by_a_painter_that_drops_out_goes_to_the_other():
    """The dispatch on the run's side, with the test answering for the painters: each is asked for one
    figure at a time, the first from the start of the list and the second from its end; the job of one that
    ends goes to the other, which then takes the rest."""
    board = figure_painter._Board()
    first_requests, first_answers = os.pipe(), os.pipe()
    second_requests, second_answers = os.pipe(), os.pipe()
    first = figure_painter.Painter(
        board, os.fdopen(first_requests[1], "wb"), os.fdopen(first_answers[0], "rb")
    )
    second = figure_painter.Painter(
        board, os.fdopen(second_requests[1], "wb"), os.fdopen(second_answers[0], "rb"), from_end=True
    )
    jobs = pickle.dumps([plots.FigureJob("heatmap", "float16", "scale", [])] * 3)
    board.pending = [0, 1, 2]
    first.submit(jobs)
    second.submit(jobs)
    asked = os.fdopen(first_requests[0], "rb")
    answers = os.fdopen(first_answers[1], "wb")
    assert figure_painter._receive(asked)[0] == 0
    assert figure_painter._receive(os.fdopen(second_requests[0], "rb"))[0] == 2
    os.close(second_answers[1])  # the second painter ends while drawing job 2
    deadline = time.monotonic() + 60
    while board.alive > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert board.alive == 1 and board.pending == [2, 1]
    order = [0]
    for index in (0, 2, 1):
        figure_painter._send(answers, (index, plots.Figure(f"f{index}", "", "", b"")))
        if index != 1:
            order.append(figure_painter._receive(asked)[0])
    assert order == [0, 2, 1]  # its own first, then the job left behind, then the rest
    with board.changed:
        while len(board.figures) < 3:
            assert board.changed.wait(timeout=60)
    assert sorted(board.figures) == [0, 1, 2] and board.idle == [first]
    first.close()
    answers.close()
    for painter in (first, second):
        painter.join()
    assert board.alive == 0


def test_without_painters_every_figure_is_drawn_here(jobs, drawn_here):
    pool = figure_painter.PainterPool(2)
    assert pool.process is not None
    os.killpg(pool.process.pid, signal.SIGKILL)  # the painter, and its sibling if forked already
    assert pool.submit(jobs)
    drawn: list[str] = []

    def draw(job: plots.FigureJob) -> plots.Figure:
        drawn.append(job.kind)
        return plots.draw_figure(job)

    figures = pool.collect(jobs, draw)
    assert [figure.png for figure in figures] == drawn_here
    assert len(drawn) == len(jobs)


def _pool_running(monkeypatch: pytest.MonkeyPatch, script: str) -> figure_painter.PainterPool:
    """A pool of one painter that runs ``script`` instead of the painter's loop."""
    monkeypatch.setattr(figure_painter, "_BOOTSTRAP", script.replace("{", "{{").replace("}", "}}"))
    return figure_painter.PainterPool(1)


def test_a_painter_answering_nonsense_is_dropped(jobs, drawn_here, monkeypatch):
    script = textwrap.dedent(
        """
        import pickle, struct, sys
        sys.stdin.buffer.read(8)
        data = pickle.dumps(("not", "a figure"))
        sys.stdout.buffer.write(struct.pack("<Q", len(data)) + data)
        sys.stdout.buffer.flush()
        sys.stdin.buffer.read()
        """
    )
    pool = _pool_running(monkeypatch, script)
    assert pool.submit(jobs)
    figures = pool.collect(jobs, plots.draw_figure)
    assert [figure.png for figure in figures] == drawn_here


def test_a_stalled_painter_is_killed_and_its_figures_drawn_here(jobs, drawn_here, monkeypatch):
    monkeypatch.setattr(figure_painter, "STALL_SECONDS", 0.5)
    pool = _pool_running(monkeypatch, "import time; time.sleep(600)")
    process = pool.process
    assert process is not None
    assert pool.submit(jobs)
    figures = pool.collect(jobs, plots.draw_figure)
    assert [figure.png for figure in figures] == drawn_here
    assert process.poll() is not None


def test_painter_ahead_starts_only_when_wanted_and_kills_at_the_end(jobs, drawn_here, monkeypatch):
    monkeypatch.setattr(figure_painter, "default_threads", lambda: 2)
    with figure_painter.painter_ahead(0):
        assert figure_painter._ACTIVE == []
        assert [figure.png for figure in figure_painter.FigureDrawing(jobs).figures()] == drawn_here
    with figure_painter.painter_ahead(1):
        (pool,) = figure_painter._ACTIVE
        assert len(pool.painters) == 1  # one dtype's figures
    with figure_painter.painter_ahead(4):
        (pool,) = figure_painter._ACTIVE
        process = pool.process
        painters = 2 if figure_painter.SIBLINGS_FORKED else 1  # PAINTERS (forked siblings: Linux)
        assert len(pool.painters) == painters and process is not None and process.poll() is None
    assert figure_painter._ACTIVE == []
    assert process.poll() is not None  # never asked: killed all the same
    monkeypatch.setattr(figure_painter, "default_threads", lambda: 1)
    with figure_painter.painter_ahead(2):
        assert figure_painter._ACTIVE == []  # one core: the painters would only take the run's time


@needs_proc
def test_a_killed_run_leaves_no_painter_behind(tmp_path):
    pids = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import time
        from ce_audit.reports import figure_painter
        figure_painter.default_threads = lambda: 2
        from pathlib import Path
        with figure_painter.painter_ahead(2):
            pool = figure_painter._ACTIVE[0]
            tasks = Path(f"/proc/{{pool.process.pid}}/task")
            children = lambda: [c for t in tasks.iterdir() for c in (t / "children").read_text().split()]
            while not (siblings := children()):
                time.sleep(0.02)  # the sibling is forked once the painter is warm
            open({str(pids)!r}, "w").write(" ".join([str(pool.process.pid), *siblings]))
            time.sleep(600)
        """
    )
    run = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    painters = [int(pid) for pid in pids.read_text().split()]
    assert len(painters) == 2
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 60
    while any(_running(pid) for pid in painters) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(pid) for pid in painters)  # their standard input closed: they ended


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, dead but not reaped by its init, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_painters_are_wanted_where_a_dimension_varies_within_a_dtype():
    def wanted(overrides: dict) -> int:
        small = {"impls": ["naive"], "vocabs": [64], "batches": [8]}
        return painters_wanted(load_config(None, {**small, **overrides}))

    one_case = {"distributions": ["normal"], "scales": [1], "offsets": [0]}
    assert "torch" in sys.modules  # as in a process that has audited before: only a long audit is worth them
    assert not wanted({**one_case, "scales": [1, 10]})  # figures, but over before a painter is warm
    assert not wanted({**one_case, "dtypes": ["float16", "float32"], "batches": [65536]})  # one case a dtype
    # a figure each: the heatmap, and the curves along scale
    assert wanted({**one_case, "scales": [1, 10], "batches": [262144], "dtypes": ["float16"]}) == 2
    assert wanted({**one_case, "distributions": ["normal", "spike"], "batches": [65536]}) == 4  # heatmaps
    units = plan_units(load_config(None, {}), cpu_only=True)[0]
    # each dtype's heatmap and curves along scale and offset
    assert figure_painter.painters_worth(((unit.dtype, unit.case) for unit in units), sweep_cost(units)) == 12
    fresh = "from ce_audit.run.sweep import painters_wanted; from ce_audit.config import load_config; "
    fresh += "import sys; print(painters_wanted(load_config(None, {'scales': [1, 10], 'vocabs': [64]})), "
    fresh += "'torch' in sys.modules)"
    answer = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True)
    assert answer.stdout.split() == ["12", "False"]  # torch's import ahead: worth them for a small sweep


def test_figures_sent_ahead_serve_the_page_when_only_the_causes_changed(jobs, drawn_here, monkeypatch):
    monkeypatch.setattr(figure_painter, "default_threads", lambda: 2)
    cells = list(dict.fromkeys(cell for job in jobs for cell in job.cells))
    traced = [replace(cell, traced_cause="traced: aten.exp at x.py:1 overflowed") for cell in cells]
    drawn_locally: list[str] = []
    real_draw = plots.draw_figure
    monkeypatch.setattr(plots, "draw_figure", lambda job: (drawn_locally.append(job.kind), real_draw(job))[1])
    with figure_painter.painter_ahead(2):
        figure_painter.draw_ahead(cells, {})
        drawing = figure_painter.FigureDrawing(plots.figure_jobs(traced, {}))
        assert [figure.png for figure in drawing.figures()] == drawn_here
    assert drawn_locally == []  # the painters' figures, sent before the traces, were taken
    changed = [replace(cell, max_ulp=cell.max_ulp + 1) for cell in cells]  # a value the figures show
    with figure_painter.painter_ahead(2):
        figure_painter.draw_ahead(cells, {})
        drawing = figure_painter.FigureDrawing(plots.figure_jobs(changed, {}))
        mine = [real_draw(job).png for job in drawing.jobs]
        drawn_locally.clear()
        assert [figure.png for figure in drawing.figures()] == mine != drawn_here
    assert len(drawn_locally) == len(jobs)  # not the figures sent ahead: drawn here


def test_a_fresh_sweep_writes_the_figures_its_rebuild_draws_here(tmp_path):
    """A `ce-audit sweep` as a user runs it (a fresh process: painters started, figures sent ahead of the
    traces) writes the page and PNGs that `ce-audit report` draws again in its own process."""
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "ce_audit", *SWEEP, "--out", str(out)], env=env, check=True,
                   capture_output=True)  # fmt: skip
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(out, rebuilt)
    with isolated():
        main(["report", str(rebuilt)])
    assert (rebuilt / "report.html").read_bytes() == (out / "report.html").read_bytes()
    pngs = sorted(path.name for path in (out / "plots").iterdir())
    assert len(pngs) == 6 and pngs == sorted(path.name for path in (rebuilt / "plots").iterdir())
    for name in pngs:
        assert (rebuilt / "plots" / name).read_bytes() == (out / "plots" / name).read_bytes()


def test_a_painter_is_counted_in_before_it_can_be_counted_out(monkeypatch):
    """A painter that ends at once, even before its pool has started the next one, leaves the count of
    those still answering right (else the run would wait STALL_SECONDS for a painter that is gone)."""
    monkeypatch.setattr(figure_painter, "_BOOTSTRAP", "pass")
    board = figure_painter._Board()
    process, pairs = figure_painter._start_painter(2)
    painters = [figure_painter.Painter(board, requests, answers) for requests, answers in pairs]
    process.wait()
    for painter in painters:
        painter._reader.join(timeout=60)
        assert not painter._reader.is_alive()
    assert board.alive == 0  # each counted in (2), then out (0): its channels closed with it
    for painter in painters:
        painter.close()
        painter.join()

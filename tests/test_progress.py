"""Progress on stderr: a Rich bar with counts and times on a terminal, a plain line every few seconds
elsewhere, nothing with --quiet; stdout keeps only the report."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from ce_audit.run.progress import PlainProgress, progress_line, progress_reporter, time_left

ROOT = Path(__file__).parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_plain_line_gives_count_elapsed_and_time_left():
    assert progress_line(840, 2470, 4.2) == "ce-audit: 840/2470 cells, 4 s elapsed, ~8 s left"
    assert progress_line(0, 10, 0.0) == "ce-audit: 0/10 cells, 0 s elapsed"
    assert progress_line(0.4, 10, 5.0) == "ce-audit: 0/10 cells, 5 s elapsed"  # no estimate from a fraction
    assert progress_line(10, 10, 75.0) == "ce-audit: 10/10 cells, 1 min 15 s elapsed"
    assert progress_line(10, 100, 40.0).endswith("~6 min 0 s left")
    assert progress_line(2469.9999999, 2470, 9.0) == "ce-audit: 2470/2470 cells, 9 s elapsed"


def test_no_time_left_until_a_tenth_is_done_and_3_s_have_passed():
    """The rate of the first cells (the start-up, a large vocabulary first) is no rate: in the run that
    printed "~21 min left" for a 36 s audit, the first line came after 1 % of the cells."""
    assert time_left(24, 2470, 5.0) is None  # 1 %: nothing, where elapsed × 102 would say 8 min
    assert time_left(246, 2470, 5.0) is None  # just under 10 %
    assert time_left(247, 2470, 5.0) == 45.0  # 10 %: 5 s × 2223 / 247
    assert time_left(1235, 2470, 2.9) is None  # half done in under 3 s: too soon to tell
    assert time_left(1235, 2470, 3.0) == 3.0
    assert time_left(2470, 2470, 30.0) is None  # done
    assert progress_line(24, 2470, 5.0) == "ce-audit: 24/2470 cells, 5 s elapsed"


def test_plain_progress_writes_one_line_per_interval():
    clock, stream = FakeClock(), io.StringIO()
    progress = PlainProgress(10, stream, interval=5.0, clock=clock)
    progress.advance(1)  # at once: nothing yet
    clock.now += 3
    progress.advance(1)
    assert stream.getvalue() == ""
    clock.now += 3  # 6 s in
    progress.advance(1)
    clock.now += 1
    progress.advance(1)  # 1 s after the line: none
    clock.now += 5
    progress.advance(1)
    lines = stream.getvalue().splitlines()
    assert lines == [  # the rate since the first report (1 cell at once): 2 cells in 6 s, then 4 in 12 s
        "ce-audit: 3/10 cells, 6 s elapsed, ~21 s left",
        "ce-audit: 5/10 cells, 12 s elapsed, ~15 s left",
    ]


def test_the_start_up_before_the_first_report_is_no_part_of_the_rate():
    """Worker processes importing torch take 4 s before the first cells come back; then 143 cells a
    second. From the run's start the rate would be 50 cells a second, the time left three times too long."""
    clock, stream = FakeClock(), io.StringIO()
    progress = PlainProgress(2470, stream, interval=2.0, clock=clock)
    clock.now += 4
    progress.advance(13)
    clock.now += 2
    progress.advance(286)  # 299 cells in 6 s, 286 of them in the last 2
    assert stream.getvalue().splitlines() == [
        "ce-audit: 13/2470 cells, 4 s elapsed",
        "ce-audit: 299/2470 cells, 6 s elapsed, ~15 s left",  # from the start: ~43 s
    ]


def test_quiet_writes_nothing_and_a_pipe_gets_plain_lines(monkeypatch):
    quiet = Terminal()
    with progress_reporter(5, quiet=True, stream=quiet) as advance:
        advance(5)
    assert quiet.getvalue() == ""
    monkeypatch.setenv("CE_AUDIT_PROGRESS_INTERVAL", "0")
    pipe = io.StringIO()
    with progress_reporter(4, stream=pipe) as advance:
        advance(2)
        advance(2)
    assert pipe.getvalue().splitlines()[-1].startswith("ce-audit: 4/4 cells, ")
    assert "\x1b" not in pipe.getvalue()


def test_a_terminal_gets_a_bar_with_the_count():
    terminal = Terminal()
    with progress_reporter(8, stream=terminal) as advance:
        for _ in range(8):
            advance(1)
    written = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())  # without escape codes
    assert "auditing" in written and "8/8 cells" in written and "elapsed" in written and "left" in written
    assert "time left: estimating" in written and "~" not in written  # 8 cells at once: too soon to tell


def test_sweep_redirected_to_a_file_still_shows_progress_on_stderr(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CE_AUDIT_PROGRESS_INTERVAL": "0"}
    args = [sys.executable, "-m", "ce_audit", "sweep", "--impl", "shifted", "--dtype", "float32"]
    args += ["--scale", "1", "--scale", "10", "--vocab", "16", "--batch", "4", "--device", "cpu"]
    args += ["--out", str(tmp_path / "out")]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "ce-audit: " in run.stderr and " cells, " in run.stderr
    assert not re.search(r"\d/\d+ cells, ", run.stdout) and "Verdict per implementation" in run.stdout
    counts = re.findall(r"ce-audit: (\d+)/(\d+) cells", run.stderr)
    cells = len((tmp_path / "out" / "summary.csv").read_text().splitlines()) - 1
    assert counts[-1] == (str(cells), str(cells)) and f"{cells} cells in " in run.stdout  # the closing line
    quiet = subprocess.run([*args, "-q"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert quiet.returncode == 0 and quiet.stderr == ""

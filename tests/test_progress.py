"""Progress on stderr: a Rich bar with counts and times on a terminal, a plain line every few seconds
elsewhere, nothing with --quiet; stdout keeps only the report."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from ce_audit.run.progress import PlainProgress, progress_line, progress_reporter

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
    assert progress_line(840, 2470, 4.2) == "ce-audit: 840/2470 cases, 4 s elapsed, ~8 s left"
    assert progress_line(0, 10, 0.0) == "ce-audit: 0/10 cases, 0 s elapsed"
    assert progress_line(0.4, 10, 5.0) == "ce-audit: 0/10 cases, 5 s elapsed"  # no estimate from a fraction
    assert progress_line(10, 10, 75.0) == "ce-audit: 10/10 cases, 1 min 15 s elapsed"
    assert progress_line(1, 100, 40.0).endswith("~1 h 6 min left")


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
    assert lines == [
        "ce-audit: 3/10 cases, 6 s elapsed, ~14 s left",
        "ce-audit: 5/10 cases, 12 s elapsed, ~12 s left",
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
    assert pipe.getvalue().splitlines()[-1].startswith("ce-audit: 4/4 cases, ")
    assert "\x1b" not in pipe.getvalue()


def test_a_terminal_gets_a_bar_with_the_count():
    terminal = Terminal()
    with progress_reporter(8, stream=terminal) as advance:
        for _ in range(8):
            advance(1)
    written = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())  # without escape codes
    assert "auditing" in written and "8/8 cases" in written and "elapsed" in written and "left" in written


def test_sweep_redirected_to_a_file_still_shows_progress_on_stderr(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CE_AUDIT_PROGRESS_INTERVAL": "0"}
    args = [sys.executable, "-m", "ce_audit", "sweep", "--impl", "shifted", "--dtype", "float32"]
    args += ["--scale", "1", "--scale", "10", "--vocab", "16", "--batch", "4", "--device", "cpu"]
    args += ["--out", str(tmp_path / "out")]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "ce-audit: " in run.stderr and " cases, " in run.stderr
    assert " cases, " not in run.stdout and "Verdict per implementation" in run.stdout
    quiet = subprocess.run([*args, "-q"], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert quiet.returncode == 0 and quiet.stderr == ""

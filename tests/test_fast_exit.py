"""The command line's process ends without the interpreter's teardown (ce_audit.fast_exit), yet loses
nothing a normal exit would keep: the exit code, other threads' work, atexit handlers, buffered output."""

from __future__ import annotations

import csv
import json
import pstats
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROGRAM = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from ce_audit.fast_exit import exit_now

    out = Path(sys.argv[1])
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    pool = ThreadPoolExecutor(max_workers=2)
    pool.submit(time.sleep, 0.01)  # an idle pool's threads are alive at the exit
    def late():
        time.sleep(0.3)
        (out / "thread").write_text("finished")
    threading.Thread(target=late).start()  # non-daemon: a normal exit waits for it
    sys.stdout.write("buffered, no newline")
    exit_now(int(sys.argv[2]))
    (out / "after").write_text("exit_now returned")
    """
)


@pytest.mark.parametrize("code", [0, 3])
def test_exit_now_keeps_what_a_normal_exit_keeps(tmp_path: Path, code: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path), str(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == code, done.stderr
    assert done.stdout == "buffered, no newline"
    assert done.stderr == ""
    assert (tmp_path / "thread").read_text() == "finished"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "after").exists()


def _into_closed_pipe(program: str) -> tuple[int, bytes]:
    reader = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None
    reader.stdout.close()  # nobody reads: writing or flushing fails with a broken pipe
    _, stderr = reader.communicate(timeout=60)
    return reader.returncode, stderr


def test_exit_now_into_a_closed_pipe_exits_like_python() -> None:
    """Output that cannot be written (the reader is gone) ends the process as it ends a plain program."""
    write = "import sys; sys.stdout.write('x' * 100); "
    plain_code, plain_stderr = _into_closed_pipe(write)
    code, stderr = _into_closed_pipe(write + "from ce_audit.fast_exit import exit_now; exit_now(0)")
    assert code == plain_code != 0
    assert b"BrokenPipeError" in stderr and b"BrokenPipeError" in plain_stderr


def test_the_command_line_exits_with_its_code_and_its_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "ce_audit", "sweep", "--impl", "naive", "--dtype", "float16", "--scale", "100",
         "--offset", "0", "--vocab", "100", "--batch", "4", "--out", str(out), "--fail-on", "nonfinite",
         "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # exp(z) overflows float16: the cell is nonfinite
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert rows and {row["impl"] for row in rows} == {"naive"}
    assert json.loads((out / "report.json").read_text())["cells"]
    assert str(out / "summary.csv") in done.stdout


def test_a_profiled_command_exits_normally_and_the_profile_is_written(tmp_path: Path) -> None:
    """Under a profiler (or a tracer, or a sys.monitoring tool) the process takes the normal exit: cProfile
    writes its statistics after the program returns."""
    profile = tmp_path / "list.prof"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "ce_audit", "list"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "naive" in done.stdout
    assert pstats.Stats(str(profile)).total_calls > 0

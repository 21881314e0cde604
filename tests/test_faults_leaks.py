"""Fault injection, part two: implementations that leave something behind — changed state, a thread, a
detached process, a flood of output, a leak of memory — cost only their own cells, and nothing they
leave reaches another implementation (or their own next call)."""

from __future__ import annotations

import fcntl
import os
import time
import tracemalloc
from pathlib import Path

import pytest
from cli_helpers import PLUGINS, read_rows, run_cli

from ce_audit.run import process_state, worker, worker_process

torch = pytest.importorskip("torch")

LEAKY = PLUGINS / "leaky_plugins.py"
BOTH = ["--dtype", "float32", "--dtype", "float16"]
SMALL = [
    "--vocab", "64", "--batch", "8", "--distribution", "normal",
    "--scale", "1", "--offset", "0", "--device", "cpu", "--quiet", "--no-grad",
]  # fmt: skip
LEAKERS = ["sets_environ", "moves_default_device", "patches_cross_entropy", "exits_later"]


def _impl_args(names: list[str]) -> list[str]:
    return [arg for name in names for arg in ("--impl", name)]


def _sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str], impls: list[str], *extra: str) -> list[dict]:
    code, _, err = run_cli(
        ["sweep", "--plugin", LEAKY, *_impl_args(impls), *SMALL, *extra, "--out", tmp_path], capsys
    )
    assert code == 0, err
    return read_rows(tmp_path / "summary.csv")


@pytest.mark.parametrize("leaker", LEAKERS)
def test_state_a_plugin_leaves_reaches_neither_another_nor_its_own_next_call(tmp_path, capsys, leaker):
    """Each leaker is called once per dtype, before ``honest``: a changed environment, a default device of
    'meta', a monkeypatched F.cross_entropy, a thread that calls os._exit(7) half a second later."""
    rows = _sweep(tmp_path, capsys, [leaker, "honest", "fused"], *BOTH)
    assert len(rows) == 6
    for row in rows:
        assert (row["status"], row["error"]) == ("ok", ""), row
        assert float(row["max_ulp"]) <= 2, row  # an environment leak put honest off by 1.7e7 ULP


def test_isolation_none_puts_a_monkeypatch_back_and_says_so(tmp_path, capsys):
    clean = _sweep(tmp_path / "clean", capsys, ["fused"], *BOTH, "--isolation", "none")
    code, _, err = run_cli(
        ["sweep", "--plugin", LEAKY, *BOTH, *SMALL, "--isolation", "none", "--out", tmp_path / "patched",
         *_impl_args(["patches_cross_entropy", "fused", "sets_environ", "honest"])],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = read_rows(tmp_path / "patched" / "summary.csv")
    assert [row for row in rows if row["impl"] == "fused"] == clean  # PyTorch's own row is untouched
    assert {row["status"] for row in rows} == {"ok"}
    assert "patches_cross_entropy changed torch.nn.functional.cross_entropy" in err
    assert "sets_environ changed os.environ (CE_AUDIT_TEST_LOSS_SCALE)" in err
    assert err.count("patches_cross_entropy changed") == 1  # once per implementation and change


def test_global_state_sees_environment_attributes_device_and_threads():
    watched = process_state.GlobalState.capture()
    assert watched.changes() == []
    original = torch.nn.functional.cross_entropy
    os.environ["CE_AUDIT_TEST_GLOBAL"] = "1"
    torch.nn.functional.cross_entropy = lambda *args, **kwargs: None
    torch.set_default_device("meta")
    try:
        changes = watched.changes()
    finally:
        watched.restore()
    assert changes == [
        "os.environ (CE_AUDIT_TEST_GLOBAL)",
        "torch.nn.functional.cross_entropy",
        "torch's default device (meta)",
    ]
    assert torch.nn.functional.cross_entropy is original and "CE_AUDIT_TEST_GLOBAL" not in os.environ
    assert str(torch.get_default_device()) == "cpu" and watched.changes() == []
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert watched.changes() == ["a thread left running"]
    finally:
        stop.set()
        thread.join()


def test_a_memory_leak_is_the_implementations_error(tmp_path, capsys):
    rows = _sweep(tmp_path, capsys, ["leaks_numpy", "leaks_torch", "fused"], *BOTH, "--max-memory", "4G")
    for row in rows:
        if row["impl"] == "fused":
            assert row["status"] == "ok", row
        else:
            assert row["status"] == "error", row
            assert row["error"].startswith("out of memory under --max-memory 4 GiB: "), row
    numpy_error = next(row["error"] for row in rows if row["impl"] == "leaks_numpy")
    torch_error = next(row["error"] for row in rows if row["impl"] == "leaks_torch")
    assert "MemoryError" in numpy_error and "allocate" in torch_error


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8", "max-memory must be a size such as 512M"),
        ("lots", "max-memory must be a size such as 512M"),
        ("100M", "max-memory 100M is below 256 MiB"),
    ],
)
def test_bad_max_memory_exits_2(tmp_path, capsys, value, message):
    args = ["sweep", "--max-memory", value, "--impl", "fused", *SMALL, "--out", tmp_path]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_max_memory_sizes():
    from ce_audit.run.memory_limit import machine_memory, parse_memory

    assert parse_memory("512M") == 512 << 20 and parse_memory("1.5GiB") == 3 << 29
    assert parse_memory("0") == parse_memory("none") == 0
    assert parse_memory("auto") == machine_memory() // 2


def test_a_flood_of_output_is_read_from_its_end(tmp_path, capsys):
    """64 MiB on stderr, then a crash: the cell quotes the last line; the run reads at most TAIL_BYTES."""
    tracemalloc.start()
    try:
        rows = _sweep(tmp_path, capsys, ["floods_output"], "--dtype", "float32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (error,) = {row["error"] for row in rows}
    assert error.startswith("killed by SIGABRT (last output: …xxx") and len(error) < 400
    assert error.endswith("xxx | floods_output: the last line)")
    assert peak < 32 << 20  # reading the whole log would hold 64 MiB at once


def test_read_tail_reads_only_the_end(tmp_path):
    log = tmp_path / "output.log"
    log.write_bytes(b"early line\n" * 400_000 + b"one\n\n two \nthree\n")  # 4.4 MB
    tracemalloc.start()
    try:
        tail = worker.read_tail(log)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tail == "one | two | three"
    assert peak < 1 << 20  # the end only: the whole file would take 4.4 MB and more


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_processes_a_plugin_detaches_end_with_its_worker(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pids.txt"
    monkeypatch.setenv("CE_AUDIT_TEST_MARKER", str(marker))
    rows = _sweep(tmp_path / "out", capsys, ["detaches", "fused"], "--dtype", "float32")
    assert {row["status"] for row in rows} == {"ok"}
    pids = [int(line.split()[1]) for line in marker.read_text().splitlines()]
    assert len(pids) == 2  # one call: a process in a session of its own, and a double-forked daemon
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _alive(pid)]


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs Linux /proc")
def test_a_worker_closes_the_locks_it_inherits(tmp_path):
    """The run's --out lock is an flock; a forked worker (and so every descendant) closes its copy."""
    lock = os.open(tmp_path, os.O_RDONLY)
    plain = os.open(tmp_path / "plain.txt", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        pid = os.fork()
        if pid == 0:  # the child: what a worker does first, then report which descriptors are left
            worker_process._close_inherited_locks()
            code = 0
            for fd, expected_open in ((lock, False), (plain, True)):
                try:
                    os.fstat(fd)
                    code |= 0 if expected_open else 1
                except OSError:
                    code |= 2 if expected_open else 0
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(lock)
        os.close(plain)

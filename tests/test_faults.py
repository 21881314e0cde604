"""Fault injection: implementations that crash, exit, hang, raise a BaseException or change process-wide
state cost only their own cells; SIGINT, SIGTERM and SIGHUP, to the run or to its process group, with or
without --jobs, at any moment, keep the completed cells as a partial report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import PLUGINS, read_rows, run_cli

import ce_audit
from ce_audit.backends import BlockCall
from ce_audit.dtypes import float_format
from ce_audit.run import isolation, process_state, worker

torch = pytest.importorskip("torch")

FAULTS = PLUGINS / "fault_plugins.py"
REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "--dtype", "float32", "--dtype", "float16", "--vocab", "64", "--batch", "8", "--distribution", "normal",
    "--scale", "1", "--offset", "0", "--device", "cpu", "--quiet",
]  # fmt: skip
BUILT_INS = {"fused", "numpy_shifted"}
EXPECTED = {  # implementation: the start of its cells' error
    "segfaults": "killed by SIGSEGV (last output: segfaults: about to misbehave)",
    "aborts": "killed by SIGABRT (last output: aborts: about to misbehave)",
    "exits": "exited with code 3 (last output: exits: about to misbehave)",
    "hard_exits": "exited with code 4 (last output: hard_exits: about to misbehave)",
    "hangs": "timed out after 1 s (last output: hangs: about to misbehave)",
    "raises_base": "KernelPanic: device lost",
}


def _impl_args(names: list[str]) -> list[str]:
    return [arg for name in names for arg in ("--impl", name)]


def _rows_of(path: Path, impls: set[str]) -> list[dict[str, str]]:
    return [row for row in read_rows(path / "summary.csv") if row["impl"] in impls]


def test_faulty_plugins_cost_only_their_cells(tmp_path, capsys):
    impls = ["fused", *EXPECTED, "state_changer", "numpy_shifted"]
    code, _, err = run_cli(
        ["sweep", "--plugin", FAULTS, *_impl_args(impls), *SMALL, "--timeout", "1", "--out", tmp_path / "a"],
        capsys,
    )
    assert code == 0, err
    code, _, err = run_cli(
        ["sweep", *_impl_args(["fused", "numpy_shifted"]), *SMALL, "--out", tmp_path / "clean"], capsys
    )
    assert code == 0, err
    rows = read_rows(tmp_path / "a" / "summary.csv")
    assert len(rows) == 2 * len(impls)
    for row in rows:
        if row["impl"] in EXPECTED:
            assert row["status"] == "error", row
            assert row["error"] == EXPECTED[row["impl"]], row
        else:
            assert row["status"] == "ok", row
    # the built-ins' cells are exactly those of a run without the faulty plugins
    assert _rows_of(tmp_path / "a", BUILT_INS) == read_rows(tmp_path / "clean" / "summary.csv")


def test_state_changes_are_undone_in_process(tmp_path, capsys):
    """With --isolation none the state changer runs here: every change it makes is undone after its call."""
    cwd, errors, dtype = os.getcwd(), np.geterr(), torch.get_default_dtype()
    rng = np.random.get_state()[1].copy()
    impls = ["state_changer", "fused", "numpy_shifted"]
    code, _, err = run_cli(
        ["sweep", "--plugin", FAULTS, *_impl_args(impls), *SMALL, "--isolation=none", "--out", tmp_path],
        capsys,
    )
    assert code == 0, err
    assert (tmp_path / "report.json").is_file()  # not in the directory the plugin moved to
    assert os.getcwd() == cwd and np.geterr() == errors and torch.get_default_dtype() == dtype
    assert np.array_equal(np.random.get_state()[1], rng)
    assert not process_state._flushes_denormals(torch)
    code, _, err = run_cli(
        ["sweep", *_impl_args(["fused", "numpy_shifted"]), *SMALL, "--out", tmp_path / "clean"], capsys
    )
    assert code == 0, err
    assert _rows_of(tmp_path, BUILT_INS) == read_rows(tmp_path / "clean" / "summary.csv")
    assert {row["status"] for row in _rows_of(tmp_path, {"state_changer"})} == {"ok"}


def test_preserved_state_restores_flush_denormal_threads_and_rng():
    threads = torch.get_num_threads()
    before = torch.rand(3)
    torch.manual_seed(7)
    with process_state.preserved_state():
        torch.set_flush_denormal(True)
        torch.set_num_threads(1)
        torch.rand(5)
        assert process_state._flushes_denormals(torch) or not torch.set_flush_denormal(True)
    assert not process_state._flushes_denormals(torch)
    assert torch.get_num_threads() == threads
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3)) and not torch.equal(before, after)


def test_one_worker_per_implementation_serves_the_whole_run(tmp_path, capsys, monkeypatch):
    starts = []
    original = worker.Worker._start

    def counting_start(self: worker.Worker) -> None:
        starts.append(self.log_path)
        original(self)

    monkeypatch.setattr(worker.Worker, "_start", counting_start)
    code, _, err = run_cli(
        ["sweep", "--plugin", PLUGINS / "good_plugin.py", "--impl", "good_ce", "--impl", "good_np_ce",
         *SMALL, "--scale", "10", "--out", tmp_path],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "error" not in {row["status"] for row in read_rows(tmp_path / "summary.csv")}
    assert len(starts) == len(set(starts)) == 2  # 8 cells, several calls each, one worker per implementation


def test_a_live_function_is_isolated_in_a_forked_worker():
    """ce_audit.check() with a function defined here: the worker is a fork, so it needs no import path."""

    def exits_on_float16(logits, targets):
        if logits.dtype == torch.float16:
            os._exit(5)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    report = ce_audit.check(
        exits_on_float16, dtypes=["float16", "float32"], scales=[1], offsets=[0], vocabs=[32], batches=[4],
        distributions=["normal"], devices=["cpu"],
    )  # fmt: skip
    statuses = {cell.dtype: (cell.status, cell.error) for cell in report.cells}
    assert statuses["float16"] == ("error", "exited with code 5")
    assert statuses["float32"][0] == "ok"


def test_spawned_worker_loads_the_plugins_again(tmp_path, capsys, monkeypatch, temporary_impl):
    """Where fork is unusable (CUDA initialised) the worker is spawned and runs plugins.prepare itself;
    a function registered from a live object is pickled by reference, a local one cannot be."""
    monkeypatch.setattr(worker, "start_method", lambda: "spawn")
    temporary_impl("live_module_level", torch.nn.functional.cross_entropy)
    temporary_impl("live_local", lambda logits, targets: logits[:, 0])
    code, _, err = run_cli(
        ["sweep", "--plugin", PLUGINS / "good_plugin.py", "--plugin", FAULTS, "--impl", "good_ce",
         "--impl", "live_module_level", "--impl", "live_local",
         "--impl", "segfaults", "--impl", "fused", "--dtype", "float32", "--vocab", "64", "--batch", "8",
         "--distribution", "normal", "--scale", "1", "--offset", "0", "--device", "cpu", "--out", tmp_path],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = {row["impl"]: row for row in read_rows(tmp_path / "summary.csv")}
    assert rows["good_ce"]["status"] == "ok" and rows["fused"]["status"] == "ok"
    assert rows["segfaults"]["error"].startswith("killed by SIGSEGV")
    assert rows["live_module_level"]["status"] != "error", rows["live_module_level"]["error"]
    # a lambda a spawned worker cannot rebuild runs in this process (state restored) rather than fail
    assert rows["live_local"]["status"] != "error", rows["live_local"]["error"]


def test_a_crashing_plugin_in_replay(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "logits.npy", rng.normal(size=(6, 20)).astype(np.float32))
    np.save(tmp_path / "targets.npy", rng.integers(0, 20, size=6))
    code, _, err = run_cli(
        ["replay", tmp_path / "logits.npy", tmp_path / "targets.npy", "--plugin", FAULTS, "--impl", "aborts",
         "--impl", "fused", "--device", "cpu", "--out", tmp_path / "out", "--quiet"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = {row["impl"]: row for row in read_rows(tmp_path / "out" / "summary.csv")}
    assert rows["aborts"]["error"].startswith("killed by SIGABRT") and rows["fused"]["status"] == "ok"
    assert (tmp_path / "out" / "rows.csv").is_file()


def test_run_in_process_outside_a_session_restores_state():
    from ce_audit.implementations import Implementation

    def changes_cwd(logits, targets):
        os.chdir("/")
        return (logits.max(axis=1) - logits[np.arange(logits.shape[0]), targets]).astype(logits.dtype)

    impl = Implementation("changes_cwd", "numpy", changes_cwd, "test", "tests", builtin=False)
    block = np.zeros((2, 3), dtype=np.float32)
    call = BlockCall(block, np.array([0, 1]), float_format("float32"), "cpu", {}, False, {}, None, (2,))
    cwd = os.getcwd()
    outcome = isolation.run_implementation(impl, call)
    assert os.getcwd() == cwd and outcome.value.shape == (2,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--isolation", "thread"], "isolation must be process or none"),
        (["--timeout", "-1"], "timeout must be a finite number"),
        (["--timeout", "nan"], "timeout must be a finite number"),
    ],
)
def test_bad_isolation_settings_exit_2(tmp_path, capsys, args, message):
    code, _, err = run_cli(["sweep", *args, "--impl", "fused", *SMALL, "--out", tmp_path], capsys)
    assert code == 2 and message in err and "Traceback" not in err


# --- interruption: a subprocess, stopped after its first cells ------------------------------------------

MANY_UNITS = """
dtypes = ["float32"]
devices = ["cpu"]
impls = ["fused", "marked_slow"]
distributions = ["normal"]
scales = [{scales}]
offsets = [0]
vocabs = [64]
batches = [8]
"""


def _start_sweep(
    tmp_path: Path, *extra: str, group: bool = False, units: int = 40
) -> tuple[subprocess.Popen[str], Path]:
    """The sweep of MANY_UNITS as a subprocess (``group``: the leader of a process group of its own)."""
    config = tmp_path / "many.toml"
    scales = ", ".join(str(s) for s in range(1, units + 1))
    config.write_text(MANY_UNITS.format(scales=scales), encoding="utf-8")
    marker = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CE_AUDIT_TEST_MARKER": str(marker)}
    command = [
        sys.executable, "-m", "ce_audit", "sweep", "--config", str(config), "--plugin", str(FAULTS),
        "--out", str(tmp_path / "out"), *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group
    )
    return process, marker


def _wait_for_calls(process: subprocess.Popen[str], marker: Path, calls: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if marker.is_file() and len(marker.read_text().splitlines()) >= calls:
            return
        time.sleep(0.02)
    pytest.fail(f"the sweep made fewer than {calls} calls (exit {process.poll()})")


def _check_partial_report(
    tmp_path: Path, process: subprocess.Popen[str], signum: int, at_least: int, units: int = 40
) -> None:
    """The run exited 128 + signum, with a partial report of the units it completed, in order."""
    out, err = process.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err and "died" not in err, err
    assert f"ce-audit: interrupted by {name}: the partial report of" in err and str(tmp_path / "out") in err
    assert "partial report: " in out and f"(interrupted by {name})" in out
    document = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    completed, total = document["units"]["completed"], document["units"]["total"]
    assert document["partial"] is True and document["interrupted"] == name
    assert total == units and at_least <= completed < total
    rows = read_rows(tmp_path / "out" / "summary.csv")
    assert len(rows) == document["cells"] == 2 * completed  # fused and marked_slow per unit
    assert all(row["status"] == "ok" for row in rows)
    assert sorted({float(row["scale"]) for row in rows}) == [float(s) for s in range(1, completed + 1)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interruption_writes_the_completed_units_as_a_partial_report(tmp_path, signum):
    process, marker = _start_sweep(tmp_path)
    _wait_for_calls(process, marker, 3)
    process.send_signal(signum)
    _check_partial_report(tmp_path, process, signum, at_least=3)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_process_group_with_jobs_keeps_the_completed_units(tmp_path, signum):
    """What `timeout`, `kill -TERM -PGID` and a CI runner's cancel do: the whole group gets the signal.
    The --jobs workers have left the group; the run stops them and keeps what they completed."""
    process, marker = _start_sweep(tmp_path, "--jobs", "2", group=True, units=400)
    _wait_for_calls(process, marker, 6)
    os.killpg(process.pid, signum)
    _check_partial_report(tmp_path, process, signum, at_least=1, units=400)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_ctrl_c_while_the_jobs_workers_start(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) as soon as the first --jobs worker exists."""
    process, _ = _start_sweep(tmp_path, "--jobs", "2", group=True, units=400)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if any(_children(child) for child in _children(process.pid)):  # forkserver → a worker
            break
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _check_partial_report(tmp_path, process, signal.SIGINT, at_least=0, units=400)


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """In-process (--isolation none) a hanging plugin holds the unit; the second SIGINT does not wait."""
    config = tmp_path / "hang.toml"
    config.write_text(MANY_UNITS.format(scales="1, 2").replace("marked_slow", "hangs"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "ce_audit", "sweep", "--config", str(config), "--plugin", str(FAULTS),
        "--isolation", "none", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:  # the plugin announces itself on stdout
        line = process.stdout.readline() if process.stdout else ""
        if "hangs: about to misbehave" in line:
            break
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # the first only asks the run to stop after the unit in flight
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 130
    assert "SIGINT again: stopped at once" in err
    assert not (tmp_path / "out" / "report.json").exists()

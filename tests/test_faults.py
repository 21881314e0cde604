"""Fault injection: implementations that crash, exit, hang, raise a BaseException or change process-wide
state cost only their own cells; SIGINT, SIGTERM and SIGHUP, to the run or to its process group, with or
without --jobs, at any moment, keep the completed cells as a partial report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import PLUGINS, read_rows, run_cli

import ce_audit
from ce_audit.backends import BlockCall
from ce_audit.dtypes import float_format
from ce_audit.options import LossOptions
from ce_audit.reports.bundle import ReportDirectory
from ce_audit.reports.plots import plotting_available
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
    fmt = float_format("float32")
    call = BlockCall(block, np.array([0, 1]), fmt, "cpu", {}, False, LossOptions(), None, (2,))
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


# --- merge verifies its shards; text from plugins and files is printed with its escapes shown ---------

PLUGIN_CODE = """
import torch
import ce_audit


@ce_audit.register("copied_ce")
def copied_ce(logits, targets):
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none").to(logits.dtype)
"""


def _shard(tmp_path: Path, capsys, name: str, index: int, *extra: object) -> Path:
    out = tmp_path / name
    code, _, err = run_cli(
        ["sweep", *SMALL, "--impl", "fused", *extra, "--shard", f"{index}/2", "--out", out], capsys
    )
    assert code == 0, err
    return out


def _merge_error(capsys, out: Path, *shards: Path) -> str:
    code, _, err = run_cli(["merge", *shards, "--out", out], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("ce-audit: error: "), err
    assert not out.exists()
    return err


def test_merge_refuses_an_edited_shard(tmp_path, capsys):
    """An edited shard came out of merge with fresh digests the gate accepted; now merge refuses it."""
    first, second = _shard(tmp_path, capsys, "a", 1), _shard(tmp_path, capsys, "b", 2)
    summary = second / "summary.csv"
    lines = summary.read_text().splitlines()
    header, row = lines[0].split(","), lines[1].split(",")
    row[header.index("max_ulp")] = "0.0"
    summary.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    code, _, err = run_cli(["gate", second, "--current", second], capsys)
    assert code == 2 and "not the one report.json beside it describes" in err  # as the gate does
    err = _merge_error(capsys, tmp_path / "merged", first, second)
    assert f"{summary} is not the one its report.json describes" in err
    (second / "report.html").unlink()  # a listed file gone is refused too
    summary.write_text("\n".join(lines) + "\n")
    assert "report.html is missing" in _merge_error(capsys, tmp_path / "merged", first, second)


def test_merge_refuses_shards_of_different_plugin_code(tmp_path, capsys):
    plugin = tmp_path / "copied.py"
    plugin.write_text(PLUGIN_CODE)
    specs = ("--plugin", plugin, "--impl", "copied_ce")
    first = _shard(tmp_path, capsys, "a", 1, *specs)
    document = json.loads((first / "report.json").read_text())
    assert document["plugin_sha256"] == {str(plugin): hashlib.sha256(PLUGIN_CODE.encode()).hexdigest()}
    plugin.write_text(PLUGIN_CODE.replace(".to(logits.dtype)", ""))  # the same name, other code
    second = _shard(tmp_path, capsys, "b", 2, *specs)
    err = _merge_error(capsys, tmp_path / "merged", first, second)
    assert f"ran different code for plugin {plugin}" in err
    plugin.write_text(PLUGIN_CODE)
    second = _shard(tmp_path, capsys, "c", 2, *specs)  # the same code again: merged
    code, _, err = run_cli(["merge", first, second, "--out", tmp_path / "merged", "-q"], capsys)
    assert code == 0, err
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert merged["plugin_sha256"] == document["plugin_sha256"]


def test_plugin_digests_cover_plugin_files_and_impl_modules(tmp_path, monkeypatch):
    """report.json's plugin_sha256: each --plugin file and the module of each --impl module:attr."""
    from ce_audit.reports.json import plugin_digests

    monkeypatch.chdir(tmp_path)
    Path("one.py").write_text("A = 1\n")
    Path("two.py").write_text("B = 2\n")
    digests = plugin_digests(["one.py"], ["two.py:f,backend=numpy", "fused", "json:dumps", "absent.py:f"])
    sha = {name: hashlib.sha256(Path(name).read_bytes()).hexdigest() for name in ("one.py", "two.py")}
    assert digests == {**sha, "json": hashlib.sha256(Path(json.__file__).read_bytes()).hexdigest()}


ESCAPES = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[1A\\x9b2K\\r"
ESCAPING_PLUGIN = f'''
import os, sys
import ce_audit


@ce_audit.register("raises_escapes")
def raises_escapes(logits, targets):
    raise RuntimeError("{ESCAPES}gone")


@ce_audit.register("prints_escapes")
def prints_escapes(logits, targets):
    print("{ESCAPES}tail", flush=True)
    os._exit(3)
'''
RAW = ("\x1b", "\x07", "\x9b", "\r")


def test_escape_sequences_from_plugins_reach_no_terminal(tmp_path, capsys):
    """A plugin's error text and output (title, clear screen, cursor moves) are shown as escapes."""
    plugin = tmp_path / "escaping.py"
    plugin.write_text(ESCAPING_PLUGIN)
    args = ["sweep", *SMALL[:-1], "--plugin", plugin, "--impl", "raises_escapes", "--impl", "prints_escapes"]
    code, out, err = run_cli([*args, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert not [c for c in RAW if c in out + err], (out, err)
    assert "\\x1b]0;pwned" in out  # the terminal report names what was there
    errors = {row["impl"]: row["error"] for row in read_rows(tmp_path / "out" / "summary.csv")}
    assert errors["raises_escapes"].startswith("RuntimeError: \\x1b]0;pwned\\x07\\x1b[2J")
    assert "(last output: \\x1b]0;pwned" in errors["prints_escapes"]
    plugin.write_text(f'raise RuntimeError("{ESCAPES}at import")\n')  # an import error: one line
    code, _, err = run_cli([*args, "--out", tmp_path / "again"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "\\x1b[2J" in err
    assert not [c for c in RAW if c in err], err


def test_escape_sequences_in_a_baseline_report_reach_no_terminal(tmp_path, capsys):
    """A baseline report.json's versions (and a summary.csv's text) are printed with escapes shown."""
    runs = {}
    for name in ("base", "now"):
        runs[name] = tmp_path / name
        code, _, err = run_cli(["sweep", *SMALL, "--impl", "fused", "--out", runs[name]], capsys)
        assert code == 0, err
    report = runs["base"] / "report.json"
    document = json.loads(report.read_text())
    document["versions"]["numpy"] = "0.1\x1b]0;owned\x07\x1b[2J"
    report.write_text(json.dumps(document))
    outputs = ["--markdown", tmp_path / "gate.md", "--junit", tmp_path / "gate.xml"]
    code, out, err = run_cli(["gate", runs["base"], "--current", runs["now"], *outputs], capsys)
    assert code == 0, err
    assert "versions differ" in out and "\\x1b]0;owned\\x07\\x1b[2J" in out
    written = (tmp_path / "gate.md").read_text() + (tmp_path / "gate.xml").read_text()
    assert not [c for c in RAW if c in out + err + written]
    assert "\\x1b]0;owned" in (tmp_path / "gate.md").read_text()


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


def _command_line(pid: int) -> bytes | None:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_ctrl_c_while_the_jobs_workers_start(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) as soon as the first --jobs worker exists."""
    process, _ = _start_sweep(tmp_path, "--jobs", "2", group=True, units=400)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        children = _children(process.pid)
        if any(_command_line(child) == _command_line(process.pid) for child in children):  # forked from it
            break
        if any(_children(child) for child in children):  # forkserver → a worker
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


# --- the report set touches only what ce-audit writes, inside its directory ----------------------------

TINY_SWEEP = [
    "sweep", "--impl", "shifted", "--dtype", "float32", "--vocab", "64", "--batch", "8",
    "--distribution", "normal", "--scale", "1", "--offset", "0", "--device", "cpu", "-q",
]  # fmt: skip
FOREIGN_LIST = {"files": {"notes.txt": "0", "src": None, ".git": None}, "run_id": "0"}


def _sweep_ok(capsys, *args: object) -> None:
    code, _, err = run_cli([*TINY_SWEEP, *args], capsys)
    assert code == 0, err


def _users_files(out: Path) -> dict[str, str]:
    """A user's files beside a report.json (from an artifact, a pull request) whose `files` names them."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "src").mkdir()
    (out / ".git").mkdir()
    files = {"notes.txt": "my notes", "src/main.py": "print(1)", ".git/HEAD": "ref: refs/heads/main"}
    for name, text in files.items():
        (out / name).write_text(text)
    (out / "report.json").write_text(json.dumps(FOREIGN_LIST))
    return files


def _write_a_set(command: str, out: Path, tmp_path: Path, capsys) -> None:
    if command == "sweep":
        _sweep_ok(capsys, "--out", out)
    elif command == "replay":
        np.save(tmp_path / "logits.npy", np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32))
        np.save(tmp_path / "targets.npy", np.arange(4))
        args = ["replay", tmp_path / "logits.npy", tmp_path / "targets.npy", "--impl", "shifted"]
        code, _, err = run_cli([*args, "--device", "cpu", "-q", "--out", out], capsys)
        assert code == 0, err
    elif command == "merge":
        for k in (1, 2):
            _sweep_ok(capsys, "--scale", "2", "--shard", f"{k}/2", "--jobs", "1", "--out", tmp_path / f"s{k}")
        code, _, err = run_cli(["merge", tmp_path / "s1", tmp_path / "s2", "--out", out, "-q"], capsys)
        assert code == 0, err
    else:  # gate --update: the current run's summary becomes the baseline in `out`
        _sweep_ok(capsys, "--out", tmp_path / "current")
        args = ["gate", out, "--current", tmp_path / "current" / "summary.csv", "--update"]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err


@pytest.mark.parametrize("command", ["sweep", "replay", "merge", "gate --update"])
def test_a_report_json_of_elsewhere_deletes_nothing(tmp_path, capsys, command):
    """The names a set removes are this version's own, never those a report.json in --out lists."""
    out = tmp_path / "out"
    files = _users_files(out)
    _write_a_set(command, out, tmp_path, capsys)
    assert {name: (out / name).read_text() for name in files} == files
    assert json.loads((out / "report.json").read_text())["files"].keys() >= {"summary.csv"}


def test_report_keeps_what_it_did_not_write_and_writes_nothing_through_a_link(tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    _sweep_ok(capsys, "--out", out)
    (out / "plots").mkdir()
    (out / "plots" / "my-chart.png").write_bytes(b"the user's figure")  # not a name ce-audit writes
    code, _, err = run_cli(["report", out], capsys)
    assert code == 0, err
    assert (out / "plots" / "my-chart.png").read_bytes() == b"the user's figure"
    _sweep_ok(capsys, "--out", out)  # a new set without figures: the folder and the user's file stay
    assert (out / "plots" / "my-chart.png").read_bytes() == b"the user's figure"
    elsewhere.mkdir()
    (elsewhere / "heatmap-float32.png").write_bytes(b"outside")
    (elsewhere / "photo.png").write_bytes(b"outside too")
    shutil.rmtree(out / "plots")
    (out / "plots").symlink_to(elsewhere, target_is_directory=True)
    for args in (["report", out], [*TINY_SWEEP, "--out", out]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "is a symbolic link" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(path.name for path in elsewhere.iterdir()) == ["heatmap-float32.png", "photo.png"]
    assert (elsewhere / "heatmap-float32.png").read_bytes() == b"outside"


@pytest.mark.skipif(not plotting_available(), reason="matplotlib (the html extra)")
def test_report_without_matplotlib_keeps_the_sets_figures(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _sweep_ok(capsys, "--scale", "10", "--out", out)  # two scales: figures
    before = {path.name: path.read_bytes() for path in (out / "plots").iterdir()}
    page = (out / "report.html").read_bytes()
    assert before and b"data:image/png;base64," in page
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = run_cli(["report", out], capsys)
    assert code == 2 and "matplotlib is not installed" in err and len(err.strip().splitlines()) == 1
    assert {path.name: path.read_bytes() for path in (out / "plots").iterdir()} == before
    assert (out / "report.html").read_bytes() == page


def test_report_rewrites_the_set_in_place_with_the_same_digests(tmp_path, capsys):
    out = tmp_path / "out"
    _sweep_ok(capsys, "--out", out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    code, _, err = run_cli(["report", out], capsys)
    assert code == 0, err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_report_takes_the_lock(tmp_path, capsys):
    """`ce-audit report` beside a run writing the same directory waits for nothing and mixes nothing."""
    out = tmp_path / "out"
    _sweep_ok(capsys, "--out", out)
    before = (out / "report.html").read_bytes()
    with ReportDirectory(out):  # a run holding the directory
        code, _, err = run_cli(["report", out], capsys)
    assert code == 2 and "another ce-audit run is writing to" in err and len(err.strip().splitlines()) == 1
    assert (out / "report.html").read_bytes() == before
    code, _, err = run_cli(["report", out], capsys)  # released
    assert code == 0, err


FORKING_PLUGIN = """
import os
import time

import numpy as np

import ce_audit


@ce_audit.register("forks_a_child", backend="numpy")
def forks_a_child(logits, targets):
    pid = os.fork()
    if pid == 0:  # a child that outlives the run
        time.sleep(120)
        os._exit(0)
    with open(os.environ["CE_AUDIT_TEST_CHILDREN"], "a") as stream:
        stream.write(f"{pid}\\n")
    row_max = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - row_max).sum(axis=1)) + row_max[:, 0]
    return (lse - logits[np.arange(logits.shape[0]), targets]).astype(logits.dtype)
"""


@pytest.mark.parametrize("isolation_mode", ["process", "none"])
def test_a_forked_child_does_not_keep_the_lock(tmp_path, capsys, monkeypatch, isolation_mode):
    plugin, children, out = tmp_path / "forking.py", tmp_path / "children.txt", tmp_path / "out"
    plugin.write_text(FORKING_PLUGIN)
    monkeypatch.setenv("CE_AUDIT_TEST_CHILDREN", str(children))
    args = ["--plugin", plugin, "--impl", "forks_a_child", "--isolation", isolation_mode, "--out", out]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a multi-threaded process
            _sweep_ok(capsys, *args)
            assert children.read_text().split()  # a child lives on
            code, _, err = run_cli([*TINY_SWEEP, "--out", out], capsys)
        assert code == 0, err  # not "another ce-audit run is writing"
    finally:
        for pid in children.read_text().split() if children.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(pid), 0)  # this process's own child (isolation none): no zombie left


# --- --save-failures: reproducer folders written whole, never through a link ---------------------------

FAILING_SWEEP = [
    "sweep", "--impl", "naive", "--dtype", "float16", "--vocab", "64", "--batch", "8",
    "--distribution", "normal", "--scale", "100", "--offset", "0", "--device", "cpu", "-q",
]  # fmt: skip
FOLDER = "000-naive-float16-cpu-normal-scale100"  # the one failing cell's reproducer folder


def test_save_failures_writes_nothing_through_a_link_in_a_reproducer_folder(tmp_path, capsys):
    saved, elsewhere = tmp_path / "failures", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (saved / FOLDER).mkdir(parents=True)
    for name in ("logits.npy", "targets.npy", "logits.pt", "command.txt"):
        (elsewhere / name).write_text(f"the user's {name}")
        (saved / FOLDER / name).symlink_to(elsewhere / name)  # an earlier folder, links planted in it
    code, _, err = run_cli([*FAILING_SWEEP, "--out", tmp_path / "out", "--save-failures", saved], capsys)
    assert code == 0, err
    for name in ("logits.npy", "targets.npy", "logits.pt", "command.txt"):
        assert (elsewhere / name).read_text() == f"the user's {name}"
        assert not (saved / FOLDER / name).is_symlink()
    assert np.load(saved / FOLDER / "logits.npy").shape[1] == 64
    assert f"replay {saved / FOLDER / 'logits.npy'}" in (saved / FOLDER / "command.txt").read_text()
    assert [path.name for path in saved.iterdir()] == [FOLDER]  # no staging left


@pytest.mark.skipif(not plotting_available(), reason="matplotlib (the html extra): report redraws the set")
def test_report_markdown_lists_only_the_sets_figures(tmp_path, capsys):
    out = tmp_path / "out"
    _sweep_ok(capsys, "--out", out)
    (out / "plots").mkdir()
    (out / "plots" / "my-chart.png").write_bytes(b"the user's figure")
    (out / "plots" / "heatmap-float32.png").write_bytes(b"\x89PNG")
    code, _, err = run_cli(["report", out, "--markdown", tmp_path / "plots.md"], capsys)
    assert code == 0, err
    text = (tmp_path / "plots.md").read_text()
    assert "my-chart.png" not in text and "No plots in" in text  # a one-case set has no figures
    assert not (out / "plots" / "heatmap-float32.png").exists()  # an older set's figure, removed

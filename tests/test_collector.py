"""The garbage collector paused while the command line starts (ce_audit.collector): running again, its
start-up objects frozen, wherever an implementation is called or a command does its work; untouched where
ce_audit is used as a library."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ce_audit import collector

ROOT = Path(__file__).resolve().parents[1]

# A plugin that records, where it is imported and wherever its implementation is called, whether the
# collector runs and how many objects it has frozen.
RECORDING_PLUGIN = textwrap.dedent(
    """
    import gc, json, os
    import torch
    import ce_audit

    def record(where):
        with open(os.environ["CE_AUDIT_TEST_GC_RECORD"], "a") as stream:
            stream.write(json.dumps([where, os.getpid(), gc.isenabled(), gc.get_freeze_count()]) + "\\n")

    record("import")

    @ce_audit.register("gc_recording_ce")
    def gc_recording_ce(logits, targets):
        record("call")
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    """
)


def _records(tmp_path: Path, *args: str) -> tuple[int, list[tuple[str, int, bool, int]]]:
    """The process id of `python -m ce_audit ARGS --plugin <the recording plugin>`, and its records."""
    plugin = tmp_path / "gc_recording.py"
    plugin.write_text(RECORDING_PLUGIN)
    record = tmp_path / "records.jsonl"
    record.unlink(missing_ok=True)
    env = {**os.environ, "CE_AUDIT_TEST_GC_RECORD": str(record), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "ce_audit", *args, "--plugin", str(plugin)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return process.pid, [tuple(json.loads(line)) for line in record.read_text().splitlines()]


def test_resume_without_a_pause_changes_nothing() -> None:
    """A library user's collector is theirs: resume() undoes only this module's own pause."""
    frozen = gc.get_freeze_count()
    collector.resume()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    gc.disable()
    try:
        collector.pause()  # already off: not this module's to turn back on
        collector.resume()
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert gc.get_freeze_count() == frozen


def test_pause_stops_the_collector_and_resume_freezes_what_start_up_left() -> None:
    program = textwrap.dedent(
        """
        import gc
        from ce_audit import collector
        collector.pause()
        paused = not gc.isenabled()
        start_up = [{"n": n} for n in range(1000)]
        before = gc.get_freeze_count()
        collector.resume()
        print(paused, gc.isenabled(), before, gc.get_freeze_count() >= len(start_up))
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "0", "True"]


def test_a_process_that_collects_itself_collects_once_each_time_it_asks(monkeypatch) -> None:
    """resume(automatic=False) (a painter): the start-up frozen, no automatic pass, and ``collect`` frees the
    cycles left by a piece of work; where the collector was not paused here, ``collect`` does nothing."""
    program = textwrap.dedent(
        """
        import gc, weakref
        from ce_audit import collector
        collector.pause()
        collector.resume(automatic=False)
        class Node: pass
        node = Node(); node.me = node  # a cycle, as a drawn figure leaves
        alive = weakref.ref(node)
        del node
        before = alive() is not None
        collector.collect()
        print(gc.isenabled(), gc.get_freeze_count() > 0, before, alive() is None)
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True", "True"]
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *args: calls.append(args))
    collector.collect()
    assert calls == []


SWEEP = [
    "sweep", "--impl", "gc_recording_ce", "--distribution", "normal", "--scale", "1", "--offset", "0",
    "--vocab", "1000", "--device", "cpu", "--no-grad", "--quiet",
]  # fmt: skip
# One small unit in the run's process; three units of 4096 × 1000 logits past FORKED_SMALL_SWEEP_COST, in
# two workers forked from the run (ce_audit.run.worker_start)
RUNS = {
    "one unit, one job": ["--dtype", "float32", "--batch", "8", "--jobs", "1"],
    "forked workers": ["--dtype", "float16", "--dtype", "bfloat16", "--dtype", "float32", "--batch", "4096",
                       "--jobs", "2"],
}  # fmt: skip


@pytest.mark.parametrize("run", RUNS.values(), ids=RUNS.keys())
def test_a_sweep_calls_every_implementation_with_the_collector_running(
    tmp_path: Path, run: list[str]
) -> None:
    """The command pauses the collector for its imports (the plugin's among them) and resumes it before the
    audit: every call of the implementation finds it running, in a process forked from the run after the
    start-up (on Linux), with the start-up's objects frozen."""
    pid, records = _records(tmp_path, *SWEEP, *run, "--out", str(tmp_path / "out"))
    calls = [record for record in records if record[0] == "call"]
    assert calls and all(enabled for _, _, enabled, _ in calls)
    imported_in_the_run = [record for record in records if record[0] == "import" and record[1] == pid]
    assert imported_in_the_run and not any(enabled for _, _, enabled, _ in imported_in_the_run)  # paused
    if sys.platform.startswith("linux"):
        assert all(frozen > 0 for _, _, _, frozen in calls)


def test_another_command_works_with_the_collector_running(tmp_path: Path) -> None:
    """`ce-audit list` loads its plugins in the command, after the start-up: the collector runs again."""
    _, records = _records(tmp_path, "list")
    imports = [(enabled, frozen) for where, _, enabled, frozen in records if where == "import"]
    assert imports and all(enabled and frozen > 0 for enabled, frozen in imports)

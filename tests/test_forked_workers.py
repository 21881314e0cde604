"""Worker processes forked from the run once torch is imported (ce_audit.run.worker_start):
taken only where they are safe and pay, and they give the report of one process."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import clean_registry, run_cli  # noqa: F401

from ce_audit import devices
from ce_audit.config import load_config
from ce_audit.plan.units import plan_units
from ce_audit.run import executors, isolation, worker_start
from ce_audit.run.executors import (
    FORKED_SMALL_SWEEP_COST,
    Execution,
    ProcessExecutor,
    available_cores,
    sweep_cost,
)
from ce_audit.run.worker_start import workers_forked_ahead

pytestmark = pytest.mark.usefixtures("clean_registry")
needs_fork = pytest.mark.skipif(
    not worker_start.can_fork_workers() or available_cores() < 2, reason="forks workers on Linux, 2+ cores"
)
# 3 units of 4096 × 1000 logits, one implementation: past FORKED_SMALL_SWEEP_COST, below SMALL_SWEEP_COST
FORKED_GRID = [
    "--impl", "naive", "--dtype", "float16", "--dtype", "bfloat16", "--dtype", "float32", "--batch", "4096",
    "--vocab", "1000", "--distribution", "normal", "--scale", "1", "--offset", "0", "--device", "cpu", "-q",
]  # fmt: skip


def test_forked_workers_only_for_units_on_the_cpu_in_one_thread_workers(
    tiny_config: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    headline = plan_units(load_config(None, {"dtypes": ["float16"]}), cpu_only=True)[0]
    tiny = plan_units(tiny_config)[0]  # type: ignore[arg-type]
    assert sweep_cost(tiny) < FORKED_SMALL_SWEEP_COST <= sweep_cost(headline)
    monkeypatch.setattr(executors, "available_cores", lambda: 8)
    assert Execution(jobs=None).forked_workers(headline) == 8  # one thread each
    assert Execution(jobs=8).forked_workers(headline) == 8
    assert Execution(jobs=2).forked_workers(headline) is None  # 4 threads each: torch's pool after a fork
    assert Execution(jobs=None).forked_workers(tiny) is None  # a fork would cost more than it saves
    assert Execution(jobs=1).forked_workers(headline) is None
    assert Execution(executor="local", jobs=None).forked_workers(headline) is None
    assert Execution(executor="ray", jobs=None).forked_workers(headline) is None
    on_gpu = [dataclasses.replace(unit, devices=("cpu", "cuda:0")) for unit in headline]
    assert Execution(jobs=None).forked_workers(on_gpu) is None  # CUDA after a fork is unusable


def test_a_sweep_on_the_cpu_alone_is_known_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices.platform, "system", lambda: "Linux")
    monkeypatch.setattr(devices.os.path, "exists", lambda path: False)
    assert devices.cpu_alone(["cpu"]) and devices.cpu_alone(["auto"]) and devices.cpu_alone(["ALL", "cpu"])
    assert not devices.cpu_alone(["cuda"]) and not devices.cpu_alone(["mps"])
    monkeypatch.setattr(devices.os.path, "exists", lambda path: path == "/dev/nvidiactl")
    assert devices.cpu_alone(["cpu"]) and not devices.cpu_alone(["auto"])  # a GPU torch may find
    monkeypatch.setattr(devices.platform, "system", lambda: "Darwin")  # MPS, unknown until torch says
    assert devices.cpu_alone(["cpu"]) and not devices.cpu_alone(["auto"])


def _where_it_ran(unit: object, progress: object = None) -> list[tuple[bool, int, int]]:
    """In the worker: whether it is in a session, its parent, torch's threads."""
    torch = sys.modules["torch"]
    return [(isolation.in_session(), os.getppid(), torch.get_num_threads())]


@needs_fork
def test_forked_workers_run_the_units_on_one_thread_outside_the_runs_session() -> None:
    pytest.importorskip("torch")
    with isolation.session("process", 10.0), workers_forked_ahead(2):
        pool = worker_start._FORKED[2]
        results = list(ProcessExecutor(2).map(_where_it_ran, ["a", "b", "c"], None))
        assert worker_start._FORKED == {}  # the executor took the pool, and shut it down
    assert pool._shutdown_thread
    assert [row for cells in results for row in cells] == [(False, os.getpid(), 1)] * 3


@needs_fork
def test_a_forked_pool_left_unused_is_shut_down() -> None:
    with workers_forked_ahead(2):
        pool = worker_start._FORKED[2]
        processes = list(pool._processes.values())
        assert len(processes) == 2 and all(process.is_alive() for process in processes)
    assert worker_start._FORKED == {} and not any(process.is_alive() for process in processes)


@needs_fork
def test_the_command_forks_its_workers_and_reports_as_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep past FORKED_SMALL_SWEEP_COST runs in workers forked from the run (no forkserver, no
    spawn), and its summary is byte for byte that of --jobs 1."""
    methods: list[str] = []
    real_pool = worker_start.ProcessPoolExecutor

    def recording_pool(*args: object, mp_context: object, **kwargs: object) -> object:
        methods.append(mp_context.get_start_method())  # type: ignore[attr-defined]
        return real_pool(*args, mp_context=mp_context, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_start, "ProcessPoolExecutor", recording_pool)
    code, _, err = run_cli(["sweep", *FORKED_GRID, "--out", tmp_path / "forked"], capsys)
    assert code == 0, err
    assert methods == ["fork"]
    code, _, err = run_cli(["sweep", *FORKED_GRID, "--jobs", "1", "--out", tmp_path / "one"], capsys)
    assert code == 0, err
    assert methods == ["fork"]  # --jobs 1: no worker
    one, forked = ((tmp_path / name / "summary.csv").read_bytes() for name in ("one", "forked"))
    assert forked == one and one.count(b"\n") == 4


@needs_fork
def test_torch_is_imported_once_before_the_workers_are_forked(tmp_path: Path) -> None:
    """A sweep on `--device cpu` imports no torch to find its devices; the run imports it before it forks
    its workers (else each would import it again, and the run too, for the traces)."""
    program = textwrap.dedent(
        f"""
        import sys
        from ce_audit.run import worker_start
        real = worker_start.ProcessPoolExecutor
        def pool(*args, mp_context, **kwargs):
            print(mp_context.get_start_method(), "torch" in sys.modules, file=sys.stderr)
            return real(*args, mp_context=mp_context, **kwargs)
        worker_start.ProcessPoolExecutor = pool
        from ce_audit.cli import main
        main({[*FORKED_GRID, "--out", str(tmp_path / "out")]!r})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program.replace("main([", "main(['sweep', ")], capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.split() == ["fork", "True"]

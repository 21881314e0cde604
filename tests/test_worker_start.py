"""Fixed costs a sweep no longer pays: workers that start while the run plans, sympy in a seeded backward."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ce_audit.config import load_config
from ce_audit.plan.units import plan_units
from ce_audit.run import worker_start
from ce_audit.run.executors import Execution, ProcessExecutor, available_cores
from ce_audit.upstream import seeded_backward


def _in_fresh_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_units_planned_on_the_cpu_alone_are_the_sweeps_and_import_no_torch():
    printed = _in_fresh_python(
        """
        import sys
        from ce_audit.config import load_config
        from ce_audit.plan.units import plan_units
        units, devices = plan_units(load_config(None, {}), cpu_only=True)
        print(len(units), ",".join(devices), "torch" in sys.modules)
        """
    )
    count, devices, torch_loaded = printed.split()
    assert (devices, torch_loaded) == ("cpu", "False")
    units = plan_units(load_config(None, {}))[0]
    assert int(count) == len(units)


def test_worker_threads_only_where_the_units_run_in_worker_processes():
    units = plan_units(load_config(None, {}), cpu_only=True)[0]
    small = plan_units(load_config(None, {"dtypes": ["float16"]}), cpu_only=True)[0]
    assert Execution(jobs=1).worker_threads(units) is None
    assert Execution(jobs=None).worker_threads(small) is None  # the float16 sweep stays in this process
    assert Execution(executor="processes", jobs=2).worker_threads(units) == max(1, available_cores() // 2)
    if available_cores() > 1:
        assert isinstance(Execution(jobs=None).executor_for(units), ProcessExecutor)
        assert Execution(jobs=None).worker_threads(units) == 1


def test_a_forkserver_started_with_other_threads_is_not_used(monkeypatch):
    if "forkserver" not in worker_start.multiprocessing.get_all_start_methods():
        pytest.skip("no forkserver here")
    monkeypatch.setattr(worker_start, "_forkserver", {"threads": 2})
    assert worker_start.start_method(2) == "forkserver"
    assert worker_start.start_method(1) == "spawn"  # its numpy and torch chose 2 threads


def test_seeded_backward_is_backward_and_imports_no_sympy():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.25, -3.0]], requires_grad=True)
    seed = torch.tensor([0.75, 1.5])
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0]), reduction="none")
    seeded_backward(torch, losses, seed)
    expected = logits.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(expected, torch.tensor([2, 0]), reduction="none").backward(seed)
    assert torch.equal(logits.grad, expected.grad)
    printed = _in_fresh_python(
        """
        import sys, torch
        from ce_audit.upstream import seeded_backward
        x = torch.ones(3, requires_grad=True)
        seeded_backward(torch, x * 2, torch.full((3,), 0.5))
        print(x.grad.tolist(), "sympy" in sys.modules)
        """
    )
    assert printed == "[1.0, 1.0, 1.0] False"

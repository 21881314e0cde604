"""The run's side of one worker process: start it, send it calls, read its answers, stop it and its
descendants.

A worker is started with the run's signals held (they reach it only once it has left the run's process
group, ``worker_process.set_apart``), answers one call at a time under the time limit, and is stopped —
its process group and every descendant it reaped killed — when it died, passed the limit, changed state
that cannot be put back, or the run is over. Its output is a log file of which only the last
``TAIL_BYTES`` are read.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ce_audit.backends import BlockCall, Outcome
from ce_audit.printable import printable
from ce_audit.run.interruption import held_signals
from ce_audit.run.worker_process import CallFailed, WorkerSpec, out_of_memory, worker_main

STARTUP_LIMIT_S = 120.0  # a spawned worker imports the frameworks and the plugins first
TAIL_LINES = 3  # lines of the worker's output quoted in a failed cell's reason
TAIL_BYTES = 16 * 1024  # how much of the end of the worker's output is read to find them
_POLL_S = 0.1  # the wait for a worker's answer is sliced, so an interruption is seen in time


def _jax_started() -> bool:
    """Whether JAX's runtime (multithreaded: a fork of it can deadlock) has started in this process."""
    if "jax" not in sys.modules:
        return False
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def start_method() -> str:
    """``fork`` on Linux while neither CUDA nor JAX's runtime has started here (a fork after either is
    unusable or can deadlock), else ``spawn``."""
    torch = sys.modules.get("torch")
    cuda_started = torch is not None and hasattr(torch, "cuda") and torch.cuda.is_initialized()
    unsafe = cuda_started or _jax_started()
    return "fork" if sys.platform.startswith("linux") and not unsafe else "spawn"


def exit_description(code: int | None) -> str:
    """``killed by SIGSEGV`` or ``exited with code 3``."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def read_tail(path: str | Path, lines: int = TAIL_LINES, limit: int = TAIL_BYTES) -> str:
    """The last ``lines`` non-blank lines of a file, from its last ``limit`` bytes only, joined by `` | ``
    (at most 300 characters)."""
    try:
        with open(path, "rb") as stream:
            stream.seek(0, os.SEEK_END)
            size = stream.tell()
            stream.seek(max(0, size - limit))
            data = stream.read(limit)
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    kept = [printable(line.strip()) for line in text.splitlines() if line.strip()][-lines:]
    quoted = " | ".join(kept)
    return quoted if len(quoted) <= 300 else "…" + quoted[-299:]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; its children, theirs, and so on)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children: list[int] = []
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{parent}/task/{task}/children").read_text()
                    children += [int(child) for child in text.split()]
        found += children
        frontier += children
    return found


def end_processes(group: int, pids: list[int]) -> None:
    """SIGKILL a worker's process group and the processes it had below it (some may have left the group)."""
    with contextlib.suppress(OSError):
        os.killpg(group, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class Worker:
    """One worker process: started on first use and again after it was stopped."""

    def __init__(self, spec: WorkerSpec, timeout: float, memory_limit: int, directory: str) -> None:
        self.spec = spec
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.method = "fork"
        self.log_path = str(Path(directory) / "output.log")
        self.process: Any = None
        self.conn: Any = None
        self.pickles: dict[str, bytes | None] = {}
        self.calls = 0  # calls sent; each answer carries its call's number
        self.value: Outcome | None = None  # the call's value sent ahead of its gradient, if it was
        self.starts = 0

    def _start(self) -> None:
        self.method = start_method()
        context: Any = multiprocessing.get_context(self.method)
        parent_end, child_end = context.Pipe()
        spec = None if self.method == "fork" else self.spec
        self.process = context.Process(
            target=worker_main,
            args=(child_end, parent_end, self.log_path, spec, self.memory_limit),
            daemon=True,
            name="ce-audit-worker",
        )
        with held_signals():  # a signal to the run's group must not reach it before it leaves the group
            self.process.start()
            with contextlib.suppress(OSError):
                os.setpgid(self.process.pid, self.process.pid)
        self.starts += 1
        child_end.close()
        self.conn = parent_end
        self._receive(0, max(STARTUP_LIMIT_S, self.timeout), "did not start")

    def _fail(self, what: str) -> CallFailed:
        tail = read_tail(self.log_path)
        return CallFailed(f"{what} (last output: {tail})" if tail else what)

    def stop(self) -> int | None:
        """End the worker (killing it if it still runs) and all its descendants; its exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        below = descendants(process.pid)
        with contextlib.suppress(OSError):
            self.conn.close()
        if below:  # they were reaped by it: end them before it goes, or they go to init
            end_processes(process.pid, below)
        process.join(timeout=1.0)
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)
        end_processes(process.pid, below)
        return process.exitcode

    def _receive(self, number: int, limit: float, hang: str) -> tuple[str, Any, list[str]]:
        """The worker's answer to message ``number``: (kind, value, changed); a CallFailed when the worker
        died or passed ``limit`` seconds (0: none)."""
        from ce_audit.run.interruption import Interrupted, stop_requested

        deadline = time.monotonic() + limit
        self.value = None
        while True:
            try:
                if self.conn.poll(_POLL_S):
                    answered, kind, value, changed = self.conn.recv()
                    if answered == number and kind == "value":
                        self.value = value  # the loss, before the gradient is taken
                        continue
                    if answered == number:
                        return kind, value, changed
                    continue  # a stale answer (to a call given up on): not this one's
            except (EOFError, OSError):
                self.process.join(timeout=5.0)
                if stop_requested():  # it died of the signal the run received: an interruption
                    self.stop()
                    raise Interrupted from None
                raise self._fail(exit_description(self.stop())) from None
            if stop_requested():  # the run is being interrupted: drop the call in flight
                self.stop()
                raise Interrupted
            if not self.process.is_alive() and not self.conn.poll(0):
                raise self._fail(exit_description(self.stop()))
            if limit and time.monotonic() >= deadline:
                self.stop()
                raise self._fail(f"{hang} after {limit:g} s")

    def run(self, impl: Any, call: BlockCall) -> Outcome:
        if self.process is None or not self.process.is_alive():
            self.stop()
            self._start()
        pickled = None if self.method == "fork" else self._pickled(impl)
        fields = {name: getattr(call, name) for name in call.__dataclass_fields__}
        fields["fmt"] = call.fmt.name
        self.calls += 1
        try:
            self.conn.send((self.calls, impl.name, pickled, fields))
        except (BrokenPipeError, OSError):
            raise self._fail(exit_description(self.stop())) from None
        try:
            kind, value, changed = self._receive(self.calls, self.timeout, "timed out")
        except CallFailed as failed:
            if self.value is None or not failed.reason.startswith("timed out"):
                raise
            return replace(self.value, grad_error=f"the gradient {failed.reason}")  # the loss is kept
        if changed:  # state that cannot be put back: the next call gets a fresh worker
            self.stop()
        if kind == "ok":
            return value
        if out_of_memory(value) and self.memory_limit:
            from ce_audit.run.memory_limit import format_size

            raise CallFailed(f"out of memory under --max-memory {format_size(self.memory_limit)}: {value}")
        raise CallFailed(value)

    def reaches(self, impl: Any) -> bool:
        """Whether the worker can call ``impl``: a forked one has every entry; a spawned one rebuilds
        those of the run's specs (``module:attr``, plugin files) and those pickled by reference."""
        method = self.method if self.process is not None and self.process.is_alive() else start_method()
        spec = impl.extra.get("spec", "")  # the --impl spec it was registered from, if any
        from_specs = ":" in spec and spec in self.spec.impls
        return method == "fork" or from_specs or self._pickled(impl) is not None

    def _pickled(self, impl: Any) -> bytes | None:
        """The implementation pickled (its function by reference), for a spawned worker that has no entry
        of that name; None where it cannot be."""
        if impl.name not in self.pickles:
            try:
                self.pickles[impl.name] = pickle.dumps(impl)
            except Exception:  # noqa: BLE001 - a local function, a lambda: the worker says so per cell
                self.pickles[impl.name] = None
        return self.pickles[impl.name]

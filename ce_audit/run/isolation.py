"""Implementations that are not built in run isolated: in a worker process, under a time limit per call.

A plugin may call ``sys.exit`` or ``os._exit``, abort, segfault, hang, raise a ``BaseException``, leak
memory, leave a thread or a detached process behind, or change process-wide state (NumPy's error mode,
flush-denormal, the working directory, torch's default dtype or device, the RNG states, the environment,
a monkeypatched torch function). Run in a worker, any of these costs only the cell it happened in: the
cell is ``error`` with the reason ("killed by SIGSEGV", "exited with code 3", "timed out after 10 s",
"out of memory under --max-memory 8 GiB: …") and the last lines the worker printed, the worker is
started again on the next call, and the run goes on. Built-ins run in-process.

Each implementation has its own worker (``Session``: one per implementation, started on its first
call), so nothing one plugin leaves in its process reaches another; a run without plugins starts none.
After every call ``ProcessState`` is put back; a call that changed what cannot be (``GlobalState``:
environment, torch/NumPy attributes, default device, a thread left running) or ran out of memory
retires its worker, and the next call gets a fresh one. How the worker gets the implementations:

- ``fork`` (Linux, while CUDA is not initialised in the run's process): the worker is a copy of this
  process, registry included, so implementations registered from live objects (``ce_audit.check(fn)``,
  tests) work unchanged. Torch's OpenMP pool cannot be restarted in a forked child, so the worker runs
  torch single-threaded.
- ``spawn`` (a worker (re)started after CUDA was initialised here, or not Linux): a fresh interpreter
  that runs ``plugins.prepare(impls, plugins)`` with the run's own specs; an implementation registered from
  a live object is sent pickled by reference where it can be, else it runs in-process.

The worker process's own side is ``ce_audit.run.worker_process``, the run's side of it
``ce_audit.run.worker``, the state ``ce_audit.run.process_state``. ``isolation = "none"``
(``--isolation none``) runs plugins in-process, for debugging under a debugger: the state is put back
after each call and a change that only a fresh process could undo is reported on stderr.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.util
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ce_audit.backends import BlockCall, Outcome, backend_class, run_call
from ce_audit.run.memory_limit import DEFAULT_MAX_MEMORY, parse_memory
from ce_audit.run.process_state import preserved_state
from ce_audit.run.worker import Worker, start_method
from ce_audit.run.worker_process import CallFailed, WorkerSpec, failure_reason

__all__ = ["CallFailed", "failure_reason", "run_implementation", "session", "start_method"]

ISOLATION_MODES = ("process", "none")  # process: non-built-ins in a worker; none: everything in-process
DEFAULT_TIMEOUT_S = 120.0  # per call of an isolated implementation; 0 means no limit
_REPORTED: set[tuple[str, str]] = set()  # (implementation, change) already reported in this run


def call_timeout(backend: str, timeout: float) -> float:
    """The time limit of one call: the run's, or the backend's own where the run keeps the default (the
    Triton interpreter is slow)."""
    if timeout != DEFAULT_TIMEOUT_S:
        return timeout
    return backend_class(backend).default_timeout() or timeout


def run_in_process(impl: Any, call: BlockCall) -> Outcome:
    """One call here; a non-built-in's changes to process-wide state are undone afterwards, and one
    that only a fresh process could undo (a thread left running) is reported once on stderr."""
    if impl.builtin:
        return run_call(impl, call)
    with preserved_state() as changed:
        outcome = run_call(impl, call)
    for change in changed:
        if (impl.name, change) not in _REPORTED:
            _REPORTED.add((impl.name, change))
            print(
                f"ce-audit: warning: {impl.name} changed {change} in this process; put back after its call "
                "where possible (--isolation process runs it apart)",
                file=sys.stderr,
            )
    return outcome


@dataclass
class Session:
    """The isolation of one run: the mode, and one worker per implementation once it is called."""

    mode: str
    timeout: float
    spec: WorkerSpec
    memory_limit: int = 0
    workers: dict[str, Worker] = field(default_factory=dict)
    directory: str | None = None

    def worker_for(self, impl: Any) -> Worker:
        """The worker of ``impl`` (created, not started, on first use)."""
        if impl.name not in self.workers:
            if self.directory is None:
                self.directory = tempfile.mkdtemp(prefix="ce-audit-workers-")
            place = tempfile.mkdtemp(prefix="worker-", dir=self.directory)
            timeout = call_timeout(impl.backend, self.timeout)
            self.workers[impl.name] = Worker(self.spec, timeout, self.memory_limit, place)
        return self.workers[impl.name]

    def run(self, impl: Any, call: BlockCall) -> Outcome:
        if impl.builtin or self.mode == "none" or multiprocessing.current_process().daemon:
            return run_in_process(impl, call)  # a daemonic process (a Pool's) may not start a worker
        worker = self.worker_for(impl)
        if not worker.reaches(impl):  # a closure or lambda a spawned worker cannot rebuild
            return run_in_process(impl, call)
        return worker.run(impl, call)

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


_SESSION: ContextVar[Session | None] = ContextVar("ce_audit_isolation", default=None)
_OPEN: list[Session] = []  # the sessions open in this process, for end_all_workers


def end_all_workers() -> None:
    """Stop every worker of every open session in this process (a unit's process being stopped)."""
    for current in list(_OPEN):
        with contextlib.suppress(Exception):
            current.close()


def _new_session(
    mode: str, timeout: float, impls: Sequence[str], plugins: Sequence[str], max_memory: str | int
) -> Session:
    """A session for the run's specs (each once), its workers capped at ``max_memory``."""
    specs = WorkerSpec(tuple(dict.fromkeys(impls)), tuple(dict.fromkeys(plugins)))
    return Session(mode, timeout, specs, parse_memory(max_memory))


@contextlib.contextmanager
def session(
    mode: str,
    timeout: float,
    *,
    impls: tuple[str, ...] | list[str] = (),
    plugins: tuple[str, ...] | list[str] = (),
    max_memory: str | int = DEFAULT_MAX_MEMORY,
) -> Iterator[Session]:
    """The isolation of one run: calls made inside go through ``run_implementation`` to their workers;
    ``impls`` and ``plugins`` are the run's specs, for a spawned worker to load them again;
    ``max_memory`` caps each worker's memory (ce_audit.run.memory_limit)."""
    current = _new_session(mode, timeout, impls, plugins, max_memory)
    _REPORTED.clear()
    token = _SESSION.set(current)
    _OPEN.append(current)
    try:
        yield current
    finally:
        _SESSION.reset(token)
        _OPEN.remove(current)
        current.close()


_LASTING: dict[tuple[Any, ...], Session] = {}  # this process's lasting sessions, by their settings


@contextlib.contextmanager
def lasting_session(
    mode: str,
    timeout: float,
    *,
    impls: tuple[str, ...] | list[str] = (),
    plugins: tuple[str, ...] | list[str] = (),
    max_memory: str | int = DEFAULT_MAX_MEMORY,
) -> Iterator[Session]:
    """As ``session``, but the session and its workers last until this process exits (or is stopped):
    a ``--jobs`` worker process runs many units, and starts each implementation's worker once."""
    key = (mode, timeout, tuple(impls), tuple(plugins), str(max_memory))
    current = _LASTING.get(key)
    if current is None:
        current = _LASTING[key] = _new_session(mode, timeout, impls, plugins, max_memory)
        _OPEN.append(current)
        multiprocessing.util.Finalize(None, current.close, exitpriority=10)
    token = _SESSION.set(current)
    try:
        yield current
    finally:
        _SESSION.reset(token)


def forget_sessions() -> None:
    """In a process forked from the run: the run's sessions and their workers are the run's, not this
    process's (it neither calls them nor stops them); it opens its own."""
    _SESSION.set(None)
    _OPEN.clear()
    _LASTING.clear()


def in_session() -> bool:
    """Whether calls made here go through a run's isolation session."""
    return _SESSION.get() is not None


def run_implementation(impl: Any, call: BlockCall) -> Outcome:
    """Call ``impl`` on one block: a built-in here, any other in its worker in the session (in-process
    with the state restored when there is no session or the isolation is ``none``)."""
    current = _SESSION.get()
    if current is None:
        return run_in_process(impl, call)
    return current.run(impl, call)

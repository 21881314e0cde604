"""Implementations that are not built in run isolated: in a worker process, under a time limit per call.

A plugin may call ``sys.exit`` or ``os._exit``, abort, segfault, hang, raise a ``BaseException`` or change
process-wide state (NumPy's error mode, flush-denormal, the working directory, torch's default dtype, the
RNG states). Run in a worker, any of these costs only the cell it happened in: the cell is ``error`` with
the reason ("killed by SIGSEGV", "exited with code 3", "timed out after 10 s") and the last lines the worker
printed, the worker is started again on the next call, and the run goes on. Built-ins run in-process.

One worker serves the whole run (``session``), started on the first call of a non-built-in, so a run
without plugins pays nothing and one with plugins pays the start once. How the worker gets the
implementations:

- ``fork`` (Linux, while CUDA is not initialised in the run's process): the worker is a copy of this
  process, registry included, so implementations registered from live objects (``ce_audit.check(fn)``,
  tests) work unchanged. Torch's OpenMP pool cannot be restarted in a forked child, so the worker runs
  torch single-threaded.
- ``spawn`` (a worker (re)started after CUDA was initialised here, or not Linux): a fresh interpreter
  that runs ``plugins.prepare(impls, plugins)`` with the run's own specs; an implementation registered from
  a live object is sent pickled by reference where it can be, else its cells are ``error`` with the reason.

The process-wide state (``ProcessState``) is captured before and restored after every call of a
non-built-in, in the worker and in-process (``isolation = "none"``, or outside a session), so a plugin's
settings never reach another cell. ``isolation = "none"`` (``--isolation none``) runs plugins in-process,
for debugging under a debugger.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ce_audit.backends import BlockCall, Outcome, get_backend
from ce_audit.printable import printable
from ce_audit.statuses import first_line

ISOLATION_MODES = ("process", "none")  # process: non-built-ins in a worker; none: everything in-process
DEFAULT_TIMEOUT_S = 120.0  # per call of an isolated implementation; 0 means no limit
STARTUP_LIMIT_S = 120.0  # a spawned worker imports the frameworks and the plugins first
TAIL_LINES = 3  # lines of the worker's output quoted in a failed cell's reason
_POLL_S = 0.1  # the wait for a worker's answer is sliced, so an interruption is seen in time


class CallFailed(Exception):
    """An isolated call failed; ``reason`` is the cell's error text as it should read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_reason(error: Exception) -> str:
    """The text a failed call leaves in its cell's ``error`` column."""
    return error.reason if isinstance(error, CallFailed) else first_line(error)


# --- process-wide state --------------------------------------------------------------------------------


def _flushes_denormals(torch: Any) -> bool:
    """Whether this thread flushes subnormals to zero (torch.set_flush_denormal has no getter)."""
    return bool(torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0)


@dataclass
class ProcessState:
    """What a call of an implementation could change for every later call: captured, then restored."""

    cwd: str
    numpy_errors: Any  # numpy's error-mode dict
    numpy_random: Any
    python_random: Any
    warning_filters: list[Any]
    streams: tuple[Any, Any]
    torch: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls) -> ProcessState:
        state = cls(
            cwd=os.getcwd(),
            numpy_errors=np.geterr(),
            numpy_random=np.random.get_state(),
            python_random=random.getstate(),
            warning_filters=list(warnings.filters),
            streams=(sys.stdout, sys.stderr),
        )
        torch = sys.modules.get("torch")  # never imported here: only restored where a call could use it
        if torch is not None and hasattr(torch, "get_default_dtype"):
            state.torch = {
                "default_dtype": torch.get_default_dtype(),
                "flush_denormal": _flushes_denormals(torch),
                "num_threads": torch.get_num_threads(),
                "rng": torch.get_rng_state(),
                "matmul_precision": torch.get_float32_matmul_precision(),
            }
        return state

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        np.seterr(**self.numpy_errors)
        np.random.set_state(self.numpy_random)
        random.setstate(self.python_random)
        warnings.filters[:] = self.warning_filters  # type: ignore[index]
        sys.stdout, sys.stderr = self.streams
        saved = self.torch
        torch = sys.modules.get("torch")
        if saved and torch is not None:
            torch.set_default_dtype(saved["default_dtype"])
            torch.set_flush_denormal(saved["flush_denormal"])
            if torch.get_num_threads() != saved["num_threads"]:
                torch.set_num_threads(saved["num_threads"])
            torch.set_rng_state(saved["rng"])
            torch.set_float32_matmul_precision(saved["matmul_precision"])
        elif torch is not None and hasattr(torch, "set_flush_denormal"):
            torch.set_flush_denormal(False)  # the call imported torch: back to torch's defaults
            torch.set_default_dtype(torch.float32)


@contextlib.contextmanager
def preserved_state() -> Iterator[None]:
    """Run the body, then put back every piece of process-wide state it may have changed."""
    state = ProcessState.capture()
    try:
        yield
    finally:
        state.restore()


def run_in_process(impl: Any, call: BlockCall) -> Outcome:
    """One call here; a non-built-in's changes to process-wide state are undone afterwards."""
    backend = get_backend(impl.backend)
    if impl.builtin:
        return backend.run(impl, call)
    with preserved_state():
        return backend.run(impl, call)


# --- the worker ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a spawned worker needs to rebuild the run's implementations (None for a forked one)."""

    impls: tuple[str, ...]
    plugins: tuple[str, ...]


def _die_with_parent() -> None:
    """Linux: the kernel kills the worker when the run's process dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _capture_output(log_path: str) -> None:
    """File descriptors 1 and 2 (Python's prints and C's alike) go to the log the parent reads back."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # fresh stream objects: a lock held by another thread of the parent at fork time stays behind
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115


def _exit_code(code: Any) -> int:
    """The process exit status ``sys.exit(code)`` stands for."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _lookup(name: str, pickled: bytes | None) -> Any:
    from ce_audit.implementations import REGISTRY

    impl = REGISTRY.get(name)
    if impl is None and pickled is not None:
        impl = pickle.loads(pickled)
    if impl is None:
        raise CallFailed(
            f"{name} cannot be rebuilt in a worker process (registered from a live object); "
            "register it in a plugin file, or use --isolation none"
        )
    return impl


def _worker_main(conn: Any, parent_end: Any, log_path: str, spec: WorkerSpec | None) -> None:
    """The worker's loop: receive (name, call), run it with the state restored after it, send the outcome."""
    parent_end.close()  # inherited: held open here, the run's end would never see this end close
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the run decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    _capture_output(log_path)
    faulthandler.disable()  # the cell's reason quotes the plugin's own last lines, not a stack dump
    setup_error = None
    try:
        if spec is None:
            torch = sys.modules.get("torch")
            if torch is not None:
                torch.set_num_threads(1)  # OpenMP cannot start a new pool in a forked child
        else:
            from ce_audit.plugins import prepare

            # module:function specs register themselves; other names may be live objects of the run's
            prepare(tuple(name for name in spec.impls if ":" in name), spec.plugins)
    except Exception as error:  # noqa: BLE001 - reported with every call instead
        setup_error = f"the worker could not load the implementations: {first_line(error)}"
    conn.send((0, "ready", setup_error))
    while True:
        try:
            number, name, pickled, fields = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the run is over
        with contextlib.suppress(OSError):
            os.ftruncate(1, 0)  # the tail quoted on failure is this call's output
        state = ProcessState.capture()
        reply: tuple[str, Any]
        try:
            if setup_error:
                raise CallFailed(setup_error)
            from ce_audit.dtypes import float_format

            call = BlockCall(**{**fields, "fmt": float_format(fields["fmt"])})
            impl = _lookup(name, pickled)
            reply = ("ok", get_backend(impl.backend).run(impl, call))
        except SystemExit as done:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(_exit_code(done.code))
        except BaseException as error:  # noqa: BLE001 - any failure is this call's, reported as its cell's
            reply = ("error", failure_reason(error) if isinstance(error, Exception) else first_line(error))
        finally:
            state.restore()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.send((number, *reply))
        except Exception as error:  # noqa: BLE001 - e.g. a result that cannot be pickled
            conn.send((number, "error", f"its result could not be sent back: {first_line(error)}"))


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


class Worker:
    """The run's worker process: started on first use and again after it dies or is killed."""

    def __init__(self, spec: WorkerSpec, timeout: float) -> None:
        self.spec = spec
        self.timeout = timeout
        self.method = "fork"
        self.directory = tempfile.mkdtemp(prefix="ce-audit-worker-")
        self.log_path = str(Path(self.directory) / "output.log")
        self.process: Any = None
        self.conn: Any = None
        self.pickles: dict[str, bytes | None] = {}
        self.calls = 0  # calls sent; each answer carries its call's number

    def _start(self) -> None:
        self.method = start_method()
        context: Any = multiprocessing.get_context(self.method)
        parent_end, child_end = context.Pipe()
        spec = None if self.method == "fork" else self.spec
        self.process = context.Process(
            target=_worker_main,
            args=(child_end, parent_end, self.log_path, spec),
            daemon=True,
            name="ce-audit-worker",
        )
        self.process.start()
        child_end.close()
        self.conn = parent_end
        self._receive(0, max(STARTUP_LIMIT_S, self.timeout), "did not start")

    def _tail(self) -> str:
        try:
            text = Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        lines = [printable(line.strip()) for line in text.splitlines() if line.strip()][-TAIL_LINES:]
        quoted = " | ".join(lines)
        return quoted if len(quoted) <= 300 else "…" + quoted[-299:]

    def _fail(self, what: str) -> CallFailed:
        tail = self._tail()
        return CallFailed(f"{what} (last output: {tail})" if tail else what)

    def _stop(self) -> int | None:
        """End the worker (killing it if it still runs); its exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        with contextlib.suppress(OSError):
            self.conn.close()
        process.join(timeout=1.0)
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)
        return process.exitcode

    def _receive(self, number: int, limit: float, hang: str) -> tuple[str, Any]:
        """The worker's answer to message ``number``: (kind, value); a CallFailed when the worker died or
        passed ``limit`` seconds (0: none)."""
        from ce_audit.run.interruption import Interrupted, stop_requested

        deadline = time.monotonic() + limit
        while True:
            try:
                if self.conn.poll(_POLL_S):
                    answered, kind, value = self.conn.recv()
                    if answered == number:
                        return kind, value
                    continue  # a stale answer (to a call given up on): not this one's
            except (EOFError, OSError):
                self.process.join(timeout=5.0)
                raise self._fail(exit_description(self._stop())) from None
            if not self.process.is_alive() and not self.conn.poll(0):
                raise self._fail(exit_description(self._stop()))
            if stop_requested():  # the run is being interrupted: drop the call in flight
                self._stop()
                raise Interrupted
            if limit and time.monotonic() >= deadline:
                self._stop()
                raise self._fail(f"{hang} after {limit:g} s")

    def run(self, impl: Any, call: BlockCall) -> Outcome:
        if self.process is None or not self.process.is_alive():
            self._stop()
            self._start()
        pickled = None if self.method == "fork" else self._pickled(impl)
        fields = {name: getattr(call, name) for name in call.__dataclass_fields__}
        fields["fmt"] = call.fmt.name
        self.calls += 1
        try:
            self.conn.send((self.calls, impl.name, pickled, fields))
        except (BrokenPipeError, OSError):
            raise self._fail(exit_description(self._stop())) from None
        kind, value = self._receive(self.calls, self.timeout, "timed out")
        if kind == "ok":
            return value
        raise CallFailed(value)

    def reaches(self, impl: Any) -> bool:
        """Whether the worker can call ``impl``: a forked one has every entry; a spawned one rebuilds
        those of the run's specs (``module:attr``, plugin files) and those pickled by reference."""
        method = self.method if self.process is not None and self.process.is_alive() else start_method()
        from_specs = ":" in impl.name and impl.name in self.spec.impls
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

    def close(self) -> None:
        self._stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Session:
    """The isolation of one run: the mode, and the worker once a non-built-in is called."""

    mode: str
    timeout: float
    spec: WorkerSpec
    worker: Worker | None = None

    def run(self, impl: Any, call: BlockCall) -> Outcome:
        if impl.builtin or self.mode == "none" or multiprocessing.current_process().daemon:
            return run_in_process(impl, call)  # a daemonic process (a Pool's) may not start a worker
        if self.worker is None:
            self.worker = Worker(self.spec, self.timeout)
        if not self.worker.reaches(impl):  # a closure or lambda a spawned worker cannot rebuild
            return run_in_process(impl, call)
        return self.worker.run(impl, call)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


_SESSION: ContextVar[Session | None] = ContextVar("ce_audit_isolation", default=None)


@contextlib.contextmanager
def session(
    mode: str,
    timeout: float,
    *,
    impls: tuple[str, ...] | list[str] = (),
    plugins: tuple[str, ...] | list[str] = (),
) -> Iterator[Session]:
    """The isolation of one run: calls made inside go through ``run_implementation`` to its worker;
    ``impls`` and ``plugins`` are the run's specs, for a spawned worker to load them again."""
    specs = WorkerSpec(tuple(dict.fromkeys(impls)), tuple(dict.fromkeys(plugins)))
    current = Session(mode, timeout, specs)
    token = _SESSION.set(current)
    try:
        yield current
    finally:
        _SESSION.reset(token)
        current.close()


def in_session() -> bool:
    """Whether calls made here go through a run's isolation session."""
    return _SESSION.get() is not None


def run_implementation(impl: Any, call: BlockCall) -> Outcome:
    """Call ``impl`` on one block: a built-in here, any other in the session's worker (in-process with
    the state restored when there is no session or the isolation is ``none``)."""
    current = _SESSION.get()
    if current is None:
        return run_in_process(impl, call)
    return current.run(impl, call)

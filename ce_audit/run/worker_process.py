"""The worker process's side of isolation: set itself apart, then answer calls until the pipe closes.

At its start the worker leaves the run's process group (a signal to the group is the run's to handle),
becomes the reaper of its orphaned descendants (so that ``Worker.stop`` finds and ends them), closes the
locks it inherited (a descendant must never hold the run's ``--out`` lock), dies with the run
(``PR_SET_PDEATHSIG``), caps its memory (``RLIMIT_DATA``) and sends its output to a log file. Then, for
each call: run it, put ``ProcessState`` back, and answer ``(number, kind, value, changed)`` where
``changed`` lists what the call left that ``GlobalState`` saw (the run then retires this worker).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import resource
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ce_audit.backends import BlockCall, run_call
from ce_audit.run.process_state import GlobalState, ProcessState
from ce_audit.statuses import first_line

RUN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # a terminal's or a CI runner's stop
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_OUT_OF_MEMORY = ("MemoryError", "can't allocate memory", "Cannot allocate memory")


class CallFailed(Exception):
    """An isolated call failed; ``reason`` is the cell's error text as it should read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failure_reason(error: Exception) -> str:
    """The text a failed call leaves in its cell's ``error`` column."""
    return error.reason if isinstance(error, CallFailed) else first_line(error)


@dataclass(frozen=True)
class WorkerSpec:
    """What a spawned worker needs to rebuild the run's implementations (None for a forked one)."""

    impls: tuple[str, ...]
    plugins: tuple[str, ...]


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(option, value)


def _close_inherited_locks() -> None:
    """Close every descriptor that carries a file lock (Linux lists them in /proc/self/fdinfo): the run's
    ``--out`` lock, inherited through fork, must not outlive the run in a worker or its descendants."""
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fdinfo"):
            fd = int(name)
            if fd <= 2:
                continue
            with contextlib.suppress(OSError, ValueError):
                info = Path(f"/proc/self/fdinfo/{fd}").read_text()
                if "\nlock:" in info:
                    os.close(fd)


def _data_size() -> int:
    """This process's data segment in bytes (what RLIMIT_DATA counts; Linux), else 0."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def set_apart(memory_limit: int) -> None:
    """The worker's first steps, before any signal is let through (the run holds them while it starts
    the worker): its own process group, no reaction to the run's signals, death with the run, the
    reaper of its orphans, no inherited lock, and at most ``memory_limit`` bytes of data (0: no cap)
    beyond what it starts with (a forked worker shares the run's, whatever their size)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for signum in RUN_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # also drops one that arrived while held
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the run's own way to stop a worker (besides SIGKILL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RUN_SIGNALS)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _close_inherited_locks()
    if memory_limit:
        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = memory_limit + _data_size()
        cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))


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


def out_of_memory(reason: str) -> bool:
    """Whether a call's error is an allocation refused (by the worker's memory cap, or the machine)."""
    return any(mark in reason for mark in _OUT_OF_MEMORY)


def _prepare(spec: WorkerSpec | None) -> str | None:
    """Load what the calls need; the reason every call fails with, if that failed."""
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
        return f"the worker could not load the implementations: {first_line(error)}"
    return None


def worker_main(
    conn: Any, parent_end: Any, log_path: str, spec: WorkerSpec | None, memory_limit: int
) -> None:
    """The worker's loop: receive (number, name, pickled, fields), run it with the state restored after
    it, send (number, kind, value, changed)."""
    parent_end.close()  # inherited: held open here, the run's end would never see this end close
    set_apart(memory_limit)
    _capture_output(log_path)
    faulthandler.disable()  # the cell's reason quotes the plugin's own last lines, not a stack dump
    setup_error = _prepare(spec)
    conn.send((0, "ready", setup_error, []))
    while True:
        try:
            number, name, pickled, fields = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the run is over
        with contextlib.suppress(OSError):
            os.ftruncate(1, 0)  # the tail quoted on failure is this call's output
        state, watched = ProcessState.capture(), GlobalState.capture()
        reply: tuple[str, Any]
        try:
            if setup_error:
                raise CallFailed(setup_error)
            from ce_audit.dtypes import float_format

            call = BlockCall(**{**fields, "fmt": float_format(fields["fmt"])})
            impl = _lookup(name, pickled)

            def send_value(outcome: Any, number: int = number) -> None:  # kept if the gradient times out
                conn.send((number, "value", outcome, []))

            reply = ("ok", run_call(impl, call, on_value=send_value))
        except SystemExit as done:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(_exit_code(done.code))
        except BaseException as error:  # noqa: BLE001 - any failure is this call's, reported as its cell's
            reply = ("error", failure_reason(error) if isinstance(error, Exception) else first_line(error))
        finally:
            state.restore()
        changed = watched.changes()
        if reply[0] == "error" and out_of_memory(str(reply[1])):
            changed.append("memory (an allocation was refused)")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.send((number, *reply, changed))
        except Exception as error:  # noqa: BLE001 - e.g. a result that cannot be pickled
            conn.send((number, "error", f"its result could not be sent back: {first_line(error)}", changed))

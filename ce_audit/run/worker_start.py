"""How a sweep's worker processes start (``processes`` executor): forked from the run, or from a forkserver.

- **Forked from the run** (``workers_forked_ahead``): where the units run on the CPU alone, in one-thread
  workers, on Linux (neither CUDA nor JAX's runtime started: ``can_fork_workers``), the run forks them
  once torch is imported and before it starts threads of its own (progress). A worker then costs a fork,
  not an interpreter and torch's import (about 1.2 s of CPU each). Torch's thread pool has not started in
  the run and a worker stays on one thread, so nothing of it is lost in the copy.
- **From a forkserver** (``start_workers_ahead``): elsewhere, a forkserver started before torch's import
  imports WORKER_MODULES while the run plans, and every worker forks from it ready; spawn where a server
  started with another thread count is there (``start_method``).

Every worker (``_init_worker``) leaves the run's process group (the run's signals are the run's), is
stopped by STOP_SIGNAL (also when the run dies), sets its threads, and forgets the run's isolation
sessions (a forked one has them in its copy).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from ce_audit.run.interruption import HANDLED, held_signals

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STOP_SIGNAL = signal.SIGUSR1  # the run's request to a unit's worker process: end your workers and exit


def _stop_unit_process(signum: int, frame: Any) -> None:
    """``STOP_SIGNAL`` in a unit's worker process: end the isolated workers it started, and exit. The
    signal may come while the process is still importing the package: no import here (a module half
    imported cannot be imported again), and no workers to end unless isolation is loaded whole."""
    isolation = sys.modules.get("ce_audit.run.isolation")
    end_all_workers = getattr(isolation, "end_all_workers", None)
    if end_all_workers is not None:
        with contextlib.suppress(Exception):
            end_all_workers()
    os._exit(128 + signum)


def _init_worker(threads: int) -> None:
    """A worker's start: out of the run's process group (the run's signals are the run's to handle; they
    were held from it until now, and one that arrived meanwhile is dropped), stopped by ``STOP_SIGNAL``
    (also when its parent dies), ``threads`` threads for torch and BLAS (set before either is imported)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, _stop_unit_process)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, STOP_SIGNAL)  # PR_SET_PDEATHSIG
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    if "torch" in sys.modules:  # a forked worker: the run's modules, torch among them
        sys.modules["torch"].set_num_threads(threads)
    isolation = sys.modules.get("ce_audit.run.isolation")
    if isolation is not None:  # a forked worker starts its own isolated workers, never the run's
        isolation.forget_sessions()


def start_pool(context: Any, workers: int, threads: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes started by ``context`` with ``threads`` threads each; with the run's
    signals held, which the forkserver keeps held and each worker lets through once it has left the run's
    process group."""
    _start_resource_tracker()
    with held_signals():
        return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))


_FORKED: dict[int, ProcessPoolExecutor] = {}  # the pool forked ahead, by its number of workers


def forked_ahead() -> bool:
    """Whether a pool forked ahead waits for its units."""
    return bool(_FORKED)


def forked_pool(workers: int) -> ProcessPoolExecutor | None:
    """The pool of ``workers`` forked ahead, taken (the taker shuts it down), else None."""
    return _FORKED.pop(workers, None)


def can_fork_workers() -> bool:
    """Whether this process may fork its workers: Linux, neither CUDA nor JAX's runtime started here
    (ce_audit.run.worker.start_method)."""
    from ce_audit.run.worker import start_method as isolated_worker_start

    return isolated_worker_start() == "fork"


@contextlib.contextmanager
def workers_forked_ahead(workers: int) -> Iterator[None]:
    """Fork ``workers`` one-thread worker processes from this process now (torch, if imported, comes with
    them, and its thread pool has not started), for the next ``ProcessExecutor`` of that many workers in
    the block; a pool the block did not use is shut down after it. They are forked now, not when the units
    are submitted, so that no thread of the run's (progress, NumPy's pool) is alive at the fork; Python
    3.12+'s warning about a fork in a threaded process (libraries' own native threads) is silenced here."""
    if workers in _FORKED or not can_fork_workers():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
        pool = start_pool(multiprocessing.get_context("fork"), workers, 1)
        with held_signals():
            pool.submit(os.getpid)  # a fork context starts every worker at the first submit, in this thread
    _FORKED[workers] = pool
    try:
        yield
    finally:
        if _FORKED.get(workers) is pool:
            del _FORKED[workers]
            pool.shutdown(wait=True, cancel_futures=True)


# What a worker imports before it can run a unit: a forkserver started ahead of the pool
# (``start_workers_ahead``) imports them once, while this process plans, and every worker forks with them.
WORKER_MODULES = ("__main__", "numpy", "torch", "ce_audit.run.sweep")
_forkserver: dict[str, int] = {}  # "threads": the thread count it was started with, once started


def start_method(threads: int) -> str:
    """forkserver (the server started ahead of the pool, its modules imported with ``threads`` threads, or
    started now), else spawn: a server whose libraries chose another thread count is not used."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return "forkserver" if _forkserver.setdefault("threads", threads) == threads else "spawn"


def start_workers_ahead(threads: int) -> None:
    """Start the forkserver now, with the run's signals held and ``THREAD_VARIABLES`` set to ``threads``
    for its imports of ``WORKER_MODULES`` (as each worker sets them before its own imports), so that it
    imports torch while this process plans; the pool's workers then fork from it ready. Once a process."""
    if _forkserver or "forkserver" not in multiprocessing.get_all_start_methods():
        return
    from multiprocessing import forkserver

    _forkserver["threads"] = threads
    _start_resource_tracker()
    saved = {variable: os.environ.get(variable) for variable in THREAD_VARIABLES}
    try:
        os.environ.update({variable: str(threads) for variable in THREAD_VARIABLES})
        with held_signals():
            forkserver.set_forkserver_preload(list(WORKER_MODULES))
            forkserver.ensure_running()
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


def _start_resource_tracker() -> None:
    """multiprocessing's resource tracker, started with SIGHUP held (it ignores SIGINT and SIGTERM but
    not SIGHUP); started here, since starting it unblocks SIGINT and SIGTERM in the starting thread."""
    from multiprocessing import resource_tracker

    with held_signals():
        resource_tracker.ensure_running()

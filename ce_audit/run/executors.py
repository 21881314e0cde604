"""Executors: what runs a sweep's units — in this process, in worker processes, or as Ray tasks.

Every executor takes the units in report order and yields each unit's cells **in that order**, whatever
order they finish in, so a sweep's cells (and summary.csv, row for row) are the same as in one process.
A unit's numbers do not depend on where it runs: its inputs are drawn from generators seeded by the case
and the row, and the reference is computed from those inputs alone.

| name        | runs each unit                                                                         |
|-------------|----------------------------------------------------------------------------------------|
| `local`     | in this process, one after the other (progress advances inside a unit)                |
| `processes` | in one of ``jobs`` worker processes (forked, else forkserver, else spawn); plugins are |
|             | loaded again in each worker from the config's specs; torch and BLAS get cores // jobs  |
|             | threads each                                                                           |
| `ray`       | as a Ray task (``num_cpus=1``; ``num_gpus`` = the unit's CUDA devices, and the          |
|             | ``accelerator_type`` asked for); a local Ray is started for the run without an address |

How ``processes`` starts its workers is ce_audit.run.worker_start's: where the units run on the CPU alone in
one-thread workers on Linux, forked from the run once torch is imported, and a sweep whose --jobs was not
given runs in workers from FORKED_SMALL_SWEEP_COST on (a worker costs a fork, not an interpreter and
torch's import); else from a forkserver that imported torch while the run planned.

Every executor stops starting units once the run is asked to stop (ce_audit.run.interruption) and yields
the units completed in order before it. ``processes`` starts its workers with the run's signals held;
each leaves the run's process group as it starts, so SIGINT, SIGTERM or SIGHUP sent to the group reach
the run alone, which stops them (``STOP_SIGNAL``: each ends its isolated workers and exits).

Adding one: a class with ``name`` and ``map(function, units, progress)`` in ``EXECUTORS``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ce_audit.errors import AuditError
from ce_audit.run.interruption import held_signals, stop_requested
from ce_audit.run.worker_start import (
    STOP_SIGNAL,
    forked_ahead,
    forked_pool,
    start_method,
    start_pool,
)

if TYPE_CHECKING:
    from ce_audit.plan.units import Unit
    from ce_audit.results import Cell

Progress = Callable[[float], None]  # advance(cells): the cells done since the last call (Unit.cells)
UnitFunction = Callable[..., "list[Cell]"]  # function(unit, progress=None) -> the unit's cells

# Below this estimated cost (rows × vocabulary × implementations × devices, summed over units, plus
# CELL_COST per cell) a sweep whose --jobs was not given runs in this process: starting workers (a Python
# and a torch import each, about a second) would cost more than it saves. The float16 default sweep
# (6.6·10⁷) audits in about 2 s of CPU on one thread; configs/variants.toml's 31456 tiny cells (6.8·10⁸)
# in about 25 s, about 0.8 ms each whatever their size.
SMALL_SWEEP_COST = 100_000_000
CELL_COST = 20_000
# The same threshold where the workers are forked from this process once torch is imported (a fork and
# the cells sent back: about 0.05 s for two workers). The float16 default sweep is 6.6·10⁷.
FORKED_SMALL_SWEEP_COST = 20_000_000
_POLL_S = 0.1  # the wait for units is sliced, so that an interruption is seen in time
_GRACE_S = 5.0  # how long stopped worker processes get before they are killed


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    counter = getattr(os, "process_cpu_count", None)  # Python ≥ 3.13
    if counter is not None:
        return max(1, counter() or 1)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Executor(Protocol):
    name: ClassVar[str]

    def map(
        self, function: UnitFunction, units: Sequence[Unit], progress: Progress | None
    ) -> Iterator[list[Cell]]:
        """``function(unit)`` for every unit; the results in the order of ``units``."""


class LocalExecutor:
    """Each unit in this process, in order."""

    name = "local"

    def map(
        self, function: UnitFunction, units: Sequence[Unit], progress: Progress | None
    ) -> Iterator[list[Cell]]:
        for unit in units:
            if stop_requested():
                return
            yield function(unit, progress)


@dataclass
class ProcessExecutor:
    """Units in ``jobs`` worker processes; each worker gets cores // jobs threads (at least one)."""

    jobs: int
    name: ClassVar[str] = "processes"

    def map(
        self, function: UnitFunction, units: Sequence[Unit], progress: Progress | None
    ) -> Iterator[list[Cell]]:
        if not units:
            return
        workers = max(1, min(self.jobs, len(units)))
        threads = max(1, available_cores() // workers)
        pool = forked_pool(workers)  # forked ahead (worker_start.workers_forked_ahead), else started now
        if pool is None:
            pool = start_pool(multiprocessing.get_context(start_method(threads)), workers, threads)
        with held_signals():  # the workers let them through once they have left the run's process group
            futures = [pool.submit(function, unit) for unit in units]
        try:
            yield from _in_order(futures, progress, [cells_of(unit) for unit in units])
        except BrokenProcessPool as error:
            if not _interrupted_soon():  # a worker stopped by the signal the run received is not a failure
                raise AuditError(f"a worker process died ({error}); run with --jobs 1 to see why") from None
        finally:
            if stop_requested():
                _stop_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)


def _interrupted_soon(grace: float = 1.0) -> bool:
    """Whether the run is asked to stop within ``grace`` seconds (the signal that ended a worker may
    reach the run a moment later)."""
    deadline = time.monotonic() + grace
    while not stop_requested() and time.monotonic() < deadline:
        time.sleep(0.02)
    return stop_requested()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's worker processes now: ``STOP_SIGNAL`` to each, then SIGKILL after ``_GRACE_S``."""
    processes = list(getattr(pool, "_processes", {}).values())
    for process in processes:
        with contextlib.suppress(OSError):
            os.kill(process.pid, STOP_SIGNAL)
    deadline = time.monotonic() + _GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def cells_of(unit: Any) -> int:
    """What a finished unit advances progress by: its cells (Unit.cells); one for any other work item."""
    return int(getattr(unit, "cells", 1))


def _in_order(
    futures: list[Future[list[Cell]]], progress: Progress | None, cells: Sequence[int]
) -> Iterator[list[Cell]]:
    """Each future's result in list order, advancing ``progress`` by its unit's ``cells`` as each
    finishes; once the run is asked to stop, only those already completed in order."""
    counts = dict(zip(futures, cells, strict=True))
    pending = set(futures)
    position = 0
    while position < len(futures):
        stopping = stop_requested()
        if pending and not stopping:
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            if progress and done:
                progress(float(sum(counts[future] for future in done)))
        while position < len(futures) and futures[position].done():
            yield futures[position].result()  # a worker's AuditError is raised here, as it was there
            position += 1
        if stopping:
            return


@dataclass
class RayExecutor:
    """Units as Ray tasks on the cluster at ``address`` (None: a local Ray, started for the run and shut
    down after); a unit with CUDA devices asks for that many GPUs and, if given, ``accelerator_type``."""

    address: str | None = None
    accelerator_type: str | None = None
    name: ClassVar[str] = "ray"

    def resources(self, unit: Unit) -> dict[str, Any]:
        """The Ray resources a unit's task asks for."""
        gpus = len({device for device in unit.devices if device.startswith("cuda")})
        wanted: dict[str, Any] = {"num_cpus": 1, "num_gpus": gpus}
        if gpus and self.accelerator_type:
            wanted["accelerator_type"] = self.accelerator_type
        return wanted

    def map(
        self, function: UnitFunction, units: Sequence[Unit], progress: Progress | None
    ) -> Iterator[list[Cell]]:
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as error:
                where = self.address or "a local Ray"
                raise AuditError(
                    f"cannot start or reach {where}: {str(error).strip().splitlines()[0]}"
                ) from None
        try:
            task = ray.remote(function)
            references = [task.options(**self.resources(unit)).remote(unit) for unit in units]
            counts = {reference: cells_of(unit) for reference, unit in zip(references, units, strict=True)}
            pending = list(references)
            finished: set[Any] = set()
            position = 0
            while position < len(references) and not stop_requested():
                if pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    finished.update(done)
                    if progress:
                        progress(float(sum(counts[reference] for reference in done)))
                while position < len(references) and references[position] in finished:
                    yield _ray_result(ray, references[position])
                    position += 1
        finally:
            if started:
                ray.shutdown()


def _ray_result(ray: Any, reference: Any) -> list[Cell]:
    """A task's cells; the AuditError it raised (a plugin that does not load there) raised here."""
    try:
        return list(ray.get(reference))
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, AuditError):
            raise AuditError(str(cause)) from None
        raise


def import_ray() -> Any:
    """Ray, or an AuditError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise AuditError("--executor ray needs Ray: pip install 'ce-audit[ray]'") from None
    return ray


EXECUTORS: dict[str, str] = {
    LocalExecutor.name: "in this process, one unit after the other",
    ProcessExecutor.name: "in --jobs worker processes on this machine",
    RayExecutor.name: "as Ray tasks (--ray-address; default: a local Ray started for the run)",
}


def sweep_cost(units: Sequence[Unit]) -> int:
    """The estimated cost of running ``units``: their rows × vocabulary work, and CELL_COST per cell."""
    return sum(unit.cost + CELL_COST * unit.cells for unit in units if unit.impls)


def small_sweep(units: Sequence[Unit], threshold: int) -> bool:
    """Whether ``units`` are too little work for worker processes: fewer than two that audit anything, or
    their cost (``sweep_cost``) under ``threshold``."""
    busy = [unit for unit in units if unit.impls]
    return len(busy) < 2 or sweep_cost(busy) < threshold


@dataclass(frozen=True)
class Execution:
    """How a sweep runs its units: an executor name (None: `local` for one job, `processes` for more),
    ``jobs`` (None: this machine's cores, but a small sweep stays in this process) and Ray's settings."""

    executor: str | None = None
    jobs: int | None = 1
    ray_address: str | None = None
    ray_accelerator_type: str | None = None

    def __post_init__(self) -> None:
        if self.executor is not None and self.executor not in EXECUTORS:
            raise AuditError(f"unknown executor {self.executor!r}; choose from {', '.join(EXECUTORS)}")
        if self.jobs is not None and self.jobs < 1:
            raise AuditError(f"--jobs must be at least 1, got {self.jobs}")
        if (self.ray_address or self.ray_accelerator_type) and self.executor != RayExecutor.name:
            raise AuditError("--ray-address and --ray-accelerator-type need --executor ray")

    @property
    def devices_here(self) -> bool:
        """Whether the units' devices are this machine's (not so on a Ray cluster)."""
        return self.executor != RayExecutor.name

    def worker_threads(self, units: Sequence[Unit]) -> int | None:
        """Each worker's threads where ``units`` run in worker processes here, else None. A sweep whose
        devices are not yet known may pass its units on the CPU alone: more devices only add cost."""
        executor = self.executor_for(units)
        if not isinstance(executor, ProcessExecutor) or not units:
            return None
        return max(1, available_cores() // max(1, min(executor.jobs, len(units))))

    def forked_workers(self, units: Sequence[Unit]) -> int | None:
        """How many workers to fork ahead for ``units`` (ProcessExecutor, one thread each, on the CPU
        alone), where forking them would make them run there; else None."""
        if self.executor not in (None, ProcessExecutor.name) or self.jobs == 1:
            return None
        if any(device != "cpu" for unit in units for device in unit.devices):
            return None
        if self.jobs is None and small_sweep(units, FORKED_SMALL_SWEEP_COST):
            return None
        workers = min(self.jobs or available_cores(), len(units))
        return workers if workers > 1 and available_cores() // workers == 1 else None

    def executor_for(self, units: Sequence[Unit]) -> LocalExecutor | ProcessExecutor | RayExecutor:
        """The executor that runs these units."""
        if self.executor == RayExecutor.name:
            return RayExecutor(self.ray_address, self.ray_accelerator_type)
        jobs = self.jobs
        if jobs is None:
            threshold = FORKED_SMALL_SWEEP_COST if forked_ahead() else SMALL_SWEEP_COST
            jobs = 1 if small_sweep(units, threshold) else available_cores()
        if self.executor == LocalExecutor.name or (self.executor is None and jobs == 1):
            return LocalExecutor()
        return ProcessExecutor(jobs)

    def run(
        self, function: UnitFunction, units: Sequence[Unit], progress: Progress | None
    ) -> Iterator[list[Cell]]:
        """Each unit's cells, in the order of ``units``."""
        return self.executor_for(units).map(function, units, progress)

"""The sweep: plans the grid of cases and runs each (case, options) through the pipeline.

``CaseSource`` is the sweep's input adapter: the seeded rows of one case (ce_audit.plan.cases), quantized
once to each dtype, in blocks of at most ``block_mib`` of working memory. A dtype is skipped, with the
reason, where the loss is not defined for the options, where a reduction's single whole-batch call would
pass 4 × ``block_mib``, or where the generated logits overflow the dtype (or float64 itself, while generated).
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ce_audit import collector
from ce_audit.audit_result import AuditResult
from ce_audit.backends import TorchBackend, backend_class
from ce_audit.config import SweepConfig
from ce_audit.devices import cpu_alone, device_description
from ce_audit.dtypes import FloatFormat, float_format, overflow_peak, working_dtype
from ce_audit.implementations import Implementation, registered
from ce_audit.options import LossOptions
from ce_audit.pipeline import (
    Block,
    Progress,
    audit_source,
    row_multiple,
)
from ce_audit.plan.cases import (
    LINEAR_DISTRIBUTIONS,
    Case,
    class_weights,
    generate_inputs,
    generate_quantized,
    linear_classifier,
    linear_rows,
    quantize,
    row_blocks,
)
from ce_audit.plan.units import Unit, plan_units
from ce_audit.plugins import prepare
from ce_audit.reference.linear import FLOAT64_REFUSED
from ce_audit.reproducers import ReproducerSink
from ce_audit.results import Cell
from ce_audit.run.executors import Execution, sweep_cost
from ce_audit.run.interruption import Interrupted, UnitCount, received_signal, signal_name, stop_requested
from ce_audit.run.isolation import in_session, lasting_session, session
from ce_audit.run.shards import Shard
from ce_audit.run.worker_start import can_fork_workers, start_workers_ahead, workers_forked_ahead
from ce_audit.threads import torch_threads_for
from ce_audit.trace import tracing
from ce_audit.trace.shown import trace_shown


@dataclass
class CaseSource:
    """The inputs of one generated case with one set of loss options."""

    case: Case
    budget_bytes: int
    row_multiple: int = 1  # blocks are multiples of this many rows (sequence adapters)

    @property
    def options(self) -> LossOptions:
        return self.case.options

    def __post_init__(self) -> None:
        self.invalid = self.options.invalid_reason()
        self.linear = self.options.family == "linear_ce"
        if self.linear:
            self.invalid = self.invalid or linear_skip_reason(self.case)
            self._weight = None if self.invalid else linear_classifier(self.case)
        else:
            self._weight = None if self.invalid else class_weights(self.case, self.options)

    def weight(self, fmt: FloatFormat) -> np.ndarray | None:
        """The per-class input in ``fmt``: class weights (V,), or linear_ce's classifier C (V, D)."""
        return None if self._weight is None else quantize(self._weight, fmt)

    def _ranges(self, fmt: FloatFormat, budget_bytes: int) -> list[tuple[int, int]]:
        """Row blocks; a reduction is computed by the implementation over the whole batch, in one block."""
        if self.options.reduction != "none":
            return [(0, self.case.batch)]
        return list(row_blocks(self.case, working_dtype(fmt).itemsize, budget_bytes, self.row_multiple))

    def n_blocks(self, fmt: FloatFormat) -> int:
        return len(self._ranges(fmt, self.budget_bytes))

    def _blocks(self, fmt: FloatFormat, budget_bytes: int) -> Iterator[Block]:
        for start, stop in self._ranges(fmt, budget_bytes):
            if self.linear:  # hidden states E (rows, D) in place of logits
                hidden, targets = linear_rows(self.case, start, stop)
                yield start, quantize(hidden, fmt), targets
                continue
            logits, targets = generate_quantized(self.case, self.options, start, stop, fmt)
            yield start, logits, targets

    def blocks(self, fmt: FloatFormat) -> Iterator[Block]:
        return self._blocks(fmt, self.budget_bytes)

    def whole_batch(self, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
        (_, logits, targets), *_ = self._blocks(fmt, 1 << 62)
        return logits, targets

    def skip_reason(self, fmt: FloatFormat) -> str | None:
        if self.linear:
            return self.invalid or self._too_big(fmt) or linear_overflow(self.case, fmt)
        return self.invalid or self._too_big(fmt) or self._overflows(fmt)

    def _too_big(self, fmt: FloatFormat) -> str | None:
        case, reduction = self.case, self.options.reduction
        if (
            reduction == "none"
            or case.batch * case.vocab * working_dtype(fmt).itemsize <= 4 * self.budget_bytes
        ):
            return None
        return (
            f"a {reduction} is computed in one call over the whole batch; "
            f"{case.batch} × {case.vocab} passes 4 × block_mib of working memory"
        )

    def _overflows(self, fmt: FloatFormat) -> str | None:
        """Why the case cannot be represented in the dtype (its logits pass the largest finite value)."""
        case = self.case
        # Cheap bound first: |offset| + |scale| · (largest |base| a distribution can draw, with margin) + |M|.
        if abs(case.offset) + abs(case.scale) * 16.0 + abs(case.margin or 0.0) < fmt.max / 2:
            return None
        for start, stop in row_blocks(case, 8, 64 << 20):
            logits = generate_inputs(case, self.options, start, stop)[0]
            if np.isnan(logits).any() or np.isposinf(logits).any():  # masks are −inf; nothing else is
                return (
                    f"the generated logits overflow float64 (scale {case.scale:g}, offset {case.offset:g}): "
                    "the case cannot be generated"
                )
            peak = overflow_peak(logits, fmt)
            if peak is not None:
                return f"logits reach {peak:.4g}, beyond {fmt.name}'s largest finite value {fmt.max:.6g}"
        return None


def linear_skip_reason(case: Case) -> str | None:
    """Why a linear_ce case cannot be drawn (None: it can)."""
    if case.distribution not in LINEAR_DISTRIBUTIONS:
        return f"linear_ce draws its hidden states from {' or '.join(LINEAR_DISTRIBUTIONS)}"
    return None


def linear_overflow(case: Case, fmt: FloatFormat) -> str | None:
    """Why E or C cannot be held in ``fmt``: float64 is refused, values past the largest finite one."""
    if fmt.name == "float64":
        return FLOAT64_REFUSED
    hidden_peak = abs(case.offset) + abs(case.scale) * 8.0  # |N(0, 1)| past 8: p < 1.3e-15 a draw
    classifier_peak = case.classifier_scale * 8.0 / math.sqrt(max(case.hidden_size, 1))
    if max(hidden_peak, classifier_peak) < fmt.max / 2:
        return None
    for start, stop in row_blocks(case, 8, 64 << 20):
        peak = overflow_peak(linear_rows(case, start, stop)[0], fmt)
        if peak is not None:
            return f"hidden states reach {peak:.4g}, beyond {fmt.name}'s largest finite value {fmt.max:.6g}"
    peak = overflow_peak(linear_classifier(case), fmt)
    if peak is not None:
        return f"the classifier reaches {peak:.4g}, beyond {fmt.name}'s largest finite value {fmt.max:.6g}"
    return None


def _scaled(progress: Progress, cells: int, fraction: float) -> None:
    progress(fraction * cells)


def run_unit(
    unit: Unit, progress: Progress | None = None, reproducers: ReproducerSink | None = None
) -> list[Cell] | None:
    """The cells of one unit (none when no implementation audits its loss family); the same in any
    process: plugins are loaded again from the grid's specs where this process has not loaded them, and
    run isolated (ce_audit.run.isolation) in the run's session, or, in a --jobs worker process, in that
    process's lasting session (each implementation's worker started once per process). ``reproducers``
    (in this process only) collects the worst rows of every failing cell. None: the run was interrupted
    inside the unit (it is dropped whole)."""
    if not unit.impls:
        return []
    if progress is not None:  # the pipeline reports fractions of the unit; progress counts cells
        progress = functools.partial(_scaled, progress, unit.cells)
    grid = unit.grid
    impls = prepare(unit.impls, grid.plugins, specs=grid.impls)
    source = CaseSource(unit.case, grid.block_mib << 20, row_multiple(impls))
    count = UnitCount(1)
    opened = lasting_session if multiprocessing.parent_process() is not None else session
    isolated = (
        contextlib.nullcontext()
        if in_session()
        else opened(
            grid.isolation, grid.timeout, impls=grid.impls, plugins=grid.plugins, max_memory=grid.max_memory
        )
    )
    with isolated, tracing(grid.trace):
        cells, _ = audit_source(
            source, [float_format(unit.dtype)], impls, list(unit.devices),
            settings=grid.implementation_settings(), tolerances=grid.tolerances, grad=grid.grad,
            progress=progress, reproducers=reproducers, units=count,
        )  # fmt: skip
    return cells if count.done == count.total else None


def case_source(config: SweepConfig) -> Callable[[Case, Implementation], CaseSource]:
    """How a case's rows are generated again for one implementation, as ``config`` generated them: one
    source per case and row multiple, so that the cells of a case traced one after the other share its
    rows (ce_audit.trace.cells keeps the last source's blocks)."""
    sources: dict[tuple[Case, int], CaseSource] = {}

    def source_of(case: Case, impl: Implementation) -> CaseSource:
        key = (case, row_multiple([impl]))
        if key not in sources:
            sources[key] = CaseSource(case, config.block_mib << 20, key[1])
        return sources[key]

    return source_of


def start_workers_early(config: SweepConfig, execution: Execution, shard: Shard | None = None) -> None:
    """Where the sweep's units will run in worker processes here, start them now, before torch is
    imported and the units planned (``worker_start.start_workers_ahead``): the units on the CPU alone tell.
    Not where they will be forked from this process once torch is imported (``workers_forked_early``)."""
    if execution.devices_here:
        ahead = plan_units(config, cpu_only=True)[0]
        ahead = ahead if shard is None else shard.select(ahead)
        if _forks_later(config, execution, ahead):
            return
        threads = execution.worker_threads(ahead)
        if threads is not None:
            start_workers_ahead(threads)


def _forks_later(config: SweepConfig, execution: Execution, units: list[Unit]) -> bool:
    """Whether the workers of these units will be forked once torch is imported: on the CPU alone (known
    before torch's import: ``devices.cpu_alone``), where this process can fork them."""
    on_cpu = all(cpu_alone(grid.devices) for grid in config.expanded())
    return on_cpu and execution.forked_workers(units) is not None and can_fork_workers()


@contextlib.contextmanager
def workers_forked_early(
    config: SweepConfig, execution: Execution, shard: Shard | None = None
) -> Iterator[None]:
    """Inside the block, the sweep's worker processes forked now (``worker_start.workers_forked_ahead``),
    where its units run on the CPU alone in one-thread workers; torch imported here first where their
    implementations use it (each worker would import it again, and this process too, for the traces)."""
    units = plan_units(config, execution.devices_here)[0] if execution.devices_here else []
    units = units if shard is None else shard.select(units)
    workers = execution.forked_workers(units) if units else None
    if workers is None:
        yield
        return
    if _torch_backends(units):
        import torch  # noqa: F401 - imported once, here, for every worker
    collector.resume()  # start-up is over: the workers fork with its objects frozen (ce_audit.collector)
    with workers_forked_ahead(workers):
        yield


def _torch_backends(units: list[Unit]) -> bool:
    """Whether some implementation of these units runs on torch (the torch or triton backend)."""
    return any(
        issubclass(backend_class(impl.backend), TorchBackend)
        for unit in units
        if unit.impls
        for impl in prepare(unit.impls, unit.grid.plugins, specs=unit.grid.impls)
    )


def painters_wanted(config: SweepConfig, shard: Shard | None = None) -> int:
    """How many painter processes started now report.html's figures are worth
    (``figure_painter.painters_worth``), from the sweep's units on the CPU alone (torch not imported)."""
    from ce_audit.reports.figure_painter import painters_worth

    units = plan_units(config, cpu_only=True)[0]
    units = units if shard is None else shard.select(units)
    return painters_worth(((unit.dtype, unit.case) for unit in units), sweep_cost(units))


def run_sweep(
    config: SweepConfig,
    progress: Progress | None = None,
    *,
    execution: Execution | None = None,
    shard: Shard | None = None,
    reproducers: ReproducerSink | None = None,
    audited: Callable[[list[Cell]], None] | None = None,
) -> AuditResult:
    """Run the whole grid of ``config`` (each of its [[grids]] in turn); one cell per implementation,
    dtype, device and case, in the same order whatever runs the units (``execution``: in this process by
    default). ``shard``: run only that part of the units (ce_audit.run.shards); the result records which.
    ``reproducers`` collects the worst rows of every failing cell (the units then run in this process).
    A size this machine cannot hold is refused first (ce_audit.plan.capacity). ``audited`` is called with
    the cells once every unit ran, before the shown cells are traced (which changes only their causes)."""
    from ce_audit.plan.capacity import check_capacity

    check_capacity(config)
    if reproducers is not None or execution is None:
        execution = Execution()
    run = run_unit if reproducers is None else functools.partial(run_unit, reproducers=reproducers)
    started = time.time()
    clock = time.perf_counter()
    start_workers_early(config, execution, shard)
    units, devices = plan_units(config, execution.devices_here)
    chosen = units if shard is None else shard.select(units)
    cells: list[Cell] = []
    cell_counts: list[tuple[int, int]] = []
    count = UnitCount(len(chosen))
    grids = config.expanded()
    impls = [name for grid in grids for name in grid.impls]
    plugins = [spec for grid in grids for spec in grid.plugins]
    isolated = session(
        config.isolation, config.timeout, impls=impls, plugins=plugins, max_memory=config.max_memory
    )
    largest = max((unit.case.batch * unit.case.vocab for unit in chosen if unit.impls), default=0)
    forked = workers_forked_early(config, execution, shard)  # where `ce-audit sweep` has not forked them
    with forked, isolated, torch_threads_for(largest):  # isolated: one worker per implementation
        results = execution.run(run, chosen, progress)
        try:
            for unit, unit_cells in zip(chosen, results, strict=False):
                if unit_cells is None:  # dropped: the run was interrupted inside it
                    break
                cells += unit_cells
                cell_counts.append((unit.index, len(unit_cells)))
                count.done += 1  # once the run is asked to stop, the executor starts no other unit
        except (Interrupted, KeyboardInterrupt):  # a worker process stopped by the same Ctrl-C
            pass
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
        if audited is not None:
            audited(cells)
        if shard is None and not stop_requested():  # a shard's are traced by the merge, on every cell
            cells = trace_shown(cells, config, case_source(config))
    signum = received_signal()
    return AuditResult(
        config=config,
        cells=cells,
        implementations=registered(cell.impl for cell in cells),
        row_results=[],
        devices={device: device_description(device) for device in devices},
        started=started,
        seconds=time.perf_counter() - clock,
        shard=None if shard is None else shard.record(len(units), cell_counts),
        units_done=count.done,
        units_total=count.total,
        interrupted=signal_name(signum) if signum else "",
    )


def sweep_cells(config: SweepConfig, shard: Shard | None = None, devices_here: bool = True) -> int:
    """Number of cells a sweep (or one shard of it) reports, implementations × dtypes × devices × cases:
    what its progress counts, and its summary's closing line."""
    units = plan_units(config, devices_here)[0]
    return sum(unit.cells for unit in (units if shard is None else shard.select(units)))

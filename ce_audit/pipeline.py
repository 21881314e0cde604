"""The one pipeline every audit runs: blocks of (logits, targets) → reference → implementations → cells.

An input adapter (a sweep case: ``sweep.CaseSource``; a file: ``replay.FileSource``) provides, per
dtype, the row blocks quantized to that dtype, the whole batch for implementations that return a mean,
and a reason to skip the dtype. ``audit_source`` runs every implementation on every device over each
dtype's blocks, computing the reference once per block and sharing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from ce_audit.allocator import keep_freed_memory
from ce_audit.backends import Outcome, backend_class, uses_accelerators
from ce_audit.devices import device_name, resolve_devices
from ce_audit.dtypes import FloatFormat
from ce_audit.impl_runs import ImplRun, call_implementation, pytorch_kernels, skip_reason_of
from ce_audit.implementations import Implementation
from ce_audit.metrics import Tolerance, floor_ulp_error
from ce_audit.options import LossOptions
from ce_audit.plan.cases import Case
from ce_audit.plugins import prepare
from ce_audit.reference.device import block_reference, reference_device
from ce_audit.reproducers import ReproducerSink, row_badness
from ce_audit.results import Cell, RowResult
from ce_audit.row_verdict import RowErrorsScaled, floor_row_errors
from ce_audit.row_views import DROPPED_NOTE, BlockViews, RowsView, without_ignored
from ce_audit.run.interruption import Interrupted, UnitCount, stop_requested
from ce_audit.scoring import CellTally
from ce_audit.statuses import Status
from ce_audit.trace import traces, tracing_on
from ce_audit.trace.cells import traced
from ce_audit.upstream import draw_upstream
from ce_audit.verdict import Side

Progress = Callable[[float], None]
Block = tuple[int, np.ndarray, np.ndarray]  # (first row, quantized logits, targets)


class BlockSource(Protocol):
    """An input adapter: the inputs of one case, per dtype."""

    case: Case  # what the inputs are and the options they are audited with (its key columns)

    @property
    def options(self) -> LossOptions: ...

    def skip_reason(self, fmt: FloatFormat) -> str | None:
        """Why this dtype cannot be audited on these inputs (every cell skipped), or None."""

    def n_blocks(self, fmt: FloatFormat) -> int: ...

    def blocks(self, fmt: FloatFormat) -> Iterator[Block]:
        """Row blocks quantized to ``fmt`` (a reduction: the whole batch as one block)."""

    def whole_batch(self, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
        """Every row at once (for an implementation that returns a 0-d mean)."""

    def weight(self, fmt: FloatFormat) -> np.ndarray | None:
        """Per-class weights in ``fmt``, or None."""


def drops_ignored_rows(source: BlockSource, impl: Implementation) -> bool:
    """Whether ``impl`` is audited on the rows that are not ignored: the source asks for it
    (``drop_ignored_rows``, a replay) and the implementation cannot ignore rows itself."""
    options = source.options
    return (
        getattr(source, "drop_ignored_rows", False)
        and options.ignore_fraction > 0
        and not options.probs
        and "ignore_index" not in impl.supports
    )


def implementations_and_devices(
    names: Iterable[str], plugins: Iterable[str], devices: Iterable[str], *, present_only: bool = True
) -> tuple[list[Implementation], list[str]]:
    """The implementations to audit (plugins loaded first) and the devices they run on (``present_only``
    False: a named accelerator need not be present here)."""
    impls = prepare(tuple(names), tuple(plugins))
    wanted = any(uses_accelerators(impl.backend) for impl in impls)
    return impls, resolve_devices(tuple(devices), accelerators_wanted=wanted, present_only=present_only)


def row_multiple(impls: Iterable[Implementation]) -> int:
    """The row count every block must be a multiple of: the sequence lengths T of the adapters."""
    return math.lcm(1, *(getattr(impl.adapter, "row_multiple", 1) for impl in impls))


def _impl_runs(
    source: BlockSource,
    fmt: FloatFormat,
    impls: list[Implementation],
    devices: list[str],
    reproducers: ReproducerSink | None,
) -> list[ImplRun]:
    """Every implementation on every device, skipped with the reason where it cannot run."""
    runs = []
    for impl in impls:
        for device in devices:
            drops = drops_ignored_rows(source, impl)
            run = ImplRun(
                CellTally(impl, device),
                without_ignored(source.options) if drops else source.options,
                drops,
                worst=reproducers.tracker() if reproducers else None,
            )
            reason = skip_reason_of(impl, fmt, device, run.options)
            if reason:
                run.tally.fail(Status.SKIPPED, reason)
            else:
                run.tally.notes = backend_class(impl.backend).note()  # e.g. run under Triton's interpreter
            runs.append(run)
    return runs


class DtypeAudit:
    """Every implementation on every device over the row blocks of one (case, dtype), and the cells they
    become. The reference of each block is computed once and shared by every call on it."""

    def __init__(
        self,
        source: BlockSource,
        fmt: FloatFormat,
        impls: list[Implementation],
        devices: list[str],
        *,
        settings: dict[str, Any],
        tolerance: Tolerance,
        grad: bool,
        keep_rows: bool,
        progress: Progress | None,
        reproducers: ReproducerSink | None,
    ) -> None:
        self.source, self.fmt, self.grad = source, fmt, grad
        self.settings, self.tolerance = settings, tolerance
        self.keep_rows, self.progress, self.reproducers = keep_rows, progress, reproducers
        self.weight = source.weight(fmt)
        self.runs = _impl_runs(source, fmt, impls, devices, reproducers)
        self.kernels = pytorch_kernels(self.runs, devices, fmt, source.options)
        hidden = [run for run in self.kernels.values() if not run.reported]  # one per device at most
        self.every_run = [*self.runs, *hidden]  # the reported ones first
        self.on_device = reference_device(devices)
        # one progress unit per (case, dtype), in steps of one run on one block
        self.step = 1.0 / (max(source.n_blocks(fmt), 1) * max(len(self.runs), 1))
        self.row_results: list[RowResult] = []
        self.max_logit = self.max_reference = float("-inf")
        self.floor_loss = self.floor_grad = 0.0

    def audit_block(self, first_row: int, block: np.ndarray, targets: np.ndarray) -> None:
        """Compute the block's reference (and the floor: the error of the exact values rounded once), then
        call every pending implementation on it."""
        fmt, grad = self.fmt, self.grad
        options, weight = self.source.options, self.weight
        if block.size and options.family != "linear_ce":
            with np.errstate(invalid="ignore"):
                self.max_logit = max(self.max_logit, float(np.nanmax(block)))  # in the block's dtype: no copy
        reference = block_reference(block, targets, options, weight=weight, grad=grad, device=self.on_device)
        if not np.isnan(reference.max_logit):  # linear_ce: the block holds hidden states, not logits
            self.max_logit = max(self.max_logit, reference.max_logit)
        upstream = draw_upstream(self.source.case, first_row, block.shape[0]) if grad else None
        if upstream is not None:  # the gradient audited is c · ∂loss/∂z (ce_audit.upstream)
            reference = upstream.scaled(reference, reduced=options.reduction != "none")
        finite_reference = reference.loss[np.isfinite(reference.loss)]
        if finite_reference.size:
            self.max_reference = max(self.max_reference, float(finite_reference.max()))
        whole = first_row == 0 and block.shape[0] == self.source.case.batch
        full = RowsView(None, block, targets, reference, options, upstream=upstream)
        floor = None
        if any(run.tally.status is None for run in self.runs):
            exact_grad = reference.grad if grad else None
            floor = floor_row_errors(
                reference.loss, exact_grad, fmt, full.gradient_unit(), reference.classifier_rows
            )
            self.floor_loss = max(self.floor_loss, floor_ulp_error(reference.loss, fmt))
            if grad and reference.grad is not None:
                self.floor_grad = max(self.floor_grad, floor.grad_norm_rel)
        views = BlockViews(full, self.weight, grad)
        for run in self.every_run:
            run.tally.last_block = None
            if run.pending:
                self.run_on(run, first_row, views.view_for(run.drops_ignored), whole)
            if self.progress and run.reported:
                self.progress(self.step)
        if floor is not None:
            self._compare_rows(first_row, block.shape[0], floor.rows)

    def _compare_rows(self, first_row: int, rows: int, floor: RowErrorsScaled) -> None:
        """Each reported run's errors on this block against PyTorch's kernel's and the floor's on the same
        rows (ce_audit.row_verdict)."""
        scored = [run for run in self.runs if run.tally.last_block is not None]
        if not scored:
            return
        numbers = first_row + np.arange(rows)
        for run in scored:
            kernel = self.kernels.get(run.tally.device)
            pytorch = kernel.tally.last_block if kernel is not None and kernel.rows is None else None
            picked = run.rows
            if tracing_on():
                run.trace_rows.add_row_errors(run.tally.last_block.grad, numbers, picked)
            run.tally.row_verdict.add(
                run.tally.last_block, _on_rows(floor, picked, rows), _on_rows(pytorch, picked, rows),
                numbers if picked is None else numbers[picked],
            )  # fmt: skip

    def audit_deferred(self) -> None:
        """Call the implementations that returned a mean on a partial block once more, on the whole batch,
        scored against the exact mean alone (no per-row reference of the whole batch is needed)."""
        deferred = [run for run in self.every_run if run.tally.deferred and run.tally.status is None]
        if not deferred:
            return
        block, targets = self.source.whole_batch(self.fmt)
        upstream = draw_upstream(self.source.case, 0, block.shape[0]) if self.grad else None
        full = RowsView(None, block, targets, None, self.source.options, upstream=upstream)
        views = BlockViews(full, self.weight, self.grad, per_row=False)
        for run in deferred:
            self.run_on(run, 0, views.view_for(run.drops_ignored), True)

    def run_on(self, run: ImplRun, first_row: int, view: RowsView, whole: bool) -> None:
        """Call one implementation on the rows of ``view`` and score it against their reference (a mean:
        only on the ``whole`` batch, else deferred)."""
        if view.rows is not None and not view.rows.size:
            return  # every row of this block is ignored: nothing to call it on
        tally, reduced = run.tally, view.options.reduction != "none"
        outcome = call_implementation(tally, view, self.fmt, self.settings, self.grad, self.weight)
        if outcome is None:
            if run.worst is not None and tally.status == Status.ERROR:
                run.worst.offer_error(first_row, view.logits, view.targets, reduced)
            return
        if run.drops_ignored:
            tally.notes = tally.notes or DROPPED_NOTE
        run.rows = view.rows
        if not outcome.mean:
            self._score_rows(run, outcome, first_row, view)
        elif whole:
            mean = view.mean_reference(self.weight, self.grad)
            tally.score_mean(
                outcome, mean, self.fmt, self.tolerance, self.grad, view.gradient_unit(mean=True)
            )
            tally.last_block = None  # judged against the mean's floor alone (CellTally.score_mean)
            if run.worst is not None:
                run.worst.offer_batch(view.logits, view.targets, np.inf)
        else:
            tally.deferred = True

    def _score_rows(self, run: ImplRun, outcome: Outcome, first_row: int, view: RowsView) -> None:
        """Score per-row (or reduced) values against the view's reference; track the worst rows and keep
        the per-row results where asked."""
        reduced = view.options.reduction != "none"
        value = outcome.value.reshape(-1)
        reference = view.reference
        failures = run.tally.grad.failures
        errors = run.tally.score(
            outcome, value, reference, reference.loss, reference.grad, self.fmt, self.tolerance,
            view.gradient_unit(), view.exact_gradient(),
        )  # fmt: skip
        index = np.arange(value.shape[0]) if view.rows is None else view.rows
        diff = run.tally.grad.take_diff()  # |g − g*|, released here whether the trace uses it or not
        failed = run.tally.grad.failures > failures and not reduced and not reference.classifier_rows
        if failed and tracing_on():  # a gradient row fails (linear_ce's are not traced)
            exact = view.exact_gradient()
            bound = exact.whole_bound(self.tolerance, self.fmt) if exact is not None else None
            rows = first_row + index
            run.trace_rows.add_failing(outcome.grad, reference.grad, self.tolerance, rows, bound, diff)
        if run.worst is not None:
            badness = row_badness(errors, outcome.grad)
            if reduced:
                run.worst.offer_batch(view.logits, view.targets, float(badness[0]))
            else:
                run.worst.offer(first_row + index, badness, view.logits, view.targets)
        if self.keep_rows and run.reported:
            self.row_results.extend(
                RowResult(
                    run.tally.impl.name,
                    self.fmt.name,
                    run.tally.device,
                    -1 if reduced else first_row + int(index[i]),
                    -1 if reduced or view.targets.ndim != 1 else int(view.targets[i]),
                    float(reference.loss[i]),
                    float(value[i]),
                    float(errors.abs_err[i]),
                    float(errors.rel_err[i]),
                    float(errors.ulp_err[i]),
                )
                for i in range(value.shape[0])
            )

    def cells(self) -> list[Cell]:
        """One cell per reported run, judged against the floor and PyTorch's kernel on its device; a
        failing cell's worst rows go to the reproducers."""
        grad, case = self.grad, self.source.case
        floor = Side(self.floor_loss, False, self.floor_grad if grad else float("nan"))
        cells = []
        for run in self.runs:
            kernel = self.kernels.get(run.tally.device)
            cell = make_cell(
                run.tally, self.fmt, case, grad, self.max_logit, self.max_reference, floor,
                kernel.tally if kernel else None,
            )  # fmt: skip
            if traces(run.tally.impl):  # flagged cells' worst rows
                cell = traced(
                    cell, self.source, self.fmt, run.tally.impl, run.options, self.settings, self.weight,
                    grad, run.trace_rows.row,
                )  # fmt: skip
            if self.reproducers is not None and run.worst is not None:
                self.reproducers.add(cell, run.worst, run.tally.impl, run.options, case.seed)
            cells.append(cell)
        return cells


def _on_rows(errors: RowErrorsScaled | None, picked: np.ndarray | None, rows: int) -> RowErrorsScaled | None:
    """Errors over a block's rows, on the ``picked`` rows (None: all); a reduced value stays as it is."""
    if errors is None or picked is None:
        return errors
    loss = errors.loss[picked] if errors.loss.size == rows else errors.loss
    grad = errors.grad[picked] if errors.grad is not None and errors.grad.shape[0] == rows else errors.grad
    return RowErrorsScaled(loss, grad, errors.classifier)


def make_cell(
    tally: CellTally,
    fmt: FloatFormat,
    case: Case,
    grad: bool,
    max_logit: float,
    max_reference: float,
    floor: Side | None = None,
    pytorch: CellTally | None = None,
) -> Cell:
    """The one place a cell is made: the tally's ``Cell``, with the name of its device (its measurements in
    full precision; ``AuditResult.summary_cells`` keeps them to summary.csv's digits for the reports)."""
    return tally.to_cell(
        fmt, case, grad, max_logit, max_reference, floor, pytorch, device_name=device_name(tally.device)
    )


def audit_blocks(
    source: BlockSource,
    fmt: FloatFormat,
    impls: list[Implementation],
    devices: list[str],
    *,
    settings: dict[str, Any],
    tolerance: Tolerance,
    grad: bool,
    keep_rows: bool = False,
    progress: Progress | None = None,
    reproducers: ReproducerSink | None = None,
) -> tuple[list[Cell], list[RowResult]]:
    """Audit every implementation on every device over the row blocks of one (case, dtype).

    The reference is computed once per block and shared by every cell, on the first CUDA device audited
    where ``reference_device`` allows (else in NumPy on the CPU). An implementation that returns
    a 0-d mean where per-row losses are asked for must see the whole batch: when the batch spans several
    blocks it is called once more on ``source.whole_batch``. With ``reproducers``, each cell's worst rows
    are tracked and a failing cell's are handed to it.
    """
    audit = DtypeAudit(
        source, fmt, impls, devices, settings=settings, tolerance=tolerance, grad=grad, keep_rows=keep_rows,
        progress=progress, reproducers=reproducers,
    )  # fmt: skip
    for first_row, block, targets in source.blocks(fmt):
        audit.audit_block(first_row, block, targets)
    audit.audit_deferred()
    return audit.cells(), audit.row_results


def skipped_cells(
    impls: list[Implementation], devices: list[str], fmt: FloatFormat, case: Case, reason: str
) -> list[Cell]:
    """Every cell of a (case, dtype) that cannot be audited, with the reason."""
    nan = float("nan")
    return [
        make_cell(CellTally(impl, device, status=Status.SKIPPED, error=reason), fmt, case, False, nan, nan)
        for impl in impls
        for device in devices
    ]


def audit_source(
    source: BlockSource,
    formats: list[FloatFormat],
    impls: list[Implementation],
    devices: list[str],
    *,
    settings: dict[str, Any],
    tolerances: dict[str, Tolerance],
    grad: bool,
    keep_rows: bool = False,
    progress: Progress | None = None,
    reproducers: ReproducerSink | None = None,
    units: UnitCount | None = None,
) -> tuple[list[Cell], list[RowResult]]:
    """Every dtype of one source: its cells (skipped with the reason where the dtype cannot be audited).

    Each dtype is one unit: when the run is asked to stop (ce_audit.run.interruption) no further unit starts,
    and a unit whose isolated call was dropped is left out whole; ``units.done`` counts those completed.
    """
    keep_freed_memory()  # the blocks' temporaries reuse freed memory (ce_audit.allocator)
    cells: list[Cell] = []
    row_results: list[RowResult] = []
    for fmt in formats:
        if stop_requested():
            break
        reason = source.skip_reason(fmt)
        if reason:
            cells += skipped_cells(impls, devices, fmt, source.case, reason)
            if progress:
                progress(1.0)
            if units:
                units.done += 1
            continue
        try:
            fmt_cells, fmt_rows = audit_blocks(
                source, fmt, impls, devices, settings=settings, tolerance=tolerances[fmt.name], grad=grad,
                keep_rows=keep_rows, progress=progress, reproducers=reproducers,
            )  # fmt: skip
        except Interrupted:
            break
        cells += fmt_cells
        row_results += fmt_rows
        if units:
            units.done += 1
    return cells, row_results

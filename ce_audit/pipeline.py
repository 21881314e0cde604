"""The one pipeline every audit runs: blocks of (logits, targets) → reference → implementations → cells.

An input adapter (a sweep case: ``sweep.CaseSource``; a file: ``replay.FileSource``) provides, per
dtype, the row blocks quantized to that dtype, the whole batch for implementations that return a mean,
and a reason to skip the dtype. ``audit_source`` runs every implementation on every device over each
dtype's blocks, computing the reference once per block and sharing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from ce_audit.backends import BlockCall, Outcome, backend_skip_reason, uses_accelerators
from ce_audit.devices import device_name, resolve_devices
from ce_audit.dtypes import FloatFormat
from ce_audit.implementations import REGISTRY, Implementation
from ce_audit.metrics import Tolerance, floor_norm_error, floor_ulp_error
from ce_audit.options import LossOptions, skip_reason
from ce_audit.plugins import prepare
from ce_audit.reference.device import block_reference, reference_device
from ce_audit.reference.variants import reference_loss
from ce_audit.reproducers import ReproducerSink, WorstRows, row_badness
from ce_audit.results import Cell, RowResult
from ce_audit.run.interruption import Interrupted, UnitCount, stop_requested
from ce_audit.run.isolation import failure_reason, run_implementation
from ce_audit.scoring import CaseLabel, CellTally
from ce_audit.statuses import Status
from ce_audit.verdict import BASELINES, Side

Progress = Callable[[float], None]
Block = tuple[int, np.ndarray, np.ndarray]  # (first row, quantized logits, targets)


class BlockSource(Protocol):
    """An input adapter: the inputs of one case, per dtype."""

    label: CaseLabel
    options: LossOptions

    def skip_reason(self, fmt: FloatFormat) -> str | None:
        """Why this dtype cannot be audited on these inputs (every cell skipped), or None."""

    def n_blocks(self, fmt: FloatFormat) -> int: ...

    def blocks(self, fmt: FloatFormat) -> Iterator[Block]:
        """Row blocks quantized to ``fmt`` (a reduction: the whole batch as one block)."""

    def whole_batch(self, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
        """Every row at once (for an implementation that returns a 0-d mean)."""

    def weight(self, fmt: FloatFormat) -> np.ndarray | None:
        """Per-class weights in ``fmt``, or None."""


DROPPED_NOTE = "ignored rows left out of its call and of its reference (it does not support ignore_index)"


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


def without_ignored(options: LossOptions) -> LossOptions:
    """The options of a call on the rows that are not ignored: nothing left to ignore."""
    return replace(options, ignore_fraction=0.0)


def _kept(block: np.ndarray, targets: np.ndarray, options: LossOptions) -> np.ndarray | None:
    """Indices of the rows not ignored (None: every row is kept)."""
    ignored = targets == options.ignore_index
    return None if not ignored.any() else np.flatnonzero(~ignored)


def overflow_peak(values: np.ndarray, fmt: FloatFormat) -> float | None:
    """The largest finite |value| when some finite value rounds to ±inf in ``fmt`` (the inputs cannot be
    represented there), else None."""
    finite = values[np.isfinite(values)]
    with np.errstate(over="ignore"):
        if finite.size and np.isinf(fmt.quantize(finite)).any():
            return float(np.abs(finite).max())
    return None


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


def _skip(impl: Implementation, fmt: FloatFormat, device: str, options: LossOptions) -> str | None:
    if fmt.name not in impl.dtypes:
        return f"{impl.name} does not support {fmt.name}"
    return backend_skip_reason(impl.backend, fmt, device) or skip_reason(
        impl.name, impl.family, impl.supports, options
    )


def _expected_shape(options: LossOptions, block: np.ndarray) -> tuple[int, ...]:
    """What an implementation returns: a scalar for mean/sum, else per row (binary: per element)."""
    if options.reduction != "none":
        return ()
    return tuple(block.shape) if options.family == "binary" else (block.shape[0],)


def _call(
    tally: CellTally,
    block: np.ndarray,
    targets: np.ndarray,
    fmt: FloatFormat,
    settings: dict[str, Any],
    grad: bool,
    options: LossOptions,
    weight: np.ndarray | None,
) -> Outcome | None:
    """Run one implementation on one block; a failure marks the cell `error` and returns None."""
    try:
        call = BlockCall(
            block, targets, fmt, tally.device, settings, grad, options.call_options(), weight,
            _expected_shape(options, block),
        )  # fmt: skip
        outcome = run_implementation(tally.impl, call)  # non-built-ins isolated (ce_audit.run.isolation)
    except Exception as error:  # noqa: BLE001 - one failing implementation never stops the sweep
        tally.fail(Status.ERROR, failure_reason(error))
        return None
    kind = "mean" if outcome.mean else "rows"
    if tally.value_kind not in (None, kind):
        tally.fail(Status.ERROR, "returned per-row losses for one block and a mean for another")
        return None
    tally.value_kind = kind
    if tally.value_dtype not in ("", outcome.value_dtype):
        message = f"returned {tally.value_dtype} for one block and {outcome.value_dtype} for another"
        tally.fail(Status.ERROR, message)
        return None
    tally.value_dtype = outcome.value_dtype
    tally.wrote_input |= outcome.wrote_input
    return outcome


def _mean_reference(
    block: np.ndarray, targets: np.ndarray, options: LossOptions, weight: np.ndarray | None, grad: bool
) -> Any:
    """The exact batch mean a 0-d result stands for: PyTorch's ``mean`` with these options, over the rows
    not ignored (Σ w_y ℓ / Σ w_y with class weights), and its gradient."""
    return reference_loss(block, targets, replace(options, reduction="mean"), weight=weight, grad=grad)


def _baselines(
    tallies: list[CellTally], devices: list[str], fmt: FloatFormat, options: LossOptions
) -> tuple[dict[str, CellTally], list[CellTally]]:
    """PyTorch's kernel for the loss family on each device: the audited tally when it is one of them,
    otherwise a hidden one that is run and scored but not reported."""
    name = BASELINES.get(options.family)
    if name not in REGISTRY:
        return {}, []
    by_device, hidden = {}, []
    for device in devices:
        found = next((t for t in tallies if t.impl.name == name and t.device == device), None)
        if found is None:
            found = CellTally(REGISTRY[name], device)
            reason = _skip(found.impl, fmt, device, options)
            if reason:
                found.fail(Status.SKIPPED, reason)
            hidden.append(found)
        by_device[device] = found
    return by_device, hidden


# (row indices in the block or None for all, logits, targets, their reference, the options of the call)
RowsView = tuple[np.ndarray | None, np.ndarray, np.ndarray, Any, LossOptions]


def _kept_view(full: RowsView, weight: np.ndarray | None, grad: bool, per_row: bool = True) -> RowsView:
    """The rows of a block that are not ignored, with their own reference (options without ignoring);
    ``per_row`` False: no per-row reference (only a mean will be scored on them)."""
    _, block, targets, reference, options = full
    rows = _kept(block, targets, options)
    own = without_ignored(options)
    if rows is None:
        return (None, block, targets, reference, own)
    block, targets = block[rows], targets[rows]
    kept = reference_loss(block, targets, own, weight=weight, grad=grad) if per_row else None
    return (rows, block, targets, kept, own)


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
    options, label = source.options, source.label
    weight = source.weight(fmt)
    tallies = [CellTally(impl, device) for impl in impls for device in devices]
    dropping = {id(t) for t in tallies if drops_ignored_rows(source, t.impl)}
    for tally in tallies:
        own = without_ignored(options) if id(tally) in dropping else options
        reason = _skip(tally.impl, fmt, tally.device, own)
        if reason:
            tally.fail(Status.SKIPPED, reason)
    baselines, hidden = _baselines(tallies, devices, fmt, options)
    row_results: list[RowResult] = []
    max_logit, max_reference = float("-inf"), float("-inf")
    floor_loss = floor_grad = 0.0
    step = 1.0 / (max(source.n_blocks(fmt), 1) * max(len(tallies), 1))  # one unit per (case, dtype)
    on_device = reference_device(devices)
    worst: dict[int, WorstRows] = {id(t): reproducers.tracker() for t in tallies} if reproducers else {}

    means: dict[int, Any] = {}  # the exact batch mean of a view (for 0-d results), by id(view)

    def mean_reference(view: RowsView) -> Any:
        if id(view) not in means:
            _, block, targets, _, call_options = view
            means[id(view)] = _mean_reference(block, targets, call_options, weight, grad)
        return means[id(view)]

    def run_on(tally: CellTally, first_row: int, view: RowsView, whole: bool) -> None:
        """Call one implementation on the rows of ``view`` and score it against their reference."""
        rows, block, targets, reference, call_options = view
        if rows is not None and not rows.size:
            return  # every row of this block is ignored: nothing to call it on
        tracker = worst.get(id(tally))
        reduced = call_options.reduction != "none"
        outcome = _call(tally, block, targets, fmt, settings, grad, call_options, weight)
        if outcome is None:
            if tracker is not None and tally.status == Status.ERROR:
                tracker.offer_error(first_row, block, targets, reduced)
            return
        if id(tally) in dropping:
            tally.notes = tally.notes or DROPPED_NOTE
        if outcome.mean:
            if whole:
                tally.score_mean(outcome, mean_reference(view), fmt, tolerance, grad)
                if tracker is not None:
                    tracker.offer_batch(block, targets, np.inf)
            else:
                tally.deferred = True
            return
        value = outcome.value.reshape(-1)
        per_row = not reduced and call_options.family != "binary" and rows is None
        errors = tally.score(
            outcome, value, reference, reference.loss, reference.grad, fmt, tolerance,
            first_row if per_row else None,
        )  # fmt: skip
        if tracker is not None:
            badness = row_badness(errors, outcome.grad)
            if reduced:
                tracker.offer_batch(block, targets, float(badness[0]))
            else:
                index = np.arange(value.shape[0]) if rows is None else rows
                tracker.offer(first_row + index, badness, block, targets)
        if keep_rows and tally not in hidden:
            index = np.arange(value.shape[0]) if rows is None else rows
            row_results.extend(
                RowResult(
                    tally.impl.name,
                    fmt.name,
                    tally.device,
                    -1 if reduced else first_row + int(index[i]),
                    -1 if reduced or targets.ndim != 1 else int(targets[i]),
                    float(reference.loss[i]),
                    float(value[i]),
                    float(errors.abs_err[i]),
                    float(errors.rel_err[i]),
                    float(errors.ulp_err[i]),
                )
                for i in range(value.shape[0])
            )

    for first_row, block, targets in source.blocks(fmt):
        if block.size:
            with np.errstate(invalid="ignore"):
                max_logit = max(max_logit, float(np.nanmax(block)))  # in the block's dtype: no copy
        reference = block_reference(block, targets, options, weight=weight, grad=grad, device=on_device)
        finite_reference = reference.loss[np.isfinite(reference.loss)]
        if finite_reference.size:
            max_reference = max(max_reference, float(finite_reference.max()))
        whole = first_row == 0 and block.shape[0] == label.batch
        if any(tally.status is None for tally in tallies):
            floor_loss = max(floor_loss, floor_ulp_error(reference.loss, fmt))
            if grad and reference.grad is not None:
                floor_grad = max(floor_grad, floor_norm_error(reference.grad, fmt))
        means.clear()
        full: RowsView = (None, block, targets, reference, options)
        kept: RowsView | None = None
        for tally in [*tallies, *hidden]:
            if tally.status is None and not tally.deferred:
                view = full
                if id(tally) in dropping:
                    kept = kept or _kept_view(full, weight, grad)
                    view = kept
                run_on(tally, first_row, view, whole)
            if progress and tally not in hidden:
                progress(step)
    deferred = [tally for tally in [*tallies, *hidden] if tally.deferred and tally.status is None]
    if deferred:
        block, targets = source.whole_batch(fmt)
        # the whole batch now; a deferred implementation returns a mean, scored against mean_reference
        # alone: no per-row reference of the whole batch is needed
        full = (None, block, targets, None, options)
        kept = None
        means.clear()
        for tally in deferred:
            view = full
            if id(tally) in dropping:
                kept = kept or _kept_view(full, weight, grad, per_row=False)
                view = kept
            run_on(tally, 0, view, True)
    floor = Side(floor_loss, False, floor_grad if grad else float("nan"))
    cells = [
        tally.to_cell(fmt, label, grad, max_logit, max_reference, floor, baselines.get(tally.device))
        for tally in tallies
    ]
    cells = [replace(cell, device_name=device_name(cell.device)) for cell in cells]
    if reproducers is not None:
        for tally, cell in zip(tallies, cells, strict=True):
            own = without_ignored(options) if id(tally) in dropping else options
            reproducers.add(cell, worst[id(tally)], tally.impl, own, label.seed)
    return cells, row_results


def skipped_cells(
    impls: list[Implementation], devices: list[str], fmt: FloatFormat, label: CaseLabel, reason: str
) -> list[Cell]:
    """Every cell of a (case, dtype) that cannot be audited, with the reason."""
    cells = []
    for impl in impls:
        for device in devices:
            tally = CellTally(impl, device, status=Status.SKIPPED, error=reason)
            cell = tally.to_cell(fmt, label, False, float("nan"), float("nan"))
            cells.append(replace(cell, device_name=device_name(device)))
    return cells


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
    cells: list[Cell] = []
    row_results: list[RowResult] = []
    for fmt in formats:
        if stop_requested():
            break
        reason = source.skip_reason(fmt)
        if reason:
            cells += skipped_cells(impls, devices, fmt, source.label, reason)
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

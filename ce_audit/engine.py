"""Runs the grid: per case and dtype, row block by row block, one reference shared by every
implementation and device; per cell, running loss and gradient tallies that become one summary row.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_audit.cases import Case, build_cases, generate_rows, quantize, row_blocks
from ce_audit.config import SweepConfig
from ce_audit.devices import device_description, resolve_devices
from ce_audit.dtypes import FloatFormat, float_format, working_dtype
from ce_audit.implementations import Implementation
from ce_audit.metrics import GradTally, LossTally, Tolerance
from ce_audit.plugins import prepare
from ce_audit.reference import reference_cross_entropy

Progress = Callable[[float], None]


@dataclass(frozen=True)
class SummaryRow:
    """One cell: implementation × dtype × device × case (the columns of summary.csv, in order)."""

    impl: str
    dtype: str
    device: str
    distribution: str
    scale: float
    offset: float
    batch: int
    vocab: int
    seed: int
    status: str
    rows: int
    nan_rows: int
    inf_rows: int
    max_abs_err: float
    max_rel_err: float
    max_ulp: float
    mean_bits: float
    grad_status: str
    grad_nan: int
    grad_inf: int
    grad_max_abs_err: float
    grad_max_rel_err: float
    error: str
    max_logit: float
    max_reference: float
    max_value: float
    value_kind: str  # "rows": per-row losses; "mean": a 0-d mean, audited as such; "" not measured
    wrote_input: bool  # the implementation changed its logits or targets buffer (it got a private copy)


@dataclass(frozen=True)
class RowRecord:
    """One row of one implementation (rows.csv): value against the reference."""

    impl: str
    dtype: str
    device: str
    row: int
    target: int
    reference: float
    value: float
    abs_err: float
    rel_err: float
    ulp: float


@dataclass(frozen=True)
class AuditResult:
    """What a sweep or replay returns: the rows, and what produced them."""

    config: SweepConfig
    rows: list[SummaryRow]
    records: list[RowRecord]
    devices: dict[str, str]
    started: float
    seconds: float


@dataclass(frozen=True)
class CaseLabel:
    """The case columns of a summary row."""

    distribution: str
    scale: float
    offset: float
    batch: int
    vocab: int
    seed: int


@dataclass
class _Cell:
    impl: Implementation
    device: str
    loss: LossTally = field(default_factory=LossTally)
    grad: GradTally = field(default_factory=GradTally)
    status: str | None = None  # "error" or "skipped" overrides the tallies
    grad_status: str | None = None
    error: str = ""
    max_value: float = float("-inf")
    value_kind: str | None = None  # "rows" or "mean", from the first result
    wrote_input: bool = False
    deferred: bool = False  # returned a mean on a partial block: audited later on the whole batch
    batch_rows: int = 0


@dataclass(frozen=True)
class _Outcome:
    """One call's result: per-row losses (N,) or a mean (shape ()), as float64, and the gradient."""

    value: np.ndarray
    grad: np.ndarray | None
    grad_error: str | None
    wrote_input: bool

    @property
    def mean(self) -> bool:
        return self.value.ndim == 0


def _error_message(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _skip_reason(impl: Implementation, fmt: FloatFormat, device: str) -> str | None:
    if fmt.name not in impl.dtypes:
        return f"{impl.name} does not support {fmt.name}"
    if impl.backend == "numpy" and device != "cpu":
        return "NumPy implementations run on the CPU only"
    if device == "mps" and fmt.name == "float64":
        return "MPS has no float64"
    return None


class _TorchRunner:
    """Moves a quantized block to a device, calls a torch implementation, returns loss and gradient."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self._dtypes = {
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float32": torch.float32,
            "float64": torch.float64,
        }

    def tensor(self, block: np.ndarray, fmt: FloatFormat, device: str) -> Any:
        """A fresh copy of the block on the device, so an implementation that writes into it harms nothing."""
        torch = self.torch
        if fmt.name == "bfloat16":
            source = torch.from_numpy(block.view(np.uint16)).view(torch.bfloat16)
        else:
            source = torch.from_numpy(block)
        return source.to(device=device, copy=True)

    def _bytes(self, tensor: Any) -> np.ndarray:
        return tensor.detach().to("cpu").contiguous().view(self.torch.uint8).numpy().reshape(-1)

    def run(
        self,
        impl: Implementation,
        block: np.ndarray,
        targets: np.ndarray,
        fmt: FloatFormat,
        device: str,
        settings: dict[str, Any],
        want_grad: bool,
    ) -> _Outcome:
        torch = self.torch
        logits = self.tensor(block, fmt, device)
        target_tensor = torch.from_numpy(targets).to(device=device, copy=True)
        logits.requires_grad_(want_grad)
        with torch.set_grad_enabled(want_grad):
            losses = impl(logits, target_tensor, settings)
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"returned {_type_name(losses)}, expected a torch.Tensor")
        if not impl.builtin and losses.dtype != logits.dtype:
            raise TypeError(f"returned {_torch_name(losses.dtype)}, expected {fmt.name} (the audited dtype)")
        _check_shape(tuple(losses.shape), block.shape[0])
        if not impl.builtin and losses.device != logits.device:
            raise ValueError(f"returned a tensor on {losses.device}, expected {logits.device}")
        value = losses.detach().to("cpu", torch.float64).numpy()
        grad, grad_error = None, None
        if want_grad:
            try:
                if not losses.requires_grad:
                    raise RuntimeError("the result does not require grad")
                losses.sum().backward()
                if logits.grad is None:
                    raise RuntimeError("no gradient reached the logits")
                grad = logits.grad.detach().to("cpu", torch.float64).numpy()
            except Exception as error:  # noqa: BLE001 - a failing backward is recorded, not raised
                grad_error = _error_message(error)
        # Checked after backward too: fused kernels may store the gradient in the logits buffer.
        wrote = tuple(logits.shape) != block.shape or not np.array_equal(
            self._bytes(logits), np.ascontiguousarray(block).view(np.uint8).reshape(-1)
        )
        wrote = wrote or not np.array_equal(target_tensor.detach().cpu().numpy(), targets)
        return _Outcome(value, grad, grad_error, wrote)


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _torch_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _check_shape(shape: tuple[int, ...], n_rows: int) -> None:
    if shape not in ((n_rows,), ()):
        raise ValueError(f"returned shape {shape}, expected ({n_rows},) per-row losses or a 0-d mean")


def _run_numpy(
    impl: Implementation, block: np.ndarray, targets: np.ndarray, settings: dict[str, Any]
) -> _Outcome:
    logits, target_copy = block.copy(), targets.copy()
    with np.errstate(all="ignore"):  # overflow in an audited implementation is a finding, not a warning
        losses = impl(logits, target_copy, settings)
    if isinstance(losses, np.generic) and not impl.builtin:  # a NumPy scalar, e.g. from np.mean
        losses = np.asarray(losses)
    if not isinstance(losses, np.ndarray):
        raise TypeError(f"returned {_type_name(losses)}, expected a numpy.ndarray")
    if not impl.builtin and losses.dtype != block.dtype:
        raise TypeError(f"returned {losses.dtype}, expected {block.dtype} (the audited dtype)")
    _check_shape(losses.shape, block.shape[0])
    wrote = logits.shape != block.shape or not np.array_equal(logits.view(np.uint8), block.view(np.uint8))
    wrote = wrote or not np.array_equal(target_copy, targets)
    return _Outcome(losses.astype(np.float64), None, None, wrote)


def _call(
    cell: _Cell,
    runner: _TorchRunner | None,
    block: np.ndarray,
    targets: np.ndarray,
    fmt: FloatFormat,
    settings: dict[str, Any],
    grad: bool,
) -> _Outcome | None:
    """Run one implementation on one block; a failure marks the cell `error` and returns None."""
    try:
        if cell.impl.backend == "torch":
            assert runner is not None
            outcome = runner.run(cell.impl, block, targets, fmt, cell.device, settings, grad)
        else:
            outcome = _run_numpy(cell.impl, block, targets, settings)
    except Exception as error:  # noqa: BLE001 - one failing implementation never stops the sweep
        cell.status, cell.error = "error", _error_message(error)
        return None
    kind = "mean" if outcome.mean else "rows"
    if cell.value_kind not in (None, kind):
        cell.status, cell.error = "error", "returned per-row losses for one block and a mean for another"
        return None
    cell.value_kind = kind
    cell.wrote_input |= outcome.wrote_input
    return outcome


def _score(
    cell: _Cell,
    outcome: _Outcome,
    value: np.ndarray,
    reference_loss: np.ndarray,
    reference_grad: np.ndarray | None,
    fmt: FloatFormat,
    tolerance: Tolerance,
) -> Any:
    """Add one result to the cell's tallies; returns the per-row errors."""
    work = reference_loss.dtype
    errors = cell.loss.add(value.astype(work), reference_loss, fmt, tolerance)
    finite_values = value[np.isfinite(value)]
    if finite_values.size:
        cell.max_value = max(cell.max_value, float(finite_values.max()))
    if outcome.grad_error:
        cell.grad_status, cell.error = "error", outcome.grad_error
    elif outcome.grad is not None and reference_grad is not None and cell.grad_status is None:
        cell.grad.add(outcome.grad.astype(work), reference_grad, tolerance)
    return errors


def _score_mean(
    cell: _Cell, outcome: _Outcome, reference: Any, fmt: FloatFormat, tolerance: Tolerance, grad: bool
) -> None:
    """A 0-d result against the exact mean Σ_i loss_i / N (summed in working precision); gradient / N."""
    n_rows = reference.loss.shape[0]
    with np.errstate(all="ignore"):
        mean = reference.loss.sum() / n_rows if n_rows else np.array(np.nan, dtype=reference.loss.dtype)
        mean_grad = reference.grad
        if grad and mean_grad is not None and n_rows:
            mean_grad = mean_grad / n_rows
    cell.batch_rows = n_rows
    _score(cell, outcome, outcome.value.reshape(1), np.asarray(mean).reshape(1), mean_grad, fmt, tolerance)


def audit_blocks(
    blocks: Iterable[tuple[int, np.ndarray, np.ndarray]],
    fmt: FloatFormat,
    label: CaseLabel,
    impls: list[Implementation],
    devices: list[str],
    *,
    settings: dict[str, Any],
    tolerance: Tolerance,
    grad: bool,
    keep_rows: bool = False,
    n_blocks: int = 1,
    progress: Progress | None = None,
    whole_batch: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[list[SummaryRow], list[RowRecord]]:
    """Audit every implementation on every device over the row blocks of one (case, dtype).

    ``blocks`` yields (first row, quantized logits, targets). The reference is computed once per
    block and shared by every cell. An implementation that returns a 0-d mean must see the whole
    batch: when the batch spans several blocks it is called once more on ``whole_batch()``.
    """
    cells = [_Cell(impl, device) for impl in impls for device in devices]
    for cell in cells:
        reason = _skip_reason(cell.impl, fmt, cell.device)
        if reason:
            cell.status, cell.error = "skipped", reason
    runner = _TorchRunner() if any(c.impl.backend == "torch" and c.status is None for c in cells) else None
    records: list[RowRecord] = []
    max_logit, max_reference = float("-inf"), float("-inf")
    step = 1.0 / (max(n_blocks, 1) * max(len(cells), 1))  # progress: one unit per (case, dtype)

    for first_row, block, targets in blocks:
        if block.size:
            with np.errstate(invalid="ignore"):
                max_logit = max(max_logit, float(np.max(block)))  # in the block's own dtype: no copy
        reference = reference_cross_entropy(block, targets, grad=grad)
        finite_reference = reference.loss[np.isfinite(reference.loss)]
        if finite_reference.size:
            max_reference = max(max_reference, float(finite_reference.max()))
        whole = first_row == 0 and block.shape[0] == label.batch
        for cell in cells:
            outcome = None
            if cell.status is None and not cell.deferred:
                outcome = _call(cell, runner, block, targets, fmt, settings, grad)
            if progress:
                progress(step)
            if outcome is None:
                continue
            if outcome.mean:
                if whole:
                    _score_mean(cell, outcome, reference, fmt, tolerance, grad)
                else:
                    cell.deferred = True
                continue
            errors = _score(cell, outcome, outcome.value, reference.loss, reference.grad, fmt, tolerance)
            if keep_rows:
                records.extend(
                    RowRecord(
                        cell.impl.name,
                        fmt.name,
                        cell.device,
                        first_row + i,
                        int(targets[i]),
                        float(reference.loss[i]),
                        float(outcome.value[i]),
                        float(errors.abs_err[i]),
                        float(errors.rel_err[i]),
                        float(errors.ulp_err[i]),
                    )
                    for i in range(outcome.value.shape[0])
                )
    deferred = [cell for cell in cells if cell.deferred and cell.status is None]
    if deferred:
        _audit_whole_batch(deferred, runner, whole_batch, fmt, settings, tolerance, grad)
    rows = [_summary_row(cell, fmt, label, grad, max_logit, max_reference) for cell in cells]
    return rows, records


def _audit_whole_batch(
    cells: list[_Cell],
    runner: _TorchRunner | None,
    whole_batch: Callable[[], tuple[np.ndarray, np.ndarray]] | None,
    fmt: FloatFormat,
    settings: dict[str, Any],
    tolerance: Tolerance,
    grad: bool,
) -> None:
    """Mean-valued implementations of a batch that spans several blocks: one call on every row at once."""
    if whole_batch is None:
        for cell in cells:
            cell.status, cell.error = "error", "returned a mean, but the batch was split into blocks"
        return
    block, targets = whole_batch()
    reference = reference_cross_entropy(block, targets, grad=grad)
    for cell in cells:
        outcome = _call(cell, runner, block, targets, fmt, settings, grad)
        if outcome is not None:
            _score_mean(cell, outcome, reference, fmt, tolerance, grad)


def _summary_row(
    cell: _Cell, fmt: FloatFormat, label: CaseLabel, grad: bool, max_logit: float, max_reference: float
) -> SummaryRow:
    if cell.status in ("error", "skipped"):
        status, grad_status = cell.status, cell.status
    else:
        status = cell.loss.status
        if cell.grad_status:
            grad_status = cell.grad_status
        elif cell.impl.backend == "numpy":
            grad_status = "n/a"
        elif not grad:
            grad_status = "off"
        else:
            grad_status = cell.grad.status
    measured = cell.status is None
    mean = measured and cell.value_kind == "mean"
    return SummaryRow(
        impl=cell.impl.name,
        dtype=fmt.name,
        device=cell.device,
        distribution=label.distribution,
        scale=label.scale,
        offset=label.offset,
        batch=label.batch,
        vocab=label.vocab,
        seed=label.seed,
        status=status,
        rows=cell.batch_rows if mean else cell.loss.rows,
        nan_rows=cell.loss.nan_rows,
        inf_rows=cell.loss.inf_rows,
        max_abs_err=cell.loss.max_abs_err,
        max_rel_err=cell.loss.max_rel_err,
        max_ulp=cell.loss.max_ulp,
        mean_bits=cell.loss.mean_bits,
        grad_status=grad_status,
        grad_nan=cell.grad.nan_rows,
        grad_inf=cell.grad.inf_rows,
        grad_max_abs_err=cell.grad.max_abs_err,
        grad_max_rel_err=cell.grad.max_rel_err,
        error=cell.error,
        max_logit=max_logit,
        max_reference=max_reference,
        max_value=cell.max_value if measured else float("nan"),
        value_kind=(cell.value_kind or "") if measured else "",
        wrote_input=cell.wrote_input,
    )


def _case_blocks(
    case: Case, fmt: FloatFormat, budget_bytes: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start, stop in row_blocks(case, working_dtype(fmt).itemsize, budget_bytes):
        logits, targets = generate_rows(case, start, stop)
        yield start, quantize(logits, fmt), targets


def _whole_batch(case: Case, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    logits, targets = generate_rows(case, 0, case.batch)
    return quantize(logits, fmt), targets


def _overflow_reason(case: Case, fmt: FloatFormat) -> str | None:
    """Why a case cannot be represented in the dtype (its logits pass the largest finite value)."""
    for start, stop in row_blocks(case, 8, 64 << 20):
        logits, _ = generate_rows(case, start, stop)
        if logits.size and np.isinf(quantize(logits, fmt)).any():
            peak = float(np.abs(logits).max())
            return f"logits reach {peak:.4g}, beyond {fmt.name}'s largest finite value {fmt.max:.6g}"
    return None


def _overflows(case: Case, fmt: FloatFormat) -> str | None:
    # Cheap bound first: |offset| + |scale| · (largest |base| a distribution can draw, with margin).
    bound = abs(case.offset) + abs(case.scale) * 16.0
    if bound < fmt.max / 2:
        return None
    return _overflow_reason(case, fmt)


def _skipped_rows(
    impls: list[Implementation], devices: list[str], fmt: FloatFormat, label: CaseLabel, reason: str
) -> list[SummaryRow]:
    rows = []
    for impl in impls:
        for device in devices:
            cell = _Cell(impl, device, status="skipped", error=reason)
            rows.append(_summary_row(cell, fmt, label, False, float("nan"), float("nan")))
    return rows


def run_sweep(config: SweepConfig, progress: Progress | None = None) -> AuditResult:
    """Run the whole grid of ``config``; returns one summary row per cell."""
    started = time.time()
    clock = time.perf_counter()
    impls = prepare(config.impls, config.plugins)
    devices = resolve_devices(config.devices, accelerators_wanted=any(i.backend == "torch" for i in impls))
    cases = build_cases(
        config.distributions, config.scales, config.offsets, config.vocabs, config.batches, config.seed
    )
    formats = [float_format(name) for name in config.dtypes]
    settings = config.implementation_settings()
    budget = config.block_mib << 20
    rows: list[SummaryRow] = []
    for case in cases:
        label = CaseLabel(case.distribution, case.scale, case.offset, case.batch, case.vocab, case.seed)
        for fmt in formats:
            reason = _overflows(case, fmt)
            if reason:
                rows += _skipped_rows(impls, devices, fmt, label, reason)
                if progress:
                    progress(1.0)
                continue
            n_blocks = len(list(row_blocks(case, working_dtype(fmt).itemsize, budget)))
            cell_rows, _ = audit_blocks(
                _case_blocks(case, fmt, budget),
                fmt,
                label,
                impls,
                devices,
                settings=settings,
                tolerance=config.tolerances[fmt.name],
                grad=config.grad,
                n_blocks=n_blocks,
                progress=progress,
                whole_batch=functools.partial(_whole_batch, case, fmt),
            )
            rows += cell_rows
    return AuditResult(
        config=config,
        rows=rows,
        records=[],
        devices={device: device_description(device) for device in devices},
        started=started,
        seconds=time.perf_counter() - clock,
    )


def sweep_size(config: SweepConfig) -> int:
    """Number of (case, dtype) units a sweep reports progress in."""
    return (
        len(config.distributions)
        * len(config.scales)
        * len(config.offsets)
        * len(config.vocabs)
        * len(config.batches)
        * len(config.dtypes)
    )

"""Runs the grid: per case and dtype, row block by row block, one reference shared by every
implementation and device; per cell, running loss and gradient tallies that become one summary row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ce_audit.cases import Case, build_cases, generate_rows, quantize, row_blocks
from ce_audit.config import SweepConfig
from ce_audit.devices import device_description, resolve_devices
from ce_audit.dtypes import FloatFormat, float_format, working_dtype
from ce_audit.implementations import Implementation, resolve
from ce_audit.metrics import GradTally, LossTally, Tolerance
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

    def run(
        self,
        impl: Implementation,
        block: np.ndarray,
        targets: np.ndarray,
        fmt: FloatFormat,
        device: str,
        settings: dict[str, Any],
        want_grad: bool,
    ) -> tuple[np.ndarray, np.ndarray | None, str | None]:
        torch = self.torch
        logits = self.tensor(block, fmt, device)
        target_tensor = torch.from_numpy(targets).to(device)
        logits.requires_grad_(want_grad)
        with torch.set_grad_enabled(want_grad):
            losses = impl(logits, target_tensor, settings)
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"returned {type(losses).__name__}, expected a torch.Tensor")
        if tuple(losses.shape) != (block.shape[0],):
            raise ValueError(f"returned shape {tuple(losses.shape)}, expected ({block.shape[0]},)")
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
        return value, grad, grad_error


def _run_numpy(
    impl: Implementation, block: np.ndarray, targets: np.ndarray, settings: dict[str, Any]
) -> np.ndarray:
    with np.errstate(all="ignore"):  # overflow in an audited implementation is a finding, not a warning
        losses = impl(block.copy(), targets.copy(), settings)
    if not isinstance(losses, np.ndarray):
        raise TypeError(f"returned {type(losses).__name__}, expected a numpy.ndarray")
    if losses.shape != (block.shape[0],):
        raise ValueError(f"returned shape {losses.shape}, expected ({block.shape[0]},)")
    return losses.astype(np.float64)


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
) -> tuple[list[SummaryRow], list[RowRecord]]:
    """Audit every implementation on every device over the row blocks of one (case, dtype).

    ``blocks`` yields (first row, quantized logits, targets). The reference is computed once per
    block and shared by every cell.
    """
    cells = [_Cell(impl, device) for impl in impls for device in devices]
    for cell in cells:
        reason = _skip_reason(cell.impl, fmt, cell.device)
        if reason:
            cell.status, cell.error = "skipped", reason
    runner = _TorchRunner() if any(c.impl.backend == "torch" and c.status is None for c in cells) else None
    work = working_dtype(fmt)
    records: list[RowRecord] = []
    max_logit, max_reference = float("-inf"), float("-inf")
    step = 1.0 / (max(n_blocks, 1) * max(len(cells), 1))  # progress: one unit per (case, dtype)

    for first_row, block, targets in blocks:
        if block.size:
            max_logit = max(max_logit, float(np.nanmax(block.astype(np.float64))))
        reference = reference_cross_entropy(block, targets, grad=grad)
        finite_reference = reference.loss[np.isfinite(reference.loss)]
        if finite_reference.size:
            max_reference = max(max_reference, float(finite_reference.max()))
        for cell in cells:
            if cell.status is not None:
                if progress:
                    progress(step)
                continue
            try:
                if cell.impl.backend == "torch":
                    assert runner is not None
                    value, gradient, grad_error = runner.run(
                        cell.impl, block, targets, fmt, cell.device, settings, grad
                    )
                else:
                    value, gradient, grad_error = _run_numpy(cell.impl, block, targets, settings), None, None
            except Exception as error:  # noqa: BLE001 - one failing implementation never stops the sweep
                cell.status, cell.error = "error", _error_message(error)
                if progress:
                    progress(step)
                continue
            value_work = value.astype(work)
            errors = cell.loss.add(value_work, reference.loss, fmt, tolerance)
            finite_values = value[np.isfinite(value)]
            if finite_values.size:
                cell.max_value = max(cell.max_value, float(finite_values.max()))
            if grad_error:
                cell.grad_status, cell.error = "error", grad_error
            elif gradient is not None and reference.grad is not None and cell.grad_status is None:
                cell.grad.add(gradient.astype(work), reference.grad, tolerance)
            if keep_rows:
                records.extend(
                    RowRecord(
                        cell.impl.name,
                        fmt.name,
                        cell.device,
                        first_row + i,
                        int(targets[i]),
                        float(reference.loss[i]),
                        float(value[i]),
                        float(errors.abs_err[i]),
                        float(errors.rel_err[i]),
                        float(errors.ulp_err[i]),
                    )
                    for i in range(value.shape[0])
                )
            if progress:
                progress(step)
    rows = [_summary_row(cell, fmt, label, grad, max_logit, max_reference) for cell in cells]
    return rows, records


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
        rows=cell.loss.rows,
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
    )


def _case_blocks(
    case: Case, fmt: FloatFormat, budget_bytes: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start, stop in row_blocks(case, working_dtype(fmt).itemsize, budget_bytes):
        logits, targets = generate_rows(case, start, stop)
        yield start, quantize(logits, fmt), targets


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
    impls = resolve(config.impls)
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

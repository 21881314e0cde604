"""Runs the grid: per case and dtype, row block by row block, one reference shared by every
implementation and device; per cell, running loss and gradient tallies that become one summary row.
"""

from __future__ import annotations

import functools
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ce_audit.cases import Case, build_cases, class_weights, generate_inputs, quantize, row_blocks
from ce_audit.config import SweepConfig
from ce_audit.devices import device_description, resolve_devices
from ce_audit.dtypes import FloatFormat, float_format, working_dtype
from ce_audit.implementations import Implementation
from ce_audit.metrics import GradChecks, GradTally, LossTally, Tolerance
from ce_audit.options import LossOptions, skip_reason
from ce_audit.plugins import prepare
from ce_audit.reference_variants import reference_loss

Progress = Callable[[float], None]
PLAIN = LossOptions()  # plain per-row cross-entropy


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
    grad_true_max_rel_err: float = 0.0
    grad_rowsum_max: float = 0.0
    loss: str = "ce"
    reduction: str = "none"
    weights: str = "none"
    ignore_fraction: float = 0.0
    ignore_index: int = -100
    label_smoothing: float = 0.0
    targets: str = "index"
    softcap: float = 0.0
    z_loss: float = 0.0
    mask_fraction: float = 0.0
    margin: float | None = None
    target_position: str = "random"
    focal_gamma: float | None = None
    focal_alpha: float = 1.0
    notes: str = ""
    value_kind: str = ""  # "rows": per-row losses; "mean": a 0-d mean, audited as such; "" not measured
    wrote_input: bool = False  # the implementation changed its logits or targets buffer (it had a copy)


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
    options: LossOptions = PLAIN
    margin: float | None = None
    target_position: str = "random"


@dataclass
class _Cell:
    impl: Implementation
    device: str
    loss: LossTally = field(default_factory=LossTally)
    grad: GradTally = field(default_factory=GradTally)
    checks: GradChecks = field(default_factory=GradChecks)
    status: str | None = None  # "error" or "skipped" overrides the tallies
    grad_status: str | None = None
    error: str = ""
    notes: str = ""
    max_value: float = float("-inf")
    value_kind: str | None = None  # "rows" or "mean", from the first result
    wrote_input: bool = False
    deferred: bool = False  # returned a mean on a partial block: audited later on the whole batch
    batch_rows: int = 0


@dataclass(frozen=True)
class _Outcome:
    """One call's result: the value (per row, per element, or 0-d) as float64, and the gradient."""

    value: np.ndarray
    grad: np.ndarray | None
    grad_error: str | None
    wrote_input: bool
    mean: bool = False  # a 0-d value where per-row losses were asked for: audited as the batch mean


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

    def tensor(self, block: np.ndarray, fmt: FloatFormat, device: str) -> Any:
        """A fresh copy of the block on the device, so an implementation that writes into it harms nothing."""
        torch = self.torch
        if fmt.name == "bfloat16":
            source = torch.from_numpy(block.view(np.uint16)).view(torch.bfloat16)
        else:
            source = torch.from_numpy(block)
        return source.to(device=device, copy=True)

    def _bytes(self, tensor: Any) -> np.ndarray:
        if tensor.numel() == 0:
            return np.zeros(0, dtype=np.uint8)
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
        options: dict[str, Any] | None = None,
        weight: np.ndarray | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> _Outcome:
        torch = self.torch
        logits = self.tensor(block, fmt, device)
        if targets.dtype.kind == "f" or targets.dtype == fmt.numpy_dtype:  # probabilities, binary targets
            target_tensor = self.tensor(targets, fmt, device)
        else:
            target_tensor = torch.from_numpy(targets).to(device=device, copy=True)
        options = dict(options or {})
        if weight is not None:
            options["weight"] = self.tensor(weight, fmt, device)
        shape = (block.shape[0],) if shape is None else shape
        logits.requires_grad_(want_grad)
        with torch.set_grad_enabled(want_grad):
            losses = impl(logits, target_tensor, settings, options)
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"returned {_type_name(losses)}, expected a torch.Tensor")
        if not impl.builtin and losses.dtype != logits.dtype:
            raise TypeError(f"returned {_torch_name(losses.dtype)}, expected {fmt.name} (the audited dtype)")
        mean = _check_shape(tuple(losses.shape), shape)
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
        wrote = wrote or not np.array_equal(self._bytes(target_tensor), _raw_bytes(targets))
        return _Outcome(value, grad, grad_error, wrote, mean)


def _raw_bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint8).reshape(-1)


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _torch_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _check_shape(got: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """True when a 0-d value stands for the mean of per-row losses; raises on any other mismatch."""
    if got == expected:
        return False
    if got == () and len(expected) == 1:
        return True
    wanted = f"{expected} per-row losses or a 0-d mean" if len(expected) == 1 else str(expected)
    raise ValueError(f"returned shape {got}, expected {wanted}")


def _run_numpy(
    impl: Implementation,
    block: np.ndarray,
    targets: np.ndarray,
    settings: dict[str, Any],
    options: dict[str, Any] | None = None,
    shape: tuple[int, ...] | None = None,
) -> _Outcome:
    shape = (block.shape[0],) if shape is None else shape
    logits, target_copy = block.copy(), targets.copy()
    # overflow in an audited implementation is a finding, not a warning (nor is the mean of nothing)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        losses = impl(logits, target_copy, settings, options)
    if isinstance(losses, np.generic):  # a NumPy scalar, e.g. from np.mean
        losses = np.asarray(losses)
    if not isinstance(losses, np.ndarray):
        raise TypeError(f"returned {_type_name(losses)}, expected a numpy.ndarray")
    if not impl.builtin and losses.dtype != block.dtype:
        raise TypeError(f"returned {losses.dtype}, expected {block.dtype} (the audited dtype)")
    mean = _check_shape(losses.shape, shape)
    wrote = logits.shape != block.shape or not np.array_equal(_raw_bytes(logits), _raw_bytes(block))
    wrote = wrote or not np.array_equal(_raw_bytes(target_copy), _raw_bytes(targets))
    return _Outcome(losses.astype(np.float64), None, None, wrote, mean)


def _call(
    cell: _Cell,
    runner: _TorchRunner | None,
    block: np.ndarray,
    targets: np.ndarray,
    fmt: FloatFormat,
    settings: dict[str, Any],
    grad: bool,
    call_options: dict[str, Any],
    weight: np.ndarray | None,
    shape: tuple[int, ...],
) -> _Outcome | None:
    """Run one implementation on one block; a failure marks the cell `error` and returns None."""
    try:
        if cell.impl.backend == "torch":
            assert runner is not None
            outcome = runner.run(
                cell.impl, block, targets, fmt, cell.device, settings, grad, call_options, weight, shape
            )
        else:
            outcome = _run_numpy(cell.impl, block, targets, settings, call_options, shape)
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
    reference: Any,
    reference_loss: np.ndarray,
    reference_grad: np.ndarray | None,
    fmt: FloatFormat,
    tolerance: Tolerance,
) -> Any:
    """Add one result to the cell's tallies; returns the per-row errors."""
    work = reference_loss.dtype
    value = value.reshape(-1)
    errors = cell.loss.add(value.astype(work), reference_loss, fmt, tolerance)
    cell.notes = reference.note or cell.notes
    finite_values = value[np.isfinite(value)]
    if finite_values.size:
        cell.max_value = max(cell.max_value, float(finite_values.max()))
    if outcome.grad_error:
        cell.grad_status, cell.error = "error", outcome.grad_error
    elif outcome.grad is not None and reference_grad is not None and cell.grad_status is None:
        gradient = outcome.grad.astype(work)
        cell.grad.add(gradient, reference_grad, tolerance)
        rowsum = reference.rowsum
        if reference_grad is not reference.grad and rowsum is not None:
            rowsum = rowsum / max(reference.loss.shape[0], 1)
        cell.checks.add(gradient, reference_grad, reference.true_index, rowsum, tolerance)
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
    _score(cell, outcome, outcome.value, reference, np.asarray(mean).reshape(1), mean_grad, fmt, tolerance)


def _expected_shape(options: LossOptions, block: np.ndarray) -> tuple[int, ...]:
    """What an implementation returns: a scalar for mean/sum, else per row (binary: per element)."""
    if options.reduction != "none":
        return ()
    return tuple(block.shape) if options.family == "binary" else (block.shape[0],)


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
    options: LossOptions | None = None,
    weight: np.ndarray | None = None,
    whole_batch: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[list[SummaryRow], list[RowRecord]]:
    """Audit every implementation on every device over the row blocks of one (case, dtype).

    ``blocks`` yields (first row, quantized logits, targets): class indices, or probabilities / binary
    targets (N, V) in the audited dtype. The reference is computed once per block and shared by every
    cell. With a reduction other than none, ``blocks`` must yield the whole batch as one block.
    ``weight``: per-class weights in the audited dtype. An implementation that returns a 0-d mean
    where per-row losses are asked for must see the whole batch: when the batch spans several
    blocks it is called once more on ``whole_batch()``.
    """
    options = options or label.options
    cells = [_Cell(impl, device) for impl in impls for device in devices]
    for cell in cells:
        reason = _skip_reason(cell.impl, fmt, cell.device) or skip_reason(
            cell.impl.name, cell.impl.family, cell.impl.supports, options
        )
        if reason:
            cell.status, cell.error = "skipped", reason
    call_options = options.call_options()
    runner = _TorchRunner() if any(c.impl.backend == "torch" and c.status is None for c in cells) else None
    records: list[RowRecord] = []
    max_logit, max_reference = float("-inf"), float("-inf")
    step = 1.0 / (max(n_blocks, 1) * max(len(cells), 1))  # progress: one unit per (case, dtype)

    for first_row, block, targets in blocks:
        if block.size:
            with np.errstate(invalid="ignore"):
                max_logit = max(max_logit, float(np.nanmax(block)))  # in the block's dtype: no copy
        reference = reference_loss(block, targets, options, weight=weight, grad=grad)
        shape = _expected_shape(options, block)
        finite_reference = reference.loss[np.isfinite(reference.loss)]
        if finite_reference.size:
            max_reference = max(max_reference, float(finite_reference.max()))
        whole = first_row == 0 and block.shape[0] == label.batch
        for cell in cells:
            outcome = None
            if cell.status is None and not cell.deferred:
                outcome = _call(
                    cell, runner, block, targets, fmt, settings, grad, call_options, weight, shape
                )
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
            value = outcome.value.reshape(-1)
            errors = _score(cell, outcome, value, reference, reference.loss, reference.grad, fmt, tolerance)
            if keep_rows:
                reduced = options.reduction != "none"
                records.extend(
                    RowRecord(
                        cell.impl.name,
                        fmt.name,
                        cell.device,
                        -1 if reduced else first_row + i,
                        -1 if reduced or targets.ndim != 1 else int(targets[i]),
                        float(reference.loss[i]),
                        float(value[i]),
                        float(errors.abs_err[i]),
                        float(errors.rel_err[i]),
                        float(errors.ulp_err[i]),
                    )
                    for i in range(value.shape[0])
                )
    deferred = [cell for cell in cells if cell.deferred and cell.status is None]
    if deferred:
        _audit_whole_batch(deferred, runner, whole_batch, fmt, settings, tolerance, grad, options, weight)
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
    options: LossOptions,
    weight: np.ndarray | None,
) -> None:
    """Mean-valued implementations of a batch that spans several blocks: one call on every row at once."""
    if whole_batch is None:
        for cell in cells:
            cell.status, cell.error = "error", "returned a mean, but the batch was split into blocks"
        return
    block, targets = whole_batch()
    reference = reference_loss(block, targets, options, weight=weight, grad=grad)
    shape = _expected_shape(options, block)
    for cell in cells:
        outcome = _call(
            cell, runner, block, targets, fmt, settings, grad, options.call_options(), weight, shape
        )
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
            if grad_status == "ok" and cell.checks.rowsum_failures:
                grad_status = "inaccurate"
    measured = cell.status is None
    mean = measured and cell.value_kind == "mean"
    options = label.options
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
        grad_true_max_rel_err=cell.checks.true_max_rel_err,
        grad_rowsum_max=cell.checks.rowsum_max if cell.checks.rowsum_checked else float("nan"),
        loss=options.loss,
        reduction=options.reduction,
        weights=options.weights,
        ignore_fraction=options.ignore_fraction,
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        targets=options.targets,
        softcap=options.softcap,
        z_loss=options.z_loss,
        mask_fraction=options.mask_fraction,
        margin=label.margin,
        target_position=label.target_position,
        focal_gamma=options.focal_gamma,
        focal_alpha=options.focal_alpha,
        notes=cell.notes if measured else "",
        value_kind=(cell.value_kind or "") if measured else "",
        wrote_input=cell.wrote_input,
    )


def _block_ranges(
    case: Case, fmt: FloatFormat, budget_bytes: int, options: LossOptions = PLAIN
) -> list[tuple[int, int]]:
    """Row blocks; a reduction is computed by the implementation over the whole batch, in one block."""
    if options.reduction != "none":
        return [(0, case.batch)]
    return list(row_blocks(case, working_dtype(fmt).itemsize, budget_bytes))


def _case_blocks(
    case: Case, fmt: FloatFormat, budget_bytes: int, options: LossOptions = PLAIN
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start, stop in _block_ranges(case, fmt, budget_bytes, options):
        logits, targets = generate_inputs(case, options, start, stop)
        if targets.dtype.kind == "f":
            targets = quantize(targets, fmt)
        yield start, quantize(logits, fmt), targets


def _whole_batch(case: Case, fmt: FloatFormat, options: LossOptions) -> tuple[np.ndarray, np.ndarray]:
    """The whole batch as one block (for an implementation that returns a mean)."""
    (_, logits, targets), *_ = _case_blocks(case, fmt, 1 << 62, options)
    return logits, targets


def _overflow_reason(case: Case, fmt: FloatFormat, options: LossOptions = PLAIN) -> str | None:
    """Why a case cannot be represented in the dtype (its logits pass the largest finite value)."""
    for start, stop in row_blocks(case, 8, 64 << 20):
        logits, _ = generate_inputs(case, options, start, stop)
        finite = np.isfinite(logits)
        if logits.size and np.isinf(quantize(logits[finite], fmt)).any():
            peak = float(np.abs(logits[finite]).max())
            return f"logits reach {peak:.4g}, beyond {fmt.name}'s largest finite value {fmt.max:.6g}"
    return None


def _overflows(case: Case, fmt: FloatFormat, options: LossOptions = PLAIN) -> str | None:
    # Cheap bound first: |offset| + |scale| · (largest |base| a distribution can draw, with margin) + |M|.
    bound = abs(case.offset) + abs(case.scale) * 16.0 + abs(case.margin or 0.0)
    if bound < fmt.max / 2:
        return None
    return _overflow_reason(case, fmt, options)


def _skipped_rows(
    impls: list[Implementation], devices: list[str], fmt: FloatFormat, label: CaseLabel, reason: str
) -> list[SummaryRow]:
    rows = []
    for impl in impls:
        for device in devices:
            cell = _Cell(impl, device, status="skipped", error=reason)
            rows.append(_summary_row(cell, fmt, label, False, float("nan"), float("nan")))
    return rows


def _too_big(case: Case, fmt: FloatFormat, options: LossOptions, budget: int) -> str | None:
    if options.reduction == "none" or case.batch * case.vocab * working_dtype(fmt).itemsize <= 4 * budget:
        return None
    return (
        f"a {options.reduction} is computed in one call over the whole batch; "
        f"{case.batch} × {case.vocab} passes 4 × block_mib of working memory"
    )


def _audit_case(
    case: Case,
    options: LossOptions,
    label: CaseLabel,
    formats: list[FloatFormat],
    impls: list[Implementation],
    devices: list[str],
    config: SweepConfig,
    settings: dict[str, Any],
    budget: int,
    progress: Progress | None,
) -> list[SummaryRow]:
    """Every dtype of one (case, options): skipped rows where the loss or the inputs are not defined."""
    rows: list[SummaryRow] = []
    if not impls:
        if progress:
            progress(float(len(formats)))
        return rows
    invalid = options.invalid_reason()
    weight = None if invalid else class_weights(case, options)
    for fmt in formats:
        reason = invalid or _too_big(case, fmt, options, budget) or _overflows(case, fmt, options)
        if reason:
            rows += _skipped_rows(impls, devices, fmt, label, reason)
            if progress:
                progress(1.0)
            continue
        cell_rows, _ = audit_blocks(
            _case_blocks(case, fmt, budget, options),
            fmt,
            label,
            impls,
            devices,
            settings=settings,
            tolerance=config.tolerances[fmt.name],
            grad=config.grad,
            n_blocks=len(_block_ranges(case, fmt, budget, options)),
            progress=progress,
            options=options,
            weight=None if weight is None else quantize(weight, fmt),
            whole_batch=functools.partial(_whole_batch, case, fmt, options),
        )
        rows += cell_rows
    return rows


def _run_grid(config: SweepConfig, progress: Progress | None) -> tuple[list[SummaryRow], list[str]]:
    impls = prepare(config.impls, config.plugins)
    devices = resolve_devices(config.devices, accelerators_wanted=any(i.backend == "torch" for i in impls))
    cases = build_cases(
        config.distributions, config.scales, config.offsets, config.vocabs, config.batches, config.seed
    )
    formats = [float_format(name) for name in config.dtypes]
    settings = config.implementation_settings()
    budget = config.block_mib << 20
    rows: list[SummaryRow] = []
    option_grid = config.loss_options()
    for base_case in cases:
        for margin, position in itertools.product(config.margins, config.target_positions):
            case = replace(base_case, margin=margin, target_position=position)
            for options in option_grid:
                family_impls = impls if config.impls else [i for i in impls if i.family == options.family]
                label = CaseLabel(
                    case.distribution, case.scale, case.offset, case.batch, case.vocab, case.seed,
                    options, margin, position,
                )  # fmt: skip
                rows += _audit_case(
                    case, options, label, formats, family_impls, devices, config, settings, budget, progress
                )
    return rows, devices


def run_sweep(config: SweepConfig, progress: Progress | None = None) -> AuditResult:
    """Run the whole grid of ``config`` (each of its [[grids]] in turn); one summary row per cell."""
    started = time.time()
    clock = time.perf_counter()
    rows: list[SummaryRow] = []
    devices: list[str] = []
    for grid in config.expanded():
        grid_rows, grid_devices = _run_grid(grid, progress)
        rows += grid_rows
        devices += [device for device in grid_devices if device not in devices]
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
    return sum(
        len(grid.distributions)
        * len(grid.scales)
        * len(grid.offsets)
        * len(grid.vocabs)
        * len(grid.batches)
        * len(grid.dtypes)
        * len(grid.margins)
        * len(grid.target_positions)
        * len(grid.loss_options())
        for grid in config.expanded()
    )

"""The result records: one ``Cell`` per implementation × dtype × device × case and one ``RowResult`` per
input row of a replay (``ce_audit.audit_result.AuditResult`` holds them with what produced them).

Every field of a ``Cell`` is marked in its metadata as part of the cell's **key** (what was audited) or
as a **measurement** (what was found). The summary.csv column order, the gate's cell key and compared
metrics, and the budget metric names are all derived from these marks, so a new metric is one field:

    my_metric: float = measurement(budget="loss", gate="growth")

``budget`` groups a metric for ``IMPL:DTYPE:METRIC<=VALUE`` budgets (loss, grad, count, status: how an
unmeasured or non-finite cell reads); ``gate`` says how the regression gate compares it (status: may not
get worse; count: may not grow; growth: may not grow past the ULP and relative allowances; kind: may not
change; None: informative only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ce_audit.options import INPUT_COLUMNS, LOSS_OPTION_SPECS, OPTION_COLUMNS, SPECS_BY_NAME, LossOptions

KEY = "key"
MEASUREMENT = "measurement"


def key(default: Any = None, *, has_default: bool = False) -> Any:
    """A field that identifies the cell (impl, dtype, device, a case dimension or a loss option)."""
    meta = {"role": KEY}
    return field(default=default, metadata=meta) if has_default else field(metadata=meta)


def measurement(
    default: Any = None, *, budget: str | None = None, gate: str | None = None, unit: str = "", what: str = ""
) -> Any:
    """A field that holds what the audit found (see the module docstring for ``budget`` and ``gate``);
    ``what`` names a count in words ("NaN rows") for messages."""
    meta = {"role": MEASUREMENT, "budget": budget, "gate": gate, "unit": unit, "what": what}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Cell:
    """One audited cell: implementation × dtype × device × case (one line of summary.csv, in order)."""

    impl: str = key()
    dtype: str = key()
    device: str = key()
    distribution: str = key()
    scale: float = key()
    offset: float = key()
    batch: int = key()
    vocab: int = key()
    seed: int = key()
    status: str = measurement("", budget="status", gate="status")
    rows: int = measurement(0)
    nan_rows: int = measurement(0, budget="count", gate="count", what="NaN rows")
    inf_rows: int = measurement(0, budget="count", gate="count", what="Inf rows")
    max_abs_err: float = measurement(0.0, budget="loss")
    max_rel_err: float = measurement(0.0, budget="loss")
    max_ulp: float = measurement(0.0, budget="loss", gate="growth", unit="ulp")
    mean_bits: float = measurement(0.0, budget="loss")
    grad_status: str = measurement("", budget="status", gate="status")
    grad_nan: int = measurement(0, budget="count", gate="count", what="NaN gradient rows")
    grad_inf: int = measurement(0, budget="count", gate="count", what="Inf gradient rows")
    grad_max_abs_err: float = measurement(0.0, budget="grad")
    grad_max_rel_err: float = measurement(0.0, budget="grad", gate="growth", unit="eps")
    error: str = measurement("")
    max_logit: float = measurement(float("nan"))
    max_reference: float = measurement(float("nan"))
    max_value: float = measurement(float("nan"))
    grad_true_max_rel_err: float = measurement(0.0, budget="grad")
    grad_rowsum_max: float = measurement(0.0, budget="grad")
    # the loss options, and the input dimensions among their columns (ce_audit.options.OPTION_COLUMNS)
    options: LossOptions = key(LossOptions(), has_default=True)
    margin: float | None = key(SPECS_BY_NAME["margin"].default, has_default=True)
    target_position: str = key(SPECS_BY_NAME["target_position"].default, has_default=True)
    hidden_size: int = key(SPECS_BY_NAME["hidden_size"].default, has_default=True)
    classifier_scale: float = key(SPECS_BY_NAME["classifier_scale"].default, has_default=True)
    notes: str = measurement("")
    value_kind: str = measurement(
        "", gate="kind"
    )  # "rows" per-row losses; "mean" a 0-d mean; "" not measured
    # the floating dtype the implementation returned ("" not measured); the gate holds it like value_kind
    value_dtype: str = measurement("", gate="kind")
    wrote_input: bool = measurement(False)  # the implementation changed its logits or targets buffer
    # the verdict beside the absolute one (see docs/verdicts.md)
    finite_where_infinite: int = measurement(
        0, budget="count", gate="count", what="finite values where the exact loss is ±inf"
    )
    convention: str = measurement("")  # a finite value where PyTorch's convention is NaN: not a failure
    lower_precision: str = measurement("")  # the narrower format the loss was computed in, if any
    capped_at: float = measurement(float("nan"))  # the constant the loss is clipped at, if it is
    # the input row worst against PyTorch's (the largest ratio among the worse rows), else the row with the
    # largest loss_err (-1: a reduced value)
    worst_row: int = measurement(-1)
    # the loss error in ULPs of value_dtype where it is wider than the audited dtype (NaN otherwise)
    max_ulp_returned: float = measurement(float("nan"), budget="loss")
    grad_max_ulp: float = measurement(0.0, budget="grad")  # elementwise, ULPs of the gradient's dtype
    grad_norm_rel_err: float = measurement(0.0, budget="grad")  # max over rows of ‖g − g*‖₂ / ‖g*‖₂
    best_max_ulp: float = measurement(float("nan"))  # the exact loss rounded once: the dtype's floor
    best_grad_norm_rel_err: float = measurement(float("nan"))  # the exact gradient rounded once
    pytorch_max_ulp: float = measurement(float("nan"))  # PyTorch's kernel on the same inputs and options
    pytorch_grad_norm_rel_err: float = measurement(float("nan"))
    # row by row (ce_audit.row_verdict): the largest loss_err / max(PyTorch's on the same row, ½) over
    # the rows worse than PyTorch's, or over every row when none is
    loss_vs_pytorch: float = measurement(float("nan"))
    grad_vs_pytorch: float = measurement(float("nan"))  # the same for the gradient's row errors
    flag: str = measurement("")  # floor, pytorch (no worse than PyTorch) or worse (than PyTorch); "" ok
    worse_rows: int = measurement(0, budget="count", gate="count", what="rows worse than PyTorch's")
    # rows within the tolerance only by its absolute part: |v − ℓ| > rtol·|ℓ| (tiny losses, where the
    # absolute tolerance decides)
    atol_rows: int = measurement(0)
    # max over rows of |v − ℓ| / (ε · max(|ℓ|, 1)), ε = 2^(1−p) of the dtype: the loss error that ranks
    loss_err: float = measurement(0.0, budget="loss")
    # max over rows of ‖g − g*‖₂ / (ε · max(‖g*‖₂, u)), u = 1 (1/n for a mean over n rows)
    grad_err: float = measurement(float("nan"), budget="grad")
    device_name: str = measurement("")  # what the device is where the cell ran: the CPU model, the GPU's name
    # the seconds the implementation's calls took, where its backend records them (the Triton backend; NaN
    # elsewhere, so that summary.csv stays the same from one run to the next)
    seconds: float = measurement(float("nan"))
    # observed causes of a flagged cell (ce_audit.trace): "<op> <file>:<line>" where a non-finite value was
    # born and where the error entered ("" untraced or none), and what the trace saw, in words
    nonfinite_origin: str = measurement("")
    error_origin: str = measurement("")
    traced_cause: str = measurement("")


@dataclass(frozen=True)
class RowResult:
    """One input row of one implementation (a line of rows.csv): its value against the exact loss."""

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


def _flat(names: tuple[str, ...]) -> tuple[str, ...]:
    """Field names as columns: ``options`` becomes the option columns (input dimensions among them)."""
    columns: list[str] = []
    for name in names:
        if name == "options":
            columns += OPTION_COLUMNS
        elif name not in INPUT_COLUMNS:
            columns.append(name)
    return tuple(columns)


CELL_COLUMNS: tuple[str, ...] = _flat(tuple(f.name for f in fields(Cell)))
KEY_COLUMNS: tuple[str, ...] = _flat(tuple(f.name for f in fields(Cell) if f.metadata["role"] == KEY))
MEASUREMENT_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in fields(Cell) if f.metadata["role"] == MEASUREMENT
)
ROW_RESULT_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RowResult))
_OPTION_FIELDS = frozenset(spec.name for spec in LOSS_OPTION_SPECS)


def column_value(cell: Cell, column: str) -> Any:
    """One summary.csv column of a cell (a loss option is read from ``cell.options``)."""
    return getattr(cell.options if column in _OPTION_FIELDS else cell, column)


def cell_columns(cell: Cell) -> dict[str, Any]:
    """The cell as summary.csv's columns, in order: the one place ``options`` is flattened."""
    return {column: column_value(cell, column) for column in CELL_COLUMNS}


def cell_from_columns(values: Mapping[str, Any]) -> Cell:
    """A cell from its columns (``cell_columns``' inverse; a missing option column takes its default)."""
    options = {name: values[name] for name in _OPTION_FIELDS if name in values}
    rest = {name: value for name, value in values.items() if name not in _OPTION_FIELDS}
    return Cell(**rest, options=LossOptions(**options))


def measurements(*, budget: str | None = None, gate: str | None = None) -> tuple[str, ...]:
    """Names of the measurement fields in a budget group and/or compared by the gate in a given way."""
    chosen = []
    for f in fields(Cell):
        meta = f.metadata
        if meta["role"] != MEASUREMENT:
            continue
        if budget is not None and meta["budget"] != budget:
            continue
        if gate is not None and meta["gate"] != gate:
            continue
        chosen.append(f.name)
    return tuple(chosen)


def what_of(column: str) -> str:
    """A count measurement in words, for messages ("NaN rows")."""
    return {f.name: f.metadata.get("what", "") for f in fields(Cell)}[column] or column


def unit_of(column: str) -> str:
    """The unit a growth-compared measurement is allowed to grow in: ``ulp`` or ``eps`` (machine epsilon)."""
    return {f.name: f.metadata.get("unit", "") for f in fields(Cell)}[column]


SIGNIFICANT_DIGITS = 4
# Values of the audited dtype (the largest logit, reference and value, the constant a loss is capped at)
# keep every digit: they are exact inputs or outputs, not errors.
EXACT_VALUES = ("max_logit", "max_reference", "max_value", "capped_at")
_ERROR_FIELDS = tuple(
    f.name
    for f in fields(Cell)
    if f.metadata["role"] == MEASUREMENT and f.type == "float" and f.name not in EXACT_VALUES
)


def significant(value: float) -> float:
    """An error measurement to ``SIGNIFICANT_DIGITS`` significant digits (inf and nan as they are): what
    matters, and what stays the same from one machine to the next."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else value


def with_significant_digits(cell: Cell) -> Cell:
    """The cell with every float error measurement kept to ``SIGNIFICANT_DIGITS`` digits, as summary.csv
    holds it (``AuditResult.summary_cells``; applying it again changes nothing: the cell itself).
    ``dataclasses.replace`` made the same cell (Cell has no ``__post_init__``) at four times the cost."""
    changed = {}
    for name in _ERROR_FIELDS:
        value = getattr(cell, name)
        kept = significant(value)
        if kept is not value and kept != value:
            changed[name] = kept
    if not changed:
        return cell
    rounded = object.__new__(Cell)
    rounded.__dict__.update(cell.__dict__)
    rounded.__dict__.update(changed)
    return rounded


# id(cell) → (cell, its rounded cell), for the cells of the last list ``rounded_cells`` was given
_LAST_ROUNDED: dict[int, tuple[Cell, Cell]] = {}


def rounded_cells(cells: list[Cell]) -> list[Cell]:
    """``with_significant_digits`` of each cell; a cell the previous call was given (the same object) is
    not rounded again and gives the same rounded object: the figures sent ahead of the traces and the
    summary written after them share every cell the traces left as it was. (The last list's cells are kept
    until the next call: an id is never reused while it is looked up.)"""
    global _LAST_ROUNDED
    earlier, kept, out = _LAST_ROUNDED, {}, []
    for cell in cells:
        pair = earlier.get(id(cell))
        rounded = pair[1] if pair is not None and pair[0] is cell else with_significant_digits(cell)
        kept[id(cell)] = (cell, rounded)
        out.append(rounded)
    _LAST_ROUNDED = kept
    return out

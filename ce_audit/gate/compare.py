"""The comparison: a current audit's typed cells against a baseline's, cell by cell, and budgets.

A cell is identified by its key fields (impl, dtype, device and the case columns; see ce_audit.results)
and by any column of the summary.csv this version does not know, so case columns a later version adds
join the key by themselves. Every failure is collected, then the caller exits once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ce_audit.budgets import Budget
from ce_audit.errors import AuditError
from ce_audit.gate.checks import PRESENT, Check, default_checks, gradient_measured, measured
from ce_audit.reports.csv import column_text
from ce_audit.results import (
    CELL_COLUMNS,
    KEY_COLUMNS,
    MEASUREMENT_COLUMNS,
    Cell,
    column_value,
    measurements,
)
from ce_audit.statuses import GRAD_NOT_AVAILABLE, GRAD_OFF, Status

Key = tuple[Any, ...]
GATED = frozenset(m for kind in ("status", "count", "growth", "kind") for m in measurements(gate=kind))


@dataclass(frozen=True)
class Audit:
    """One side of the comparison: typed cells, the columns its summary.csv had, the report.json beside it,
    and per cell the text of any columns this version does not know (a later version's)."""

    header: tuple[str, ...]
    cells: list[Cell]
    source: str
    report: dict[str, Any] | None = None
    unknown: Sequence[Mapping[str, str]] = ()

    @property
    def missing(self) -> frozenset[str]:
        """Measurement columns its summary.csv lacks (an older version's): checks on them are skipped."""
        return frozenset(MEASUREMENT_COLUMNS) - set(self.header)

    def keyed(self, columns: Sequence[str]) -> list[tuple[Key, Cell]]:
        """Each cell with its key: the values of ``columns``, a column Cell has no field for read as text."""
        keyed = []
        for i, cell in enumerate(self.cells):
            extra = self.unknown[i] if i < len(self.unknown) else {}
            key = tuple(column_value(cell, c) if c in CELL_COLUMNS else extra.get(c, "") for c in columns)
            keyed.append((key, cell))
        return keyed


@dataclass(frozen=True)
class Failure:
    """One failed check: where, which metric, baseline → current, and why."""

    cell: str
    metric: str
    baseline: str
    current: str
    message: str


@dataclass(frozen=True)
class CellOutcome:
    """The verdict of one cell (one JUnit test case)."""

    key: Key
    impl: str
    dtype: str
    label: str  # short: impl, dtype and the key columns that vary
    name: str  # full: every key column but impl and dtype
    state: str  # "compared", "new" or "missing"
    failures: tuple[Failure, ...]
    skipped: str = ""  # why the cell was not measured, if it was not


@dataclass(frozen=True)
class GateResult:
    """Every cell's verdict, every failure (cells first, then budgets that match nothing), and notes."""

    cells: list[CellOutcome]
    failures: list[Failure]
    new: list[str]
    missing: list[str]
    budgets: list[str]
    notes: list[str]
    baseline_source: str | None
    current_source: str
    key_columns: tuple[str, ...] = field(default=())
    compared: int = 0  # cells measured on both sides: what the checks actually compared

    @property
    def passed(self) -> bool:
        return not self.failures


def key_columns(header: Sequence[str]) -> tuple[str, ...]:
    """The identity of a cell: every key field of Cell (a column the header lacks reads as its default),
    then every column of the header that Cell has no field for (a case column of a later version)."""
    return KEY_COLUMNS + tuple(column for column in header if column not in CELL_COLUMNS)


def shown(value: Any) -> str:
    """A value as a failure or label shows it: numbers as %.4g (10.0 → 10, 10000.0 → 1e+04), None as ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    return str(value)


def _metric_shown(cell: Cell | None, metric: str) -> str:
    if cell is None:
        return "—"
    if metric == PRESENT:
        return "present"
    return shown(getattr(cell, metric, None)) or "—"


def index_cells(audit: Audit, columns: tuple[str, ...], what: str) -> dict[Key, Cell]:
    """The audit's cells by key; two cells with one key raise AuditError."""
    index: dict[Key, Cell] = {}
    for key, cell in audit.keyed(columns):
        if key in index:
            values = ", ".join(f"{c}={column_text(v)}" for c, v in zip(columns, key, strict=True))
            raise AuditError(f"{what} {audit.source} has two rows for the cell {values}")
        index[key] = cell
    return index


def labels(keys: list[Key], columns: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Short labels (impl, dtype and the key columns that vary) and full names (every other key column)."""
    varying = {column for i, column in enumerate(columns) if len({key[i] for key in keys}) > 1}
    short, full = [], []
    for key in keys:
        values = dict(zip(columns, key, strict=True))
        head = [shown(values[c]) for c in ("impl", "dtype") if c in values]
        rest = [(c, v) for c, v in values.items() if c not in ("impl", "dtype")]
        short.append(" ".join([*head, *(f"{c}={shown(v)}" for c, v in rest if c in varying)]))
        full.append(" ".join(f"{c}={shown(v)}" for c, v in rest))
    return short, full


def _matched_columns(baseline: Audit | None, current: Audit) -> tuple[tuple[str, ...], list[str]]:
    """The key columns both audits are matched on, and notes on the columns they do not share."""
    columns = key_columns(current.header)
    if baseline is None:
        return columns, []
    notes = []
    defaulted = sorted(c for c in KEY_COLUMNS if (c in baseline.header) != (c in current.header))
    if defaulted:
        notes.append(
            f"case columns differ ({', '.join(defaulted)}): where absent they read as their defaults"
        )
    base_columns = key_columns(baseline.header)
    if set(base_columns) != set(columns):
        differ = sorted(set(base_columns) ^ set(columns))
        notes.append(f"case columns differ ({', '.join(differ)}): cells are matched on the common ones")
        columns = tuple(c for c in columns if c in base_columns)
    return columns, notes


def _budget_failure(
    budget: Budget, label: str, current: Cell | None, recorded: bool, message: str
) -> Failure:
    """A broken budget as a failure: the limit on the baseline side, the current value (— if unrecorded)."""
    limit = budget.limit if isinstance(budget.limit, str) else f"{budget.limit:g}"
    value = _metric_shown(current, budget.metric) if recorded else "—"
    return Failure(label, budget.metric, f"budget {budget.op} {limit}", value, message)


def _gated_columns() -> tuple[str, ...]:
    return tuple(m for m in MEASUREMENT_COLUMNS if m in GATED)


def _refuse_unusable_baseline(baseline: Audit, current: Audit) -> None:
    """Fail closed: a compared column the baseline lacks while the current audit has it is bad input."""
    lacking = [c for c in _gated_columns() if c in baseline.missing and c not in current.missing]
    if lacking:
        raise AuditError(
            f"baseline {baseline.source} has no column {lacking[0]!r}, which the gate compares; "
            "rewrite it with --update"
        )


# The words a status column may hold, and the compared numbers that are never negative (counts, errors).
STATUS_WORDS: dict[str, tuple[str, ...]] = {
    "status": tuple(Status),
    "grad_status": (*Status, GRAD_OFF, GRAD_NOT_AVAILABLE),
}
NEVER_NEGATIVE = tuple(
    m for m in MEASUREMENT_COLUMNS if m in measurements(gate="count") + measurements(gate="growth")
)


def refuse_malformed(audit: Audit, label: str, cell: Cell, what: str) -> None:
    """Fail closed: a status or grad_status that is none of the known words, or a negative count or
    error in a compared column, is bad input naming the file, the cell and the column (never a pass)."""
    for column, words in STATUS_WORDS.items():
        value = getattr(cell, column)
        if column not in audit.missing and value not in words:
            raise AuditError(
                f"{what} {audit.source}: column {column!r} holds {value!r} for {label}, "
                f"not one of {', '.join(words)}"
            )
    for column in NEVER_NEGATIVE:
        value = getattr(cell, column)
        if column not in audit.missing and value < 0:
            raise AuditError(
                f"{what} {audit.source}: column {column!r} holds {shown(value)} for {label}, "
                "a count or an error is never negative"
            )


def refuse_malformed_audit(audit: Audit, what: str) -> None:
    """``refuse_malformed`` on every cell of an audit read from a file: the gate checks its baseline so
    before any fresh run starts."""
    keyed = audit.keyed(key_columns(audit.header))
    short, _ = labels([key for key, _ in keyed], key_columns(audit.header))
    for label, (_, cell) in zip(short, keyed, strict=True):
        refuse_malformed(audit, label, cell, what)


def _same(before: float, now: float) -> bool:
    return before == now or (math.isnan(before) and math.isnan(now))


def _refuse_unbounded_baseline(
    baseline: Audit, label: str, before: Cell, now: Cell, checks: list[Check]
) -> None:
    """Fail closed: a compared measurement that is NaN or ±inf in the baseline bounds nothing (any growth
    would pass against inf), so where the current cell holds another value (both measured) it is bad
    input, never a silent pass. The same non-finite value on both sides is a cell the audit itself
    records so (an error with no finite measure in ULPs) and is compared as usual."""
    if not (measured(before) and measured(now)):
        return
    for check in checks:
        metric = check.metric
        if metric not in MEASUREMENT_COLUMNS or not isinstance(getattr(before, metric), float):
            continue
        if getattr(check, "relative", False) and not (gradient_measured(before) and gradient_measured(now)):
            continue
        value_before, value_now = getattr(before, metric), getattr(now, metric)
        if math.isfinite(value_before) or _same(value_before, value_now):
            continue
        held = "NaN" if math.isnan(value_before) else shown(value_before)
        raise AuditError(
            f"baseline {baseline.source}: column {metric!r} is {held} for {label}, where the current audit "
            f"has {shown(value_now)}; a non-finite baseline bounds nothing: rewrite it with --update"
        )


def compare(
    baseline: Audit | None,
    current: Audit,
    *,
    checks: list[Check] | None = None,
    budgets: Sequence[Budget] = (),
    strict: bool = False,
) -> GateResult:
    """Run every check on every cell and every budget on every current cell; collect all failures.

    A check on a measurement column that either summary.csv lacks is skipped.
    """
    checks = default_checks(strict=strict) if checks is None else checks
    columns, notes = _matched_columns(baseline, current)
    base_index = index_cells(baseline, columns, "baseline") if baseline is not None else {}
    current_index = index_cells(current, columns, "current audit")
    keys = list(base_index) + [key for key in current_index if key not in base_index]
    short, full = labels(keys, columns)
    unrecorded = current.missing | (baseline.missing if baseline is not None else frozenset())
    applied = [check for check in checks if check.metric not in unrecorded]
    if baseline is not None:
        _refuse_unusable_baseline(baseline, current)
    compared = 0

    cells: list[CellOutcome] = []
    failures: list[Failure] = []
    new, missing = [], []
    matched = {budget.text: False for budget in budgets}
    for key, label, name in zip(keys, short, full, strict=True):
        before, now = base_index.get(key), current_index.get(key)
        cell = now if now is not None else before
        assert cell is not None
        cell_failures = []
        if baseline is not None and before is not None:
            refuse_malformed(baseline, label, before, "baseline")
        if now is not None:
            refuse_malformed(current, label, now, "current audit")
        if baseline is not None and before is not None and now is not None:
            _refuse_unbounded_baseline(baseline, label, before, now, applied)
            compared += measured(before) and measured(now)
        if baseline is not None:
            for check in applied:
                message = check.fails(before, now)
                if message:
                    shown_now = "missing" if now is None else _metric_shown(now, check.metric)
                    shown_before = _metric_shown(before, check.metric)
                    cell_failures.append(Failure(label, check.metric, shown_before, shown_now, message))
        for budget in budgets:
            if now is not None and budget.matches(now):
                matched[budget.text] = matched[budget.text] or now.status != Status.SKIPPED
            message = budget.fails(before, now, current.missing)
            if message:
                recorded = budget.metric not in current.missing
                cell_failures.append(_budget_failure(budget, label, now, recorded, message))
        state = (
            "missing" if now is None else ("new" if before is None and baseline is not None else "compared")
        )
        if state == "new":
            new.append(label)
        elif state == "missing":
            missing.append(label)
        skipped = cell.error if cell.status == Status.SKIPPED else ""
        cells.append(
            CellOutcome(key, cell.impl, cell.dtype, label, name, state, tuple(cell_failures), skipped)
        )
        failures += cell_failures
    for budget in budgets:
        if not matched[budget.text]:
            failures.append(
                Failure("(no cell)", budget.metric, budget.text, "—", "budget matches no measured cell")
            )
    return GateResult(
        cells=cells,
        failures=failures,
        new=new,
        missing=missing,
        budgets=[budget.text for budget in budgets],
        notes=notes,
        baseline_source=baseline.source if baseline is not None else None,
        current_source=current.source,
        key_columns=columns,
        compared=compared,
    )

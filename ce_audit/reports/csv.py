"""summary.csv (one row per cell) and rows.csv (one row per input row, replay): floats as repr().

Booleans are written as ``true``/``false``, an option that is off (None) as an empty field. Error
measurements are rounded to ``SIGNIFICANT_DIGITS`` significant digits (what matters, and what stays the
same from one machine to the next, so a committed baseline diffs only where results change; values of the
dtype keep every digit); the gate rounds a fresh run's cells the same way before comparing, so its verdict
is the one on the written file. Reading a
summary back gives typed ``Cell``s: each column is parsed by its field's type (floats with float(), so
'inf' and 'nan' parse; text with its control characters shown as escapes, ce_audit.printable). A column
the file lacks (written by an older version) reads as the field's default; a column this version does not
know (written by a later one) is kept as text beside the cell.
"""

from __future__ import annotations

import csv
import io
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ce_audit.errors import AuditError
from ce_audit.options import LossOptions
from ce_audit.printable import plural, printable
from ce_audit.reports.files import write_atomically
from ce_audit.results import (
    CELL_COLUMNS,
    EXACT_VALUES,
    MEASUREMENT_COLUMNS,
    ROW_RESULT_COLUMNS,
    Cell,
    RowResult,
    cell_columns,
    cell_from_columns,
    with_significant_digits,
)

SUMMARY_COLUMNS = CELL_COLUMNS
ROW_COLUMNS = ROW_RESULT_COLUMNS
# Every summary.csv ever written has these: the cell fields without a default, and the status.
REQUIRED_COLUMNS: tuple[str, ...] = (
    *(f.name for f in fields(Cell) if f.default is MISSING and f.default_factory is MISSING),
    "status",
)


# Error measurements (≥ 0, or NaN where not measured): rounded to results.SIGNIFICANT_DIGITS, and checked
# when read back; values of the audited dtype (results.EXACT_VALUES) keep every digit.
ERROR_MEASUREMENTS = tuple(
    f.name
    for f in fields(Cell)
    if f.name in MEASUREMENT_COLUMNS and f.type == "float" and f.name not in EXACT_VALUES
)


def column_text(value: Any) -> str:
    """A value as summary.csv holds it: floats as repr(), booleans true/false, None as an empty field."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _csv_text(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([column_text(row[name]) for name in columns])  # the columns are scalars
    return buffer.getvalue()


def summary_text(rows: list[Cell], *, rounded: bool = False) -> str:
    """summary.csv's text: error measurements to ``results.SIGNIFICANT_DIGITS`` significant digits (as
    ``AuditResult.summary_cells`` has them already: ``rounded`` says so, and they are written as they are;
    any other cells are held to the file's format here)."""
    cells = rows if rounded else [with_significant_digits(cell) for cell in rows]
    return _csv_text(SUMMARY_COLUMNS, [cell_columns(cell) for cell in cells])


def write_summary_csv(rows: list[Cell], path: str | Path, *, rounded: bool = False) -> Path:
    return write_atomically(path, summary_text(rows, rounded=rounded))


def write_rows_csv(records: list[RowResult], path: str | Path) -> Path:
    rows = [{name: getattr(record, name) for name in ROW_COLUMNS} for record in records]
    return write_atomically(path, _csv_text(ROW_COLUMNS, rows))


@dataclass(frozen=True)
class SummaryFile:
    """A summary.csv read back: its header, one typed Cell per line, and per line the text of the
    columns this version does not know (a later version's), by column name."""

    header: tuple[str, ...]
    cells: list[Cell]
    unknown: list[dict[str, str]]


def _boolean(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(text)
    return text == "true"


def _parser(hint: Any) -> Callable[[str], Any]:
    """How a field of this type is read from its text: '' is None for an optional field."""
    if type(None) in typing.get_args(hint):
        (inner,) = (option for option in typing.get_args(hint) if option is not type(None))
        parse = _parser(inner)
        return lambda text: None if text == "" else parse(text)
    if hint is bool:
        return _boolean
    if hint is str:
        return printable  # text from a file: control characters shown as escapes, never printed raw
    if hint in (int, float):
        return typing.cast(Callable[[str], Any], hint)
    raise TypeError(f"summary.csv cannot read a field of type {hint!r}")


_FIELD_TYPES = {**typing.get_type_hints(Cell), **typing.get_type_hints(LossOptions)}
PARSERS: dict[str, Callable[[str], Any]] = {name: _parser(_FIELD_TYPES[name]) for name in CELL_COLUMNS}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number"}


def _typed_cell(values: dict[str, str], where: str) -> tuple[Cell, dict[str, str]]:
    """The Cell of one line ({column: text}) and the text of the columns Cell has no field for."""
    known, unknown = {}, {}
    for column, text in values.items():
        if column not in PARSERS:
            unknown[column] = printable(text)
            continue
        try:
            known[column] = PARSERS[column](text)
            if isinstance(known[column], float) and math.isinf(known[column]) and "inf" not in text.lower():
                name = printable(" ".join(values.get(key, "") for key in ("impl", "dtype")))
                raise AuditError(f"{where}: column {column!r} holds {text!r} for {name}, past a double")
        except ValueError:
            hint = _FIELD_TYPES[column]
            kind = _TYPE_NAMES.get(hint, "a number or empty")
            raise AuditError(f"{where}: column {column!r} holds {text!r}, not {kind}") from None
    return cell_from_columns(known), unknown


def read_cells(path: str | Path, what: str = "summary") -> SummaryFile:
    """The typed cells of a summary.csv; a missing, unreadable or malformed file raises AuditError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuditError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise AuditError(f"cannot read {what} {path}: {getattr(error, 'strerror', None) or error}") from None
    try:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if not header:
            raise AuditError(f"{what} {path} is empty")
        missing = [column for column in REQUIRED_COLUMNS if column not in header]
        if missing:
            raise AuditError(f"{what} {path} is not a ce-audit summary.csv (no column {missing[0]!r})")
        cells, unknown = [], []
        for number, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(header):
                raise AuditError(
                    f"{what} {path}, line {number}: {plural(len(values), 'field')}, expected {len(header)}"
                )
            cell, extra = _typed_cell(dict(zip(header, values, strict=True)), f"{what} {path}, line {number}")
            cells.append(cell)
            unknown.append(extra)
    except csv.Error as error:
        raise AuditError(f"{what} {path} is not valid CSV: {error}") from None
    return SummaryFile(tuple(header), cells, unknown)


def checked_errors(summary: SummaryFile, path: str | Path, what: str = "summary") -> SummaryFile:
    """``summary`` if every error measurement is ≥ 0 or NaN (not measured); AuditError naming the first
    that is not (a summary.csv this version did not write: the figures take logarithms of them)."""
    for number, cell in enumerate(summary.cells, start=2):
        for name in ERROR_MEASUREMENTS:
            value = getattr(cell, name)
            if value < 0:
                raise AuditError(
                    f"{what} {path}, line {number}: column {name!r} holds {value!r}, not an error ≥ 0"
                )
    return summary

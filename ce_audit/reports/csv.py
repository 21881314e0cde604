"""summary.csv (one row per cell) and rows.csv (one row per input row, replay): floats as repr().

Booleans are written as ``true``/``false``. Reading a summary back gives its header and one
``{column: text}`` mapping per cell; numbers parse with float() ('inf' and 'nan' included).
"""

from __future__ import annotations

import csv
import io
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any

from ce_audit.engine import RowRecord, SummaryRow
from ce_audit.errors import AuditError
from ce_audit.reports.files import write_atomically

SUMMARY_COLUMNS = tuple(f.name for f in fields(SummaryRow))
ROW_COLUMNS = tuple(f.name for f in fields(RowRecord))
REQUIRED_COLUMNS = ("impl", "dtype", "status")


def _cell(value: Any) -> str:
    """Floats as repr(); None (an option that is off, e.g. margin) as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _csv_text(columns: tuple[str, ...], rows: list[Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(value) for value in astuple(row)])
    return buffer.getvalue()


def summary_records(rows: list[SummaryRow]) -> list[dict[str, str]]:
    """Summary rows as summary.csv would hold them: one {column: text} per cell."""
    return [dict(zip(SUMMARY_COLUMNS, (_cell(value) for value in astuple(row)), strict=True)) for row in rows]


def summary_text(rows: list[SummaryRow]) -> str:
    return _csv_text(SUMMARY_COLUMNS, rows)


def write_summary_csv(rows: list[SummaryRow], path: str | Path) -> Path:
    return write_atomically(path, summary_text(rows))


def write_rows_csv(records: list[RowRecord], path: str | Path) -> Path:
    return write_atomically(path, _csv_text(ROW_COLUMNS, records))


def read_summary_csv(path: str | Path, what: str = "summary") -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a summary.csv; a missing, unreadable or malformed file raises AuditError."""
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
        rows = []
        for number, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) != len(header):
                raise AuditError(
                    f"{what} {path}, line {number}: {len(values)} fields, expected {len(header)}"
                )
            rows.append(dict(zip(header, values, strict=True)))
    except csv.Error as error:
        raise AuditError(f"{what} {path} is not valid CSV: {error}") from None
    return header, rows

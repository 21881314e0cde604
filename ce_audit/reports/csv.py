"""summary.csv (one row per cell) and rows.csv (one row per input row, replay): floats as repr()."""

from __future__ import annotations

import csv
import io
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any

from ce_audit.engine import RowRecord, SummaryRow
from ce_audit.reports.files import write_atomically

SUMMARY_COLUMNS = tuple(f.name for f in fields(SummaryRow))
ROW_COLUMNS = tuple(f.name for f in fields(RowRecord))


def _cell(value: Any) -> str:
    """Floats as repr(); None (an option that is off, e.g. margin) as an empty cell."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _csv_text(columns: tuple[str, ...], rows: list[Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(value) for value in astuple(row)])
    return buffer.getvalue()


def write_summary_csv(rows: list[SummaryRow], path: str | Path) -> Path:
    return write_atomically(path, _csv_text(SUMMARY_COLUMNS, rows))


def write_rows_csv(records: list[RowRecord], path: str | Path) -> Path:
    return write_atomically(path, _csv_text(ROW_COLUMNS, records))

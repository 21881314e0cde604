"""The files of one audit: summary.csv, rows.csv (a replay's always, a sweep's when it kept rows) and
report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ce_audit.reports.csv import write_rows_csv, write_summary_csv
from ce_audit.reports.json import write_report_json
from ce_audit.results import AuditResult


def write_reports(
    result: AuditResult, out: str | Path, command: str, extra: dict[str, Any] | None = None
) -> list[str]:
    """Write the audit's report files into ``out``; their paths, in the order written."""
    out = Path(out)
    paths = [write_summary_csv(result.cells, out / "summary.csv")]
    if result.row_results or command == "replay":
        paths.append(write_rows_csv(result.row_results, out / "rows.csv"))
    paths.append(write_report_json(result, out / "report.json", command, extra))
    return [str(path) for path in paths]

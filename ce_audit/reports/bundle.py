"""The files of one audit: summary.csv, rows.csv (when there are per-row results), report.json, and
report.html with its plots/ (the paths returned name report.html, not each PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ce_audit.reports.csv import write_rows_csv, write_summary_csv
from ce_audit.reports.html import write_html_report
from ce_audit.reports.json import report_document, write_report_json
from ce_audit.results import AuditResult


def write_reports(
    result: AuditResult, out: str | Path, command: str, extra: dict[str, Any] | None = None
) -> list[str]:
    """Write the audit's report files into ``out``; their paths, in the order written."""
    out = Path(out)
    paths = [write_summary_csv(result.cells, out / "summary.csv")]
    if result.row_results:
        paths.append(write_rows_csv(result.row_results, out / "rows.csv"))
    paths.append(write_report_json(result, out / "report.json", command, extra))
    paths.append(write_html_report(result.cells, report_document(result, command, extra), out)[0])
    return [str(path) for path in paths]

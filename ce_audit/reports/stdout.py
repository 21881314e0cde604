"""What a command prints on stdout: the console it prints on, and a run's summary in ``--format``.

``table``: the terminal report (ce_audit.reports.table), or with ``quiet`` the paths written; ``json``:
the report.json document; ``csv``: summary.csv. JSON and CSV are alone on stdout (the paths written go
to stderr), so that ``ce-audit sweep --format json > summary.json`` holds the document only.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

from ce_audit.audit_result import AuditResult
from ce_audit.reports.csv import summary_text
from ce_audit.reports.json import stdout_document
from ce_audit.reports.table import print_report

OUTPUT_FORMATS = ("table", "json", "csv")


def terminal_console(width: int = 100) -> Console:
    """Rich on a terminal; plain text when stdout is a file or a pipe, ``$COLUMNS`` (else ``width``)
    columns wide. Rich leaves colour out under ``NO_COLOR``; the report's marks carry the status."""
    console = Console(highlight=False)
    if not console.is_terminal:
        columns = os.environ.get("COLUMNS", "")
        console = Console(highlight=False, width=int(columns) if columns.isdigit() else width, no_color=True)
    return console


def status_console(output_format: str) -> Console:
    """Where status lines go: the terminal report's console, or stderr when stdout holds JSON or CSV."""
    return terminal_console() if output_format == "table" else Console(stderr=True)


def print_summary(
    result: AuditResult,
    paths: list[str],
    command: str,
    extra: dict[str, Any] | None,
    output_format: str,
    quiet: bool = False,
    detail: bool = False,
) -> None:
    """The summary of a run on stdout in ``output_format`` (one of OUTPUT_FORMATS); ``paths``: the files
    written, ``command`` and ``extra`` as report.json records them, ``detail`` as `--detail`."""
    if output_format == "table":
        console = terminal_console()
        if quiet:
            for path in paths:
                console.print(path, markup=False, soft_wrap=True)
        else:
            print_report(result.cells, console, paths, result.seconds, detail=detail or None)
        return
    if output_format == "csv":
        sys.stdout.write(summary_text(result.cells))
    else:
        document = stdout_document(result, command, extra)
        sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()
    if not quiet:
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)

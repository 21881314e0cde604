"""``ce-audit report DIR``: report.html and plots/ redrawn from DIR/summary.csv (and DIR/report.json), in
place and under DIR's lock, as members of the set (report.json's digests follow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ce_audit.errors import AuditError
from ce_audit.reports import plots
from ce_audit.reports.bundle import ReportDirectory
from ce_audit.reports.csv import checked_errors, read_cells
from ce_audit.reports.html import EXTRA_HINT, HTML_NAME, PLOTS_DIR, html_files, plots_markdown
from ce_audit.verdict_story import verdict_markdown


def _has_figures(directory: Path) -> bool:
    """Whether the set in ``directory`` holds figures: a figure file under plots/, or one in report.html."""
    folder = directory / PLOTS_DIR
    if folder.is_dir() and not folder.is_symlink() and any(map(plots.is_figure_name, os.listdir(folder))):
        return True
    try:
        return b'src="data:image/png;base64,' in (directory / HTML_NAME).read_bytes()
    except OSError:
        return False


def rebuild_report(directory: str | Path) -> list[Path]:
    """Redraw DIR/report.html and DIR/plots/ from DIR/summary.csv (and DIR/report.json when present), in
    place and holding DIR's lock (as a run does: never beside a run writing a new set); report.json's
    digests follow. Without matplotlib a set that has figures is left as it was (AuditError): they would
    be lost. The paths written, report.html first."""
    directory = Path(directory)
    summary = directory / "summary.csv" if directory.suffix.lower() != ".csv" else directory
    if not summary.parent.is_dir():
        read_cells(summary)  # "summary … does not exist"
    with ReportDirectory(summary.parent, create=False) as target:
        cells = checked_errors(read_cells(summary), summary).cells
        report = summary.with_name("report.json")
        document = None
        if report.is_file():
            try:
                document = json.loads(report.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
                raise AuditError(f"cannot read {report}: {error}") from None
            if not isinstance(document, dict):
                raise AuditError(f"{report} is not a ce-audit report.json")
        if not plots.plotting_available() and _has_figures(summary.parent):
            raise AuditError(
                f"cannot redraw the figures in {summary.parent}: matplotlib is not installed ({EXTRA_HINT}); "
                f"{HTML_NAME} and {PLOTS_DIR}/ are left as they were"
            )
        return target.rewrite_members(html_files(cells, document), document)


def report_markdown(directory: str | Path, inline_images: bool = False) -> str:
    """A report set as Markdown for a CI job summary: the verdict (ce_audit.verdict_story, the same lines and
    counts as the terminal and report.html), then the section on the figures (html.plots_markdown)."""
    folder = Path(directory)
    folder = folder.parent if folder.suffix.lower() == ".csv" else folder
    cells = checked_errors(read_cells(folder / "summary.csv"), folder / "summary.csv").cells
    return verdict_markdown(cells) + "\n" + plots_markdown(folder, inline_images)

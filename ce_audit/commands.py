"""The library functions behind the commands that a sweep does not run, each module imported on first
use (as ``ce_audit.register`` is): `ce-audit sweep` loads none of the gate's, the merge's, the listing's
or the report rebuild's modules, and the CLI keeps its imports at its top."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ce_audit.lazy import lazy_names

if TYPE_CHECKING:
    from ce_audit.gate.workflow import gate_to_files
    from ce_audit.reports.gate_table import print_gate
    from ce_audit.reports.listing import print_implementations
    from ce_audit.reports.rebuild import rebuild_report, report_markdown
    from ce_audit.run.merge import merge_reports

__all__ = [
    "gate_to_files", "merge_reports", "print_gate", "print_implementations", "rebuild_report",
    "report_markdown",
]  # fmt: skip

_LAZY = {
    "gate_to_files": "ce_audit.gate.workflow",
    "merge_reports": "ce_audit.run.merge",
    "print_gate": "ce_audit.reports.gate_table",
    "print_implementations": "ce_audit.reports.listing",
    "rebuild_report": "ce_audit.reports.rebuild",
    "report_markdown": "ce_audit.reports.rebuild",
}


__getattr__, __dir__ = lazy_names("ce_audit.commands", globals(), _LAZY)

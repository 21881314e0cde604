"""The CI precision gate: a current audit against a committed baseline, and absolute budgets.

``checks`` holds the regression rules, ``compare`` matches typed cells by key and collects every failure
into a GateResult, ``command`` reads the audits, re-runs the recorded sweep or replay and rewrites the
baseline. ``workflow`` (imported on its own: it brings the Markdown and JUnit writers) is `ce-audit gate`
from its arguments to the files written, with the report directories locked. The caller exits once:
0 held, 1 regressed, 2 bad input (AuditError).
"""

from ce_audit.gate.checks import (
    Check,
    CountHeld,
    GrowthHeld,
    KindHeld,
    Present,
    StatusHeld,
    default_checks,
)
from ce_audit.gate.command import (
    GateRun,
    audit_from_result,
    read_audit,
    run_gate,
    summary_path,
    update_baseline,
)
from ce_audit.gate.compare import (
    Audit,
    CellOutcome,
    Failure,
    GateResult,
    compare,
    index_cells,
    key_columns,
    labels,
)

__all__ = [
    "Audit",
    "CellOutcome",
    "Check",
    "CountHeld",
    "Failure",
    "GateResult",
    "GateRun",
    "GrowthHeld",
    "KindHeld",
    "Present",
    "StatusHeld",
    "audit_from_result",
    "compare",
    "default_checks",
    "index_cells",
    "key_columns",
    "labels",
    "read_audit",
    "run_gate",
    "summary_path",
    "update_baseline",
]

"""`ce-audit gate` from its arguments to the files it writes: the report directories locked before any
work (``--out``, and the baseline's directory on ``--update``), the gate evaluated (``run_gate``), the
fresh audit's reports, the Markdown and JUnit summaries and, on ``--update``, the baseline written.

Imported on its own, not by ``ce_audit.gate``: it brings the Markdown and JUnit writers, which the
comparison does not need.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ce_audit.errors import AuditError
from ce_audit.gate.command import GateRun, run_gate, summary_path, update_baseline
from ce_audit.gate.compare import GateResult
from ce_audit.reports.bundle import ReportDirectory
from ce_audit.reports.junit import write_gate_junit
from ce_audit.reports.markdown import write_gate_markdown


@dataclass(frozen=True)
class GateOutcome:
    """What a gate did: its evaluation, the files written, and (``--update``) where the baseline went."""

    run: GateRun
    written: list[str]
    updated: Path | None = None  # the baseline's directory, or its .csv file

    @property
    def result(self) -> GateResult:
        return self.run.result


def gate_to_files(
    baseline: Path | None,
    *,
    current: Path | None = None,
    config: Path | None = None,
    plugins: Sequence[str] = (),
    budgets: Sequence[str] = (),
    ulp_growth: float | None = None,
    rel_growth: float | None = None,
    strict: bool = False,
    markdown: Path | None = None,
    junit: Path | None = None,
    update: bool = False,
    out: Path | None = None,
    baseline_plugins: bool = False,
) -> GateOutcome:
    """Evaluate the gate (ce_audit.gate.command.run_gate) and write what was asked: the fresh audit's
    reports to ``out``, the ``markdown`` and ``junit`` summaries, and with ``update`` the baseline
    (which then need not exist yet). The caller exits 0 held (or updated), 1 regressed."""
    if update and baseline is None:
        raise AuditError("--update needs the BASELINE to write")
    for name, value in (("--ulp-growth", ulp_growth), ("--rel-growth", rel_growth)):
        if value is not None and not (0 <= value < float("inf")):
            raise AuditError(f"{name} must be a finite number ≥ 0")
    with ExitStack() as held:  # report directories checked writable and locked before any work
        report_target = held.enter_context(ReportDirectory(out)) if out is not None else None
        baseline_target = None
        if update and baseline is not None and summary_path(baseline).name == "summary.csv":
            baseline_target = held.enter_context(ReportDirectory(summary_path(baseline).parent))
        run = run_gate(
            baseline,
            current_path=current,
            config_path=config,
            plugins=plugins,
            budgets=budgets,
            ulp_growth=ulp_growth,
            rel_growth=rel_growth,
            strict=strict,
            allow_missing_baseline=update,
            baseline_plugins=baseline_plugins,
        )
        written: list[str] = []
        if report_target is not None and run.fresh is not None:
            written += report_target.write(run.fresh, run.command, run.extra)
        if markdown is not None:
            written.append(str(write_gate_markdown(run.result, markdown)))
        if junit is not None:
            written.append(str(write_gate_junit(run.result, junit)))
        if not update or baseline is None:
            return GateOutcome(run, written)
        written += [str(path) for path in update_baseline(run, baseline, baseline_target)]
    place = summary_path(baseline)
    return GateOutcome(run, written, place.parent if place.name == "summary.csv" else place)

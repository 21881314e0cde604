"""The gate's verdict as Markdown, for a CI job summary (e.g. appended to $GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

from pathlib import Path

from ce_audit.gate.compare import GateResult
from ce_audit.printable import plural, printable
from ce_audit.reports.files import write_atomically

MAX_LISTED = 50


def _escape(text: str) -> str:
    """Table-safe: pipes escaped, newlines flattened, control characters shown as escapes."""
    return printable(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def gate_markdown(result: GateResult) -> str:
    """Heading with the verdict, the counts, a table of failures, then new cells and notes."""
    cells = result.cells
    failing = [cell for cell in cells if cell.failures]
    verdict = "✅ passed" if result.passed else "❌ failed"
    source = f"`{result.baseline_source}`" if result.baseline_source else "no baseline (budgets only)"
    lines = [
        f"## ce-audit precision gate: {verdict}",
        "",
        f"{plural(len(cells), 'cell')}, baseline {source} against {result.current_source}: "
        f"{len(failing)} failing, {len(result.new)} new, {len(result.missing)} missing"
        + (f"; {plural(len(result.budgets), 'budget')}." if result.budgets else "."),
        "",
    ]
    if result.failures:
        from ce_audit.gate.summary import summary_lines

        lines += ["**By implementation**", ""]
        lines += [f"- {_escape(line)}" for line in summary_lines(result)]
        lines += ["", "**Per cell**", ""]
        lines += ["| cell | metric | baseline | current | why |", "|---|---|---|---|---|"]
        for failure in result.failures[:MAX_LISTED]:
            lines.append(
                f"| {_escape(failure.cell)} | {_escape(failure.metric)} | {_escape(failure.baseline)} "
                f"| {_escape(failure.current)} | {_escape(failure.message)} |"
            )
        if len(result.failures) > MAX_LISTED:
            left = len(result.failures) - MAX_LISTED
            lines.append(f"\n… and {left} more failures (the JUnit report lists every one).")
        lines.append("")
    if result.new:
        shown = ", ".join(f"`{label}`" for label in result.new[:MAX_LISTED])
        more = f" … and {len(result.new) - MAX_LISTED} more" if len(result.new) > MAX_LISTED else ""
        lines += [f"New cells (not in the baseline): {shown}{more}", ""]
    if result.budgets:
        lines += ["Budgets: " + ", ".join(f"`{text}`" for text in result.budgets), ""]
    for note in result.notes:
        lines += [f"> {_escape(note)}", ""]
    return "\n".join(lines)


def write_gate_markdown(result: GateResult, path: str | Path) -> Path:
    return write_atomically(path, gate_markdown(result))

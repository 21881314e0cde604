"""The gate's verdict on the terminal: what regressed per implementation (by how much, where), the
per-cell detail as a table, new cells, notes, and PASSED or FAILED."""

from __future__ import annotations

import textwrap

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ce_audit.gate.compare import GateResult
from ce_audit.gate.summary import MAX_DETAIL, summary_lines
from ce_audit.printable import plural


def print_gate(result: GateResult, console: Console) -> None:
    """What regressed per implementation (by how much, where), then the per-cell detail as a table (cell,
    metric, baseline → current, why; the first MAX_DETAIL lines), new cells, notes, verdict."""
    if result.failures:
        console.print("Precision regressions by implementation:", style="bold", highlight=False)
        for line in summary_lines(result):  # wrapped on words, with a hanging indent
            width = max(console.width, 40)
            wrapped = textwrap.fill(line, width=width, initial_indent="  ", subsequent_indent="    ")
            console.print(Text(wrapped), highlight=False, soft_wrap=True)
        table = Table(title="Precision regressions, per cell", title_justify="left")
        for column in ("cell", "metric", "baseline → current", "why"):
            table.add_column(column, overflow="fold")
        for failure in result.failures[:MAX_DETAIL]:
            change = Text(f"{failure.baseline} → ", style="dim")
            change.append(failure.current, style="bold red")
            table.add_row(Text(failure.cell), Text(failure.metric), change, Text(failure.message))
        console.print(table)
        if len(result.failures) > MAX_DETAIL:
            left = len(result.failures) - MAX_DETAIL
            console.print(
                f"… and {plural(left, 'more failure')} (--junit or --markdown lists every one)",
                highlight=False,
                markup=False,
            )
    if result.new:
        listed = ", ".join(result.new[:20]) + (
            f" … and {len(result.new) - 20} more" if len(result.new) > 20 else ""
        )
        console.print(
            f"{len(result.new)} new cells, not in the baseline: {listed}", highlight=False, markup=False
        )
    for note in result.notes:
        console.print(f"note: {note}", style="dim", highlight=False, markup=False)
    failing = sum(1 for cell in result.cells if cell.failures)
    budgets = f", {plural(len(result.budgets), 'budget')}" if result.budgets else ""
    if result.passed:
        console.print(
            f"[green]PASSED[/green]: {plural(len(result.cells), 'cell')} held{budgets}.", highlight=False
        )
    else:
        console.print(
            f"[bold red]FAILED[/bold red]: {plural(len(result.failures), 'failure')} in {failing} of "
            f"{plural(len(result.cells), 'cell')}{budgets}.",
            highlight=False,
        )

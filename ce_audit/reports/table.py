"""The terminal report: per dtype, implementations down and scale × offset × options across, coloured by
status (turned round when there are many option combinations)."""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ce_audit.dtypes import LIMITED_FLOAT64_REFERENCE, reference_precision
from ce_audit.findings import findings
from ce_audit.gate.compare import GateResult
from ce_audit.options import options_label
from ce_audit.results import Cell
from ce_audit.statuses import UNMEASURED, worst_status
from ce_audit.verdict import cell_status

STYLES = {
    "ok": "green",
    "inaccurate": "yellow",
    "nonfinite": "bold red",
    "error": "magenta",
    "skipped": "dim",
}


def _ulp_text(value: float) -> str:
    if value < 10:
        return f"{value:.2g}"
    return f"{value:.0f}" if value < 1e5 else f"{value:.1e}"


def cell_text(rows: list[Cell]) -> Text:
    """Worst status of the rows in one table cell, with max ULPs or the NaN/Inf row counts."""
    status = worst_status([row.status for row in rows])
    measured = [row for row in rows if row.status not in ("error", "skipped")]
    if status == "nonfinite":
        nan = sum(row.nan_rows for row in measured)
        inf = sum(row.inf_rows for row in measured)
        text = "/".join(part for part in (f"NaN {nan}" if nan else "", f"Inf {inf}" if inf else "") if part)
        text = text or "finite≠"  # finite where the exact value is ±inf or NaN
    elif status in ("ok", "inaccurate"):
        text = _ulp_text(max(row.max_ulp for row in measured))
    else:
        text = status
    grad = worst_status(
        [row.grad_status for row in rows if row.grad_status in ("ok", "inaccurate", "nonfinite")]
    )
    if grad in ("inaccurate", "nonfinite") and status in ("ok", "inaccurate"):
        text += " g!"
    if any(row.value_kind == "mean" for row in measured):
        text += " μ"
    if any(row.wrote_input for row in rows):
        text += " w!"
    if any(row.convention for row in measured):
        text += " c"
    text += _flag_text(measured)
    return Text(text, style=STYLES[status])


def _flag_text(measured: list[Cell]) -> str:
    """The relative verdict of the worst-flagged row: ×N pt (worse than PyTorch by N), =pt (as PyTorch),
    floor (the dtype's floor: correct rounding is flagged too)."""
    worse = [row for row in measured if row.flag == "worse"]
    if worse:
        factors = [
            v for row in worse for v in (row.loss_vs_pytorch, row.grad_vs_pytorch) if not math.isnan(v)
        ]
        top = max(factors, default=math.nan)
        return " ✗pt" if top == math.inf else f" ×{top:.2g}pt".replace("e+0", "e").replace("e+", "e")
    if any(row.flag == "pytorch" for row in measured):
        return " =pt"
    return " floor" if any(row.flag == "floor" for row in measured) else ""


WIDE_LIMIT = 12  # more (offset, scale, options) columns than this: one row per column key instead


def _column_label(key: tuple[float, float, str], offsets: int, scales: int, sep: str) -> str:
    offset, scale, variant = key
    parts = [f"s={scale:g}"] if scales > 1 or not variant else []
    if offset and (offsets > 1 or not variant):
        parts.append(f"+{offset:g}")
    if variant:
        parts += variant.split(" ") if sep == "\n" else [variant]
    return sep.join(parts) or "plain"


LABEL_WIDTH = 18  # the options column of a turned table wraps its labels at this width
CELL_WIDTH = 10  # a cell's text wraps past this width ("NaN 185/Inf 135 ✗pt" takes two lines)


def _bands(names: list[str], width: int | None) -> list[list[str]]:
    """Implementation columns packed into bands that each fit ``width`` beside the options column."""
    if width is None:
        return [names]
    room = width - LABEL_WIDTH - 4
    bands: list[list[str]] = [[]]
    used = 0
    for name in names:
        need = max(len(name), CELL_WIDTH) + 3
        if bands[-1] and used + need > room:
            bands.append([])
            used = 0
        bands[-1].append(name)
        used += need
    return bands


def summary_tables(rows: list[Cell], width: int | None = None) -> list[Table]:
    """One table per dtype: implementations down and (offset, scale, loss options) across, the worst over
    distributions, vocabs and batches. With more than WIDE_LIMIT such columns the table turns: option
    combinations down (only those where some implementation is not ok), implementations across, in bands
    of implementations that fit ``width`` columns (one table per band; no number is cut)."""
    tables = []
    dtypes = list(dict.fromkeys(row.dtype for row in rows))
    offsets = sorted({row.offset for row in rows}, key=abs)
    scales = sorted({row.scale for row in rows}, key=abs)
    variants = list(dict.fromkeys(options_label(row) for row in rows))
    columns = [(offset, scale, variant) for variant in variants for offset in offsets for scale in scales]
    for dtype in dtypes:
        grid: dict[tuple[str, float, float, str], list[Cell]] = defaultdict(list)
        names: list[str] = []
        for row in rows:
            if row.dtype != dtype:
                continue
            name = row.impl if row.device == "cpu" else f"{row.impl}@{row.device}"
            if name not in names:
                names.append(name)
            grid[(name, row.offset, row.scale, options_label(row))].append(row)
        used = [c for c in columns if any(grid[(name, *c)] for name in names)]
        title = f"{dtype}: max ULP of the loss (NaN/Inf: rows)"
        if len(used) <= WIDE_LIMIT:
            table = Table(title=title, title_justify="left")
            table.add_column("impl", style="bold", no_wrap=True)
            for key in used:
                table.add_column(
                    _column_label(key, len(offsets), len(scales), "\n"), justify="right", no_wrap=True
                )
            for name in names:
                table.add_row(
                    Text(name), *(cell_text(grid[(name, *c)]) if grid[(name, *c)] else "" for c in used)
                )
        else:
            failing = [
                c
                for c in used
                if any(r.status not in ("ok", "skipped") for name in names for r in grid[(name, *c)])
            ]
            hidden = len(used) - len(failing)
            title += f"; {hidden} of {len(used)} option combinations all ok or skipped, not shown"
            bands = _bands(names, width)
            for index, band in enumerate(bands, 1):
                part = f" (implementations {index} of {len(bands)})" if len(bands) > 1 else ""
                table = Table(title=title + part, title_justify="left")
                table.add_column("options", style="bold", max_width=LABEL_WIDTH if width else None)
                for name in band:
                    table.add_column(
                        name, justify="right", min_width=len(name), max_width=max(len(name), CELL_WIDTH)
                    )
                for key in failing:
                    label = _column_label(key, len(offsets), len(scales), " ")
                    table.add_row(
                        Text(label), *(cell_text(grid[(n, *key)]) if grid[(n, *key)] else "" for n in band)
                    )
                tables.append(table)
            continue
        tables.append(table)
    return tables


def print_report(rows: list[Cell], console: Console, paths: list[str], seconds: float) -> None:
    """Tables, the findings in words, and where the files went."""
    for table in summary_tables(rows, console.width):
        console.print(table)
    lines = findings(rows)
    if any(row.dtype == "float64" for row in rows) and reference_precision()["float64"].startswith(
        "float64:"
    ):
        console.print(f"warning: {LIMITED_FLOAT64_REFERENCE}", style="yellow", markup=False)
    overall = [cell_status(row.status, row.grad_status) for row in rows]
    measured_all = bool(rows) and all(status not in UNMEASURED for status in overall)
    if lines:
        console.print("[bold]What broke where[/bold]")
    elif measured_all and all(status == "ok" for status in overall):
        console.print("[green]Every cell is within tolerance.[/green]")
    for line in lines:
        console.print(f"  {line}", highlight=False, soft_wrap=True, markup=False)
    console.print(closing_line(rows, seconds), highlight=False)
    legend = (
        "Legend: ULPs of the dtype; g! = gradient past tolerance; ×N pt = worse than PyTorch's kernel by N"
    )
    legend += (
        ", =pt = flagged as PyTorch's kernel is, floor = the dtype's floor; c = 0 where PyTorch gives NaN"
    )
    if any(row.value_kind == "mean" for row in rows):
        legend += "; μ = returned a 0-d mean, audited against the exact mean"
    if any(row.wrote_input for row in rows):
        legend += "; w! = wrote into its input"
    console.print(legend + ".", style="dim")
    for path in paths:
        console.print(f"wrote {path}", highlight=False, markup=False)


def closing_line(rows: list[Cell], seconds: float) -> str:
    """Cells counted by the worse of loss and gradient; skipped cells as not measured; PyTorch comparison."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[cell_status(row.status, row.grad_status)] += 1
    tally = ", ".join(f"{counts[s]} {s}" for s in STYLES if counts[s] and s != "skipped")
    text = f"{len(rows)} cells in {seconds:.1f} s: {tally or 'none measured'}"
    if counts["skipped"]:
        text += f"; {counts['skipped']} not measured (skipped)"
    flags = {flag: sum(1 for row in rows if row.flag == flag) for flag in ("worse", "pytorch", "floor")}
    if any(flags.values()):
        text += (
            f"; {flags['worse']} worse than PyTorch, {flags['pytorch']} flagged as PyTorch is, "
            f"{flags['floor']} at the dtype's floor"
        )
    return text


def print_gate(result: GateResult, console: Console) -> None:
    """What regressed per implementation (by how much, where), then the per-cell detail as a table (cell,
    metric, baseline → current, why; the first MAX_DETAIL lines), new cells, notes, verdict."""
    from ce_audit.gate.summary import MAX_DETAIL, summary_lines

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
                f"… and {_plural(left, 'more failure')} (--junit or --markdown lists every one)",
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
    budgets = f", {_plural(len(result.budgets), 'budget')}" if result.budgets else ""
    if result.passed:
        console.print(
            f"[green]PASSED[/green]: {_plural(len(result.cells), 'cell')} held{budgets}.", highlight=False
        )
    else:
        console.print(
            f"[bold red]FAILED[/bold red]: {_plural(len(result.failures), 'failure')} in {failing} of "
            f"{_plural(len(result.cells), 'cell')}{budgets}.",
            highlight=False,
        )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"

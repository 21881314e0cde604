"""The verdict in words, in ``ce_audit.ranking``'s order, for every screen: what is worse than it has to be
(where, by how much, why), then where the dtype itself falls short (PyTorch's kernel included), then what is
fine, and the counts that close it. The terminal, report.html, the Markdown summary and ``--format json``
all print these lines and counts, so the same fact reads the same everywhere."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ce_audit.findings import cause, notes, where
from ce_audit.printable import plural
from ce_audit.ranking import (
    GROUP_TITLES,
    VERDICT_WORDS,
    ImplementationVerdict,
    cell_verdict,
    factor_text,
    ranked,
    verdict_counts,
)
from ce_audit.results import Cell
from ce_audit.statuses import status_rank
from ce_audit.verdict import PYTORCH_KERNELS, cell_status


def _which(cell: Cell) -> str:
    """Whether the loss or the gradient is the worse part of a cell worse than PyTorch."""
    loss, grad = cell.loss_vs_pytorch, cell.grad_vs_pytorch
    if math.isnan(grad) or (not math.isnan(loss) and loss >= grad):
        return "loss"
    return "gradient"


def _cause(cell: Cell) -> str:
    if cell.status == "ok" and cell.grad_status in ("ok", "off", "n/a"):
        return "within the tolerance, but worse than PyTorch's kernel on the same rows"
    return cause(cell) or "past the tolerance"


def implementation_line(verdict: ImplementationVerdict) -> str:
    """``name: worse than PyTorch in 12 of 190 cells, up to ×3.3e3 (loss) at float16 scale 100 …
    (14 of 64 rows) — cause``; the other verdicts say how many cells and the worst one's cause."""
    cell, counts, name = verdict.worst, verdict.counts, verdict.name
    if cell is None:
        return f"{name}: {VERDICT_WORDS[verdict.verdict]}"
    at = f"{cell.dtype} {where(cell)}"
    if verdict.verdict == "worse":
        by = factor_text(verdict.factor)
        by = "non-finite where PyTorch is finite" if by == "NaN/Inf" else f"up to {by} ({_which(cell)})"
        rows = f"{cell.worse_rows} of {plural(cell.batch, 'row')}" if cell.worse_rows else ""
        return (
            f"{name}: worse than PyTorch in {counts['worse']} of {plural(verdict.measured, 'cell')}, {by}, "
            f"worst at {at}" + (f" ({rows})" if rows else "") + f" — {_cause(cell)}"
        )
    if verdict.verdict == "error":
        return f"{name}: failed in {plural(counts['error'], 'cell')}, first at {at} — {cell.error}"
    if verdict.verdict == "past":
        return (
            f"{name}: past the tolerance in {plural(counts['past'], 'cell')} with no PyTorch result to "
            f"compare, worst at {at} — {cause(cell)}"
        )
    return f"{name}: {VERDICT_WORDS[verdict.verdict]} in {plural(counts[verdict.verdict], 'cell')}"


def _kernel_text(cell: Cell) -> str:
    if cell_verdict(cell) == "floor":
        return f"within 2× the exact result rounded once: the tolerance is tighter than {cell.dtype} holds"
    if cell.status == "ok" and cell.grad_status in ("inaccurate", "nonfinite"):
        return f"the gradient is past the tolerance (normwise row error up to {cell.grad_err:.3g} ε)"
    return cause(cell) or f"past the tolerance (loss error up to {cell.loss_err:.3g} ε)"


def _kernel_cell(cells: Sequence[Cell]) -> Cell | None:
    """PyTorch's kernel's cell a dtype's line names: its most severe status among ``cells``."""
    kernel = [cell for cell in cells if cell.impl in PYTORCH_KERNELS.values()]
    if not kernel:
        return None
    return max(kernel, key=lambda c: status_rank(cell_status(c.status, c.grad_status)) or 0)


def _limited(cells: Sequence[Cell], dtype: str) -> list[Cell]:
    """A dtype's cells that miss the tolerance as PyTorch does or at the floor."""
    return [cell for cell in cells if cell.dtype == dtype and cell_verdict(cell) in ("pytorch", "floor")]


def shown_cells(cells: Sequence[Cell]) -> list[Cell]:
    """The cells whose causes the story words: each implementation's worst cell where it is worse than it
    has to be, and PyTorch's kernel's cell on each dtype's line."""
    shown = [v.worst for v in ranked(cells) if v.group == "mine" and v.worst is not None]
    for dtype in dict.fromkeys(cell.dtype for cell in cells):
        kernel = _kernel_cell(_limited(cells, dtype))
        if kernel is not None:
            shown.append(kernel)
    return shown


def dtype_lines(cells: Sequence[Cell], limited: Sequence[str] = ()) -> list[str]:
    """The implementations no worse than PyTorch anywhere (``limited``), then per dtype how many cells miss
    the tolerance as PyTorch does or at the floor, and what PyTorch's own kernel shows there."""
    lines = []
    if limited:
        lines.append(
            f"{', '.join(limited)}: no worse than PyTorch anywhere; past the tolerance only where PyTorch is "
            "or at the floor"
        )
    for dtype in dict.fromkeys(cell.dtype for cell in cells):
        own = _limited(cells, dtype)
        if not own:
            continue
        counts = verdict_counts(own)
        parts = [f"{counts['pytorch']} past the tolerance as PyTorch is"] if counts["pytorch"] else []
        parts += [f"{counts['floor']} at the floor"] if counts["floor"] else []
        text = f"{dtype}: {plural(len(own), 'cell')}, " + ", ".join(parts)
        first = _kernel_cell(own)
        if first is not None:
            text += f"; PyTorch's kernel ({first.impl}) at {where(first)} — {_kernel_text(first)}"
        lines.append(text)
    return lines


def counts_text(cells: Sequence[Cell]) -> str:
    """``866 worse than PyTorch, 65 past the tolerance as PyTorch is, 227 at the dtype's floor, 1204 fine;
    108 not measured (skipped)``: every verdict with a cell, in the story's order."""
    counts = verdict_counts(cells)
    parts = [
        f"{counts[v]} {VERDICT_WORDS[v]}" for v in counts if v != "skipped" and (counts[v] or v == "worse")
    ]
    text = ", ".join(parts)
    if counts["skipped"]:
        text += f"; {counts['skipped']} not measured (skipped)"
    return text


@dataclass(frozen=True)
class Story:
    """The verdict as sections of lines, in order: (title, lines) for each part that has any."""

    sections: list[tuple[str, list[str]]]
    counts: dict[str, int]

    def as_text(self) -> str:
        return "\n".join(
            f"{title}\n" + "\n".join(f"  {line}" for line in lines) for title, lines in self.sections
        )


def story(cells: Sequence[Cell]) -> Story:
    """The three parts of the verdict (ce_audit.ranking), each with its lines."""
    verdicts = ranked(cells)
    mine = [implementation_line(v) for v in verdicts if v.group == "mine"]
    fine = [v.name for v in verdicts if v.verdict == "ok"]
    sections = []
    if mine:
        sections.append((GROUP_TITLES["mine"], mine))
    limits = dtype_lines(cells, [v.name for v in verdicts if v.group == "dtype"])
    if limits:
        sections.append((GROUP_TITLES["dtype"], limits))
    if fine:
        lines = [", ".join(fine)]
        by_atol = [cell for cell in cells if cell_verdict(cell) == "ok" and cell.atol_rows]
        if by_atol:
            rows = sum(cell.atol_rows for cell in by_atol)
            lines.append(
                f"the absolute tolerance (atol) alone decides {plural(rows, 'row')} in "
                f"{plural(len(by_atol), 'fine cell')}: tiny losses whose relative error is past rtol "
                "(summary.csv's atol_rows)"
            )
        sections.append((GROUP_TITLES["fine"], lines))
    remarks = notes(list(cells))
    if remarks:
        sections.append(("Notes (not failures)", remarks))
    return Story(sections, verdict_counts(cells))


def verdict_document(cells: Sequence[Cell]) -> dict[str, Any]:
    """The verdict as report.json and ``--format json`` hold it: the counts by verdict, the implementations
    in ranking order with their verdict, counts, factor and line, and the story's sections."""
    told = story(cells)
    implementations = [
        {
            "name": verdict.name,
            "verdict": verdict.verdict,
            "counts": verdict.counts,
            "vs_pytorch": verdict.factor,
            "line": implementation_line(verdict),
        }
        for verdict in ranked(cells)
    ]
    sections = [{"title": title, "lines": lines} for title, lines in told.sections]
    return {"counts": told.counts, "implementations": implementations, "sections": sections}


def verdict_markdown(cells: Sequence[Cell]) -> str:
    """The verdict for a CI job summary: the counts, then each section of the story as a list."""
    lines = ["### ce-audit verdict", "", counts_text(cells) + ".", ""]
    for title, items in story(cells).sections:
        lines += [f"**{title}**", "", *(f"- {item}" for item in items), ""]
    return "\n".join(lines)

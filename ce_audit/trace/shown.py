"""The built-ins' cells the verdict words, traced after the run: with ``--trace plugins`` (the default) the
flagged cells of the built-ins are not traced while the run goes (it would cost ~45 % of the default sweep),
but the few the story shows — each implementation's worst cell, PyTorch's kernel on each dtype's line
(ce_audit.verdict_story.shown_cells) — are, so that the first screen gives the cause observed in the code.

The cells chosen depend on every cell of the run, so this runs on the whole result: after a run that is not a
shard, and after ``ce-audit merge`` on the merged cells, giving the same cells either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ce_audit.results import Cell
from ce_audit.trace.cells import needs_trace, traced


def _untraced(cell: Cell) -> bool:
    return not (cell.traced_cause or cell.error_origin or cell.nonfinite_origin)


def trace_shown(cells: list[Cell], config: Any, source_of: Callable[[Any, Any], Any]) -> list[Cell]:
    """``cells`` with the built-ins' cells the story shows traced (their worst row, where they run: here),
    when ``config.trace`` is ``plugins``; unchanged otherwise (``all``: traced already; ``none``).
    ``source_of(case, impl)``: the input adapter that generates a case's rows (run.sweep.CaseSource)."""
    from ce_audit.verdict_story import shown_cells

    if config.trace != "plugins" or not cells:
        return cells
    chosen = {id(cell) for cell in shown_cells(cells) if needs_trace(cell) and _untraced(cell)}
    if not chosen:
        return cells
    from ce_audit.dtypes import float_format
    from ce_audit.implementations import REGISTRY
    from ce_audit.plan.cases import REPLAY, Case

    settings = config.implementation_settings()
    out = list(cells)
    for index, cell in enumerate(cells):
        impl = REGISTRY.get(cell.impl)
        if id(cell) not in chosen or impl is None or not impl.builtin or cell.distribution == REPLAY:
            continue
        case = Case.of_cell(cell)
        source = source_of(case, impl)
        fmt = float_format(cell.dtype)
        grad = cell.grad_status not in ("off", "n/a", "")
        out[index] = traced(cell, source, fmt, impl, cell.options, settings, source.weight(fmt), grad)
    return out

"""``ce-audit explain``: one cell of a report, traced again op by op and printed whole.

The cell is picked from DIR/summary.csv by its columns (``--impl``, ``--dtype``, ``--distribution``,
``--scale``, ``--offset``; the first flagged match, else the first match) or by its row number; its inputs
are generated again from its key (a sweep's cells only: a replay's rows are in its files) and traced with
the run's config (DIR/report.json: plugins, tunables, isolation), loss and gradient alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ce_audit.errors import AuditError
from ce_audit.results import Cell
from ce_audit.trace.cells import needs_trace, trace_cell
from ce_audit.trace.records import OpRecord, Trace

EXPLAIN_ROWS = 64  # a batch up to this size is traced whole (a larger one: its worst row)
SELECTORS = ("impl", "dtype", "distribution", "scale", "offset")


def pick_cell(cells: list[Cell], row: int | None, selectors: dict[str, Any]) -> Cell:
    """The cell of summary.csv's data row ``row`` (1 = the first), else the first flagged cell that
    matches every given selector, else the first that matches."""
    if row is not None:
        if not 1 <= row <= len(cells):
            raise AuditError(f"--row takes 1 to {len(cells)} (the data rows of summary.csv), got {row}")
        return cells[row - 1]
    given = {name: value for name, value in selectors.items() if value is not None}
    matching = [cell for cell in cells if all(getattr(cell, k) == v for k, v in given.items())]
    measured = [cell for cell in matching if cell.status != "skipped"]
    if not measured:
        wanted = ", ".join(f"{k} {v}" for k, v in given.items()) or "any"
        raise AuditError(f"no measured cell in the summary matches ({wanted})")
    return next((cell for cell in measured if needs_trace(cell)), measured[0])


def explain_cell(directory: str | Path, row: int | None = None, plugins: tuple[str, ...] = (),
                 **selectors: Any) -> tuple[Cell, Trace | None]:  # fmt: skip
    """Trace one cell of the report in ``directory`` again (module docstring)."""
    from ce_audit.config import config_from_dict, load_config
    from ce_audit.dtypes import float_format
    from ce_audit.pipeline import row_multiple
    from ce_audit.plan.cases import Case
    from ce_audit.plugins import prepare
    from ce_audit.reports.csv import read_cells
    from ce_audit.run.isolation import session
    from ce_audit.run.sweep import CaseSource

    folder = Path(directory)
    summary = folder if folder.suffix.lower() == ".csv" else folder / "summary.csv"
    cell = pick_cell(list(read_cells(summary).cells), row, selectors)
    if cell.distribution == "replay":
        raise AuditError("explain traces a sweep's cells (a replay's rows are in its files: replay them)")
    report = summary.with_name("report.json")
    config = load_config()
    if report.is_file():
        try:
            config = config_from_dict(json.loads(report.read_text(encoding="utf-8")).get("config") or {})
        except (OSError, ValueError, AttributeError) as error:
            raise AuditError(f"cannot read {report}: {error}") from None
    specs = tuple(dict.fromkeys([*config.plugins, *plugins]))
    (impl,) = prepare((cell.impl,), specs)
    case = Case.of_cell(cell)
    source = CaseSource(case, config.block_mib << 20, row_multiple([impl]))
    fmt = float_format(cell.dtype)
    with session(config.isolation, config.timeout, impls=(cell.impl,), plugins=specs):
        rows = list(range(cell.batch)) if cell.batch <= EXPLAIN_ROWS else None  # else the worst row
        settings, weight = config.implementation_settings(), source.weight(fmt)
        trace = trace_cell(cell, source, fmt, impl, cell.options, settings, weight, config.grad,
                           parts="loss,grad,every-op", rows=rows)  # fmt: skip
    return cell, trace


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3g}"


def op_line(op: OpRecord) -> str:
    """One op of the trace as a line of the printout."""
    shapes = " ".join("×".join(map(str, shape)) or "0-d" for shape in op.shapes[:3])
    mark = op.born or ("row ±inf/NaN" if op.takes_row else "") or ("±inf made finite" if op.absorbs else "")
    mark = mark or ("a whole row underflowed to 0" if op.zero_rows else "")
    flag = f" {op.nonfinite}" if op.nonfinite else ""
    return (
        f"{op.index:>4} {op.phase:<8} {op.name:<28} {op.dtype:<8} {op.line or '?':<32} "
        f"{_number(op.local):>9} {_number(op.carried):>10}{flag}  {shapes}" + (f"  ← {mark}" if mark else "")
    )


def trace_lines(cell: Cell, trace: Trace | None) -> list[str]:
    """The printout of ``ce-audit explain``: the cell, every op, then what was found."""
    from ce_audit.findings import where

    head = f"{cell.impl} {cell.dtype}, {where(cell)}: loss {cell.status}, gradient {cell.grad_status}"
    head += f", flag {cell.flag}" if cell.flag else ""
    if trace is None:
        return [head, "the trace failed (the implementation raised on the traced rows)"]
    shown = trace.rows
    rows = f"rows {shown[0]}–{shown[-1]}" if len(shown) > 4 else "rows " + ", ".join(map(str, shown))
    lines = [head, f"{rows} traced; {len(trace.ops)} ops" + (f"; {trace.note}" if trace.note else "")]
    if trace.ops:
        lines.append(
            f"{'#':>4} {'phase':<8} {'op':<28} {'dtype':<8} {'line':<32} {'local ULP':>9} {'carried ULP':>10}"
            "  input shapes"
        )
        lines += [op_line(op) for op in trace.ops]
    lines.append(
        f"result: {_number(trace.loss_error) or 'n/a'} ULP from its float64 shadow; "
        f"gradient: {_number(trace.grad_error) or 'n/a'} ULP"
    )
    origin = trace.nonfinite_origin
    lines.append(f"non-finite origin: {origin.text() if origin else 'none'}")
    if trace.departure is not None:  # where the formula leaves the exact values (ce_audit.trace.departure)
        lines.append(f"error origin: {trace.departure.text()}")
    if trace.error_origins:
        lines += [f"error origin: {found.text()}" for found in trace.error_origins]
    elif trace.departure is not None:
        pass
    elif origin is not None:
        lines.append("error origin: none found (the result is non-finite)")
    elif trace.traced and trace.ops and cell.dtype != "float64":
        lines.append(
            "error origin: none — no op brings in more than a few ULPs: the error is what the dtype allows"
        )
    return lines

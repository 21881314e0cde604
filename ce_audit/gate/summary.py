"""The gate's failures summed up per implementation: what regressed, by how much, where.

One line per implementation with failing cells, read before the per-cell detail, e.g.
``naive: 12 of 24 cells regressed (float16, scale 100–1000): max_ulp up to 140× (0.5 → 70), status ok →
nonfinite (3)``. Every report of the gate (terminal, Markdown, JUnit) starts with these lines.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from ce_audit.gate.compare import CellOutcome, Failure, GateResult, shown
from ce_audit.printable import plural
from ce_audit.results import unit_of

MAX_DETAIL = 40  # per-cell failure lines shown after the summary (the JUnit report has every one)


@dataclass(frozen=True)
class ImplRegression:
    """The failing cells of one implementation: how many, what changed, over which cells."""

    impl: str
    failing: int
    total: int
    changes: tuple[str, ...]
    where: str

    def line(self) -> str:
        where = f" ({self.where})" if self.where else ""
        body = f": {', '.join(self.changes)}" if self.changes else ""
        return f"{self.impl}: {self.failing} of {plural(self.total, 'cell')} regressed{where}{body}"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _growth(metric: str, failures: list[Failure]) -> str:
    """``max_ulp up to 140× (0.5 → 70)``: the largest ratio current / baseline among the failures."""
    pairs = [(_number(f.baseline), _number(f.current)) for f in failures]
    numeric = [(before, now) for before, now in pairs if before is not None and now is not None]
    if not numeric:
        return f"{metric} grew ({len(failures)})"
    before, now = max(numeric, key=lambda pair: (pair[1] / pair[0]) if pair[0] > 0 else float("inf"))
    if before > 0:
        return f"{metric} up to {now / before:.3g}× ({shown(before)} → {shown(now)})"
    return f"{metric} from 0 up to {shown(now)}"


def _change(metric: str, failures: list[Failure]) -> str:
    if metric == "cell":
        return f"missing from the current audit ({len(failures)})"
    if failures[0].baseline.startswith("budget"):
        return f"{metric} over budget ({len(failures)})"
    if unit_of(metric):
        return _growth(metric, failures)
    if metric in ("status", "grad_status"):
        moves = Counter(f"{f.baseline} → {f.current}" for f in failures)
        return ", ".join(f"{metric} {move} ({count})" for move, count in moves.most_common())
    return f"{failures[0].message} ({len(failures)})"


def _span(values: list[object]) -> str:
    distinct = list(dict.fromkeys(values))
    numbers = [value for value in distinct if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if len(distinct) > 1 and len(numbers) == len(distinct):
        low, high = min(numbers), max(numbers)
        return f"{shown(low)}–{shown(high)}"
    return ", ".join(shown(value) for value in distinct)


def _where(cells: list[CellOutcome], columns: tuple[str, ...], varying: set[str]) -> str:
    """The dtypes of the failing cells, then each key column that varies in the audit, as a range."""
    parts = [", ".join(dict.fromkeys(cell.dtype for cell in cells))]
    for i, column in enumerate(columns):
        if column in ("impl", "dtype") or column not in varying:
            continue
        parts.append(f"{column} {_span([cell.key[i] for cell in cells])}")
    return ", ".join(part for part in parts if part)


def regressions_by_impl(result: GateResult) -> list[ImplRegression]:
    """One ImplRegression per implementation with failing cells, the most failing cells first."""
    columns = result.key_columns
    varying = {
        column
        for i, column in enumerate(columns)
        if len({cell.key[i] for cell in result.cells if i < len(cell.key)}) > 1
    }
    by_impl: dict[str, list[CellOutcome]] = defaultdict(list)
    totals: Counter[str] = Counter()
    for cell in result.cells:
        totals[cell.impl] += 1
        if cell.failures:
            by_impl[cell.impl].append(cell)
    summaries = []
    for impl, cells in by_impl.items():
        by_metric: dict[str, list[Failure]] = defaultdict(list)
        for cell in cells:
            for failure in cell.failures:
                by_metric[failure.metric].append(failure)
        changes = tuple(_change(metric, failures) for metric, failures in by_metric.items())
        where = _where(cells, columns, varying)
        summaries.append(ImplRegression(impl, len(cells), totals[impl], changes, where))
    return sorted(summaries, key=lambda summary: -summary.failing)


def summary_lines(result: GateResult) -> list[str]:
    """The per-implementation lines, then one for budgets that match no cell."""
    lines = [summary.line() for summary in regressions_by_impl(result)]
    orphans = [failure for failure in result.failures if failure.cell == "(no cell)"]
    if orphans:
        lines.append(f"budgets matching no measured cell: {', '.join(f.baseline for f in orphans)}")
    return lines

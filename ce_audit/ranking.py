"""The one order every screen tells the verdict in (terminal, report.html, Markdown, JSON, the API):

1. what is worse than it has to be: cells worse than PyTorch's kernel on the same rows (``flag`` worse),
   cells that failed to run, and cells past the tolerance with no PyTorch result to compare;
2. what the dtype cannot do better: cells past the tolerance where PyTorch's kernel is too (``pytorch``) or
   within 2× the correctly rounded result's error (``floor``);
3. what is fine: within the tolerance and no worse than PyTorch.

Each cell gets one verdict (``cell_verdict``); each implementation is ranked by its most severe one, then by
how many cells are worse than PyTorch and by how much (``ranked``). Every count a screen prints comes from
``verdict_counts`` and every per-implementation figure from ``ranked``, so one fact has one number.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ce_audit.results import Cell
from ce_audit.verdict import PYTORCH_KERNELS

CELL_VERDICTS = ("worse", "error", "past", "pytorch", "floor", "ok", "skipped")
"""A cell's verdict, most severe first."""

VERDICT_WORDS = {
    "worse": "worse than PyTorch",
    "error": "failed",
    "past": "past the tolerance, no PyTorch result to compare",
    "pytorch": "past the tolerance as PyTorch is",
    "floor": "at the dtype's floor",
    "ok": "fine",
    "skipped": "not measured (skipped)",
}

GROUPS = {
    "worse": "mine",
    "error": "mine",
    "past": "mine",
    "pytorch": "dtype",
    "floor": "dtype",
    "ok": "fine",
}
"""The three parts of the story: worse than it has to be, the dtype's limits, fine."""

GROUP_TITLES = {
    "mine": "Worse than it has to be (than PyTorch's kernel on the same rows)",
    "dtype": "The dtype's limits (past the tolerance where PyTorch is too, or at the floor)",
    "fine": "Fine (within the tolerance, no worse than PyTorch)",
}


def cell_verdict(cell: Cell) -> str:
    """One of CELL_VERDICTS: the relative verdict (``flag``) first, then the absolute one."""
    if cell.status == "skipped":
        return "skipped"
    if cell.flag == "worse":
        return "worse"
    if "error" in (cell.status, cell.grad_status):
        return "error"
    if cell.flag in ("pytorch", "floor"):
        return cell.flag
    past = cell.status != "ok" or cell.grad_status in ("inaccurate", "nonfinite")
    return "past" if past else "ok"


def verdict_counts(cells: Iterable[Cell]) -> dict[str, int]:
    """How many cells have each verdict, in CELL_VERDICTS' order (zeros included)."""
    counts = Counter(cell_verdict(cell) for cell in cells)
    return {verdict: counts[verdict] for verdict in CELL_VERDICTS}


def factor(cell: Cell) -> float:
    """How much worse than PyTorch a cell is: the larger of its loss and gradient ratios, row by row
    (inf: non-finite where PyTorch is finite; NaN: not compared)."""
    values = [v for v in (cell.loss_vs_pytorch, cell.grad_vs_pytorch) if not math.isnan(v)]
    return max(values, default=math.nan)


def factor_text(value: float) -> str:
    """×3.3e3, ×12, ×2.5; or NaN/Inf for a non-finite result where PyTorch's is finite."""
    if value == math.inf:
        return "NaN/Inf"
    if math.isnan(value):
        return "?"
    return f"×{value:.2g}".replace("e+0", "e").replace("e+", "e")


def display_name(impl: str) -> str:
    """A ``--impl path/module:attr,settings`` spec as screens title it: ``attr``, with its settings in
    brackets (``attr[sequence=8]``); any other name as it is (``name=`` gives a spec a name of its own)."""
    target, _, settings = impl.partition(",")
    if ":" not in target:
        return impl
    attr = target.rpartition(":")[2]
    return f"{attr}[{settings}]" if settings else attr


def implementation_name(cell: Cell) -> str:
    """The implementation as every screen names it: ``impl``, or ``impl@device`` off the CPU (a spec by its
    ``display_name``)."""
    name = display_name(cell.impl)
    return name if cell.device == "cpu" else f"{name}@{cell.device}"


@dataclass(frozen=True)
class ImplementationVerdict:
    """One implementation over every dtype and case: its most severe verdict and the figures behind it."""

    name: str
    verdict: str  # the most severe cell verdict
    counts: dict[str, int]
    worst: Cell | None  # the cell that shows it: the most worse than PyTorch, else the first with the verdict
    factor: float  # worst.factor for a worse implementation, else NaN
    is_pytorch: bool  # this is PyTorch's own kernel

    @property
    def group(self) -> str:
        return GROUPS.get(self.verdict, "fine")

    @property
    def measured(self) -> int:
        return sum(count for verdict, count in self.counts.items() if verdict != "skipped")


def _worst_cell(cells: list[Cell], verdict: str) -> Cell | None:
    chosen = [cell for cell in cells if cell_verdict(cell) == verdict]
    if not chosen:
        return None
    if verdict == "worse":
        return max(chosen, key=lambda c: (factor(c), c.worse_rows))
    if verdict in ("past", "pytorch", "floor"):
        return max(chosen, key=lambda c: c.loss_err if not math.isnan(c.loss_err) else 0.0)
    return chosen[0]


def ranked(cells: Iterable[Cell]) -> list[ImplementationVerdict]:
    """Every implementation, most severe first: by verdict (CELL_VERDICTS' order, skipped last), then the
    number of cells worse than PyTorch and the factor, then the order they were audited in."""
    by_name: dict[str, list[Cell]] = {}
    for cell in cells:
        by_name.setdefault(implementation_name(cell), []).append(cell)
    verdicts = []
    for name, own in by_name.items():
        counts = verdict_counts(own)
        verdict = next((v for v in CELL_VERDICTS if counts[v] and v != "skipped"), "skipped")
        worst = _worst_cell(own, verdict)
        top = factor(worst) if worst is not None and verdict == "worse" else math.nan
        verdicts.append(
            ImplementationVerdict(name, verdict, counts, worst, top, own[0].impl in PYTORCH_KERNELS.values())
        )
    order = {verdict: index for index, verdict in enumerate(CELL_VERDICTS)}
    return sorted(
        verdicts,
        key=lambda v: (order[v.verdict], -v.counts["worse"], -(0 if math.isnan(v.factor) else v.factor)),
    )

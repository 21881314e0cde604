"""What ``ce_audit.check`` returns: its cells, the ones that reach its ``fail_on`` level, and one line per
failing cell (or broken budget) for ``assert_ok``'s AssertionError.

A cell reaches ``fail_on`` as ``--fail-on`` judges it (ce_audit.verdict.reaches, FAIL_LEVELS), except
that a gradient that is merely inaccurate counts only with ``strict_grad`` (the elementwise rtol/atol
test fails even PyTorch's own kernel by a few ULPs in float16). A failing cell's line names the cell, its
statuses and the cause as the CLI's findings word it (ce_audit.findings.cause); at ``worse-than-pytorch``
also how far it is from PyTorch's kernel on the same inputs (the Cell's loss_vs_pytorch, grad_vs_pytorch).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ce_audit.budgets import parse_budget
from ce_audit.config import SweepConfig
from ce_audit.errors import AuditError
from ce_audit.findings import cause
from ce_audit.options import options_label
from ce_audit.printable import plural
from ce_audit.results import Cell
from ce_audit.statuses import FAILING, RANKED, Status
from ce_audit.verdict import FAIL_LEVELS, cell_status, reaches
from ce_audit.verdict_story import counts_text, verdict_document

DEFAULT_FAIL_ON = "inaccurate"
WORSE_THAN_PYTORCH = "worse-than-pytorch"
LINE_WIDTH = 120  # a failure line's width: a longer cause is cut with "…" to fit it ...
MIN_CAUSE = 56  # ... down to this many characters, however long the rest of its line is


def check_fail_on(level: str) -> None:
    """``fail_on`` must be one of FAIL_LEVELS; anything else is an AuditError."""
    if level not in FAIL_LEVELS:
        raise AuditError(f"fail_on takes one of {', '.join(FAIL_LEVELS)}, got {level!r}")


def judged(cell: Cell, strict_grad: bool) -> Cell:
    """The cell as check() judges it: a merely inaccurate gradient reads ok unless ``strict_grad``."""
    if strict_grad or cell.grad_status != Status.INACCURATE:
        return cell
    return replace(cell, grad_status=Status.OK)


def reaching(cells: Sequence[Cell], level: str, strict_grad: bool = False) -> list[Cell]:
    """The cells that reach ``level`` (ce_audit.verdict.reaches on the judged cell), in order."""
    return [cell for cell in cells if reaches(judged(cell, strict_grad), level)]


def where(cell: Cell, batch: bool = True) -> str:
    """The cell as a failure line names it: impl, dtype, device, distribution, scale, offset, vocab, the
    batch (when ``batch``: the cells differ in it) and the options that are not plain cross-entropy's."""
    text = f"{cell.impl} {cell.dtype} {cell.device} {cell.distribution} scale={cell.scale:g}"
    if cell.offset:
        text += f" offset={cell.offset:g}"
    text += f" vocab={cell.vocab}" + (f" batch={cell.batch}" if batch else "")
    label = options_label(cell)
    return text + (f" {label}" if label else "")


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut with "…"."""
    return text if len(text) <= width else text[: max(width - 1, 0)].rstrip() + "…"


def vs_pytorch(cell: Cell) -> str:
    """The side (loss or gradient) furthest from PyTorch's kernel on the same inputs, as a multiple of
    PyTorch's error ("gradient ×29.8 vs PyTorch"), or "PyTorch's loss finite" where only PyTorch's is
    finite; "" when not measured."""
    sides = [("loss", cell.loss_vs_pytorch), ("gradient", cell.grad_vs_pytorch)]
    known = [(value, side) for side, value in sides if not math.isnan(value)]
    if not known:
        return ""
    value, side = max(known, key=lambda pair: pair[0])  # the loss where both are as far
    return f"PyTorch's {side} finite" if value == math.inf else f"{side} ×{value:.3g} vs PyTorch"


def cell_line(
    cell: Cell, level: str, strict_grad: bool = False, reproducer: Path | None = None, batch: bool = True
) -> str:
    """One failing cell in one line: where, the loss status (and worst row), the gradient's status when it
    fails too, at ``worse-than-pytorch`` PyTorch's figure, the cause (cut to fit LINE_WIDTH), the saved
    reproducer."""
    relative = level == WORSE_THAN_PYTORCH
    loss_fails = cell.status in FAILING
    statuses = []
    if loss_fails or relative:
        loss = f"loss {cell.status}"
        if loss_fails and cell.status != Status.ERROR:
            loss += f", worst row {cell.worst_row}" if cell.worst_row >= 0 else ", the reduced value"
        statuses.append(loss)
    grad_failing = FAILING if strict_grad else (Status.NONFINITE, Status.ERROR)
    if cell.grad_status in grad_failing and cell.status != Status.ERROR and not relative:
        inaccurate = cell.grad_status == Status.INACCURATE
        detail = f" (max rel err {cell.grad_max_rel_err:.3g})" if inaccurate else ""
        statuses.append(f"gradient {cell.grad_status}{detail}")
    if relative:
        if cell.grad_status == Status.NONFINITE and cell.status != Status.NONFINITE:
            statuses.append("gradient nonfinite")
        statuses.append(vs_pytorch(cell))
    head = f"{where(cell, batch)}: {', '.join(status for status in statuses if status)}"
    tail = f"; reproducer: {reproducer / 'command.txt'}" if reproducer is not None else ""
    reason = cause(cell) if loss_fails else cell.error if cell.grad_status == Status.ERROR else ""
    if not reason:
        return head + tail
    room = max(LINE_WIDTH - len(head) - len(tail) - len(" — "), MIN_CAUSE)
    return f"{head} — {cut(reason, room)}{tail}"


def failure_lines(
    cells: Sequence[Cell],
    level: str = DEFAULT_FAIL_ON,
    budgets: Sequence[str] = (),
    strict_grad: bool = False,
    reproducers: dict[Cell, Path] | None = None,
) -> list[str]:
    """One line per cell that reaches ``level`` (``cell_line``), then one per broken budget; a line names
    the batch only when the cells differ in it."""
    batch = len({cell.batch for cell in cells}) > 1
    lines = [
        cell_line(cell, level, strict_grad, (reproducers or {}).get(cell), batch)
        for cell in reaching(cells, level, strict_grad)
    ]
    for budget in (parse_budget(text) for text in budgets):
        for cell in cells:
            message = budget.fails(None, cell)
            if message:
                lines.append(f"{where(cell, batch)}: {message}")
        if not any(budget.matches(cell) and cell.status != Status.SKIPPED for cell in cells):
            lines.append(f"budget {budget.text} matches no measured cell")
    return lines


@dataclass(frozen=True, repr=False)
class CheckReport:
    """The cells of one check, those reaching ``fail_on`` (``failing``), and a line per failing cell or
    broken budget (``failures``)."""

    cells: list[Cell]
    failures: list[str]
    config: SweepConfig
    seconds: float
    fail_on: str = DEFAULT_FAIL_ON
    failing: list[Cell] = field(default_factory=list)
    strict_grad: bool = False

    @property
    def ok(self) -> bool:
        """No cell reaches ``fail_on`` and every budget holds."""
        return not self.failures

    def _budget_text(self) -> str:
        broken = len(self.failures) - len(self.failing)
        return f", {broken} budget line{'s' if broken != 1 else ''} broken" if broken else ""

    def headline(self) -> str:
        """The first line of the message: "6 of 30 cells reach inaccurate" (and any broken budget lines)."""
        verb = "reaches" if len(self.failing) == 1 else "reach"
        cells = plural(len(self.cells), "cell")
        return f"{len(self.failing)} of {cells} {verb} {self.fail_on}{self._budget_text()}"

    def assert_ok(self) -> None:
        """Raise AssertionError: the headline, then one line per failing cell or broken budget; nothing
        when all held. pytest shows the caller's line, not this frame (``__tracebackhide__``)."""
        __tracebackhide__ = True
        if self.failures:
            raise AssertionError(str(self))

    def statuses(self) -> Counter[str]:
        """How many cells have each status, as this check judges them: the worse of loss and gradient (a
        merely inaccurate gradient only with ``strict_grad``)."""
        counts = Counter(
            str(cell_status(cell.status, judged(cell, self.strict_grad).grad_status)) for cell in self.cells
        )
        order = [*RANKED, Status.SKIPPED]
        return Counter(dict(sorted(counts.items(), key=lambda item: order.index(item[0]))))

    @property
    def verdict(self) -> dict[str, Any]:
        """The verdict as every screen tells it (ce_audit.verdict_story.verdict_document): the counts by
        verdict, the implementations most severe first with their line, the story's sections."""
        return verdict_document(self.cells)

    def __str__(self) -> str:
        return "\n".join([self.headline(), *(f"  {line}" for line in self.failures)])

    def __repr__(self) -> str:
        counts = ", ".join(f"{count} {status}" for status, count in self.statuses().items())
        failing = f"{len(self.failing)} failing{self._budget_text()}"
        cells = f"{len(self.cells)} cell{'s' if len(self.cells) != 1 else ''}"
        return (
            f"CheckReport({cells}: {counts_text(self.cells)}; by the tolerance {counts}; "
            f"fail_on={self.fail_on!r}: {failing})"
        )

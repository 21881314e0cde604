"""Absolute precision budgets, independent of any baseline: ``IMPL:DTYPE:METRIC<=VALUE``.

IMPL and DTYPE are names or shell-style patterns (``*``, ``numpy_*``); the operator is one of
``<= < >= >``. A budget holds when every measured cell of a matching implementation and dtype
satisfies it. Loss metrics of a `nonfinite` cell count as +inf (NaN where the exact loss is finite
is no precision at all), likewise gradient metrics of a cell whose gradient is `nonfinite`; an `error`
cell fails every budget; `skipped` cells, and gradient budgets on cells without a gradient, are not
applicable. ``status<=inaccurate`` style budgets rank ok < inaccurate < nonfinite < error.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ce_audit.dtypes import DTYPE_NAMES
from ce_audit.errors import AuditError
from ce_audit.results import Cell, measurements
from ce_audit.statuses import RANKED, Status, status_rank

LOSS_METRICS = measurements(budget="loss")
GRAD_METRICS = measurements(budget="grad")
COUNT_METRICS = measurements(budget="count")
STATUS_METRICS = measurements(budget="status")
METRICS = LOSS_METRICS + GRAD_METRICS + COUNT_METRICS + STATUS_METRICS
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}
_CONDITION = re.compile(r"^\s*([A-Za-z_]+)\s*(<=|>=|<|>)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Budget:
    """One absolute limit on a metric, for the cells of matching implementation and dtype."""

    impl: str
    dtype: str
    metric: str
    op: str
    limit: float | str
    text: str

    @property
    def name(self) -> str:
        return f"budget {self.text}"

    def matches(self, cell: Cell) -> bool:
        return fnmatch.fnmatchcase(cell.impl, self.impl) and fnmatch.fnmatchcase(cell.dtype, self.dtype)

    def _value(self, cell: Cell) -> float | str | None:
        """The value to compare, or None when the budget does not apply to this cell."""
        if self.metric in STATUS_METRICS:
            status: str = getattr(cell, self.metric)
            return status if status_rank(status) is not None else None
        if self.metric.startswith("grad"):
            if status_rank(cell.grad_status) is None:
                return None
            if cell.grad_status == Status.NONFINITE and self.metric in GRAD_METRICS:
                return math.inf
        elif cell.status == Status.NONFINITE and self.metric in LOSS_METRICS:
            return math.inf
        return float(getattr(cell, self.metric))

    def fails(self, baseline: Cell | None, current: Cell | None, missing: Collection[str] = ()) -> str | None:
        """A message when the current cell breaks the budget; None when it holds or does not apply.

        ``missing``: the measurement columns the current audit's summary.csv lacks (an older version's).
        """
        if current is None or not self.matches(current) or current.status == Status.SKIPPED:
            return None
        if current.status == Status.ERROR:
            return f"{self.text}: the implementation failed ({current.error})"
        if self.metric in missing:
            return f"{self.text}: summary.csv has no column {self.metric!r}"
        value = self._value(current)
        if value is None:
            return None
        if isinstance(value, str):
            rank, limit = status_rank(value), status_rank(str(self.limit))
            assert rank is not None and limit is not None
            held = OPERATORS[self.op](rank, limit)
            shown = value
        else:
            held = not math.isnan(value) and OPERATORS[self.op](value, float(self.limit))
            shown = (
                "nonfinite rows" if value == math.inf and self.metric not in COUNT_METRICS else f"{value:.4g}"
            )
        limit_text = self.limit if isinstance(self.limit, str) else f"{self.limit:g}"
        return None if held else f"{self.metric} = {shown}, budget {self.op} {limit_text}"


def parse_budget(text: str) -> Budget:
    """``"fused:float16:max_ulp<=2"`` → Budget; anything else raises AuditError with the expected form."""
    form = "expected IMPL:DTYPE:METRIC<=VALUE, e.g. fused:float16:max_ulp<=2"
    parts = text.strip().rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise AuditError(f"budget {text!r}: {form}")
    impl, dtype, condition = parts
    match = _CONDITION.match(condition)
    if not match:
        raise AuditError(f"budget {text!r}: {form}")
    metric, op, raw = match.groups()
    if metric not in METRICS:
        raise AuditError(f"budget {text!r}: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if not any(c in dtype for c in "*?[") and dtype not in DTYPE_NAMES:
        raise AuditError(
            f"budget {text!r}: unknown dtype {dtype!r}; choose from {', '.join(DTYPE_NAMES)} or *"
        )
    limit: float | str
    if metric in STATUS_METRICS:
        if raw not in RANKED:
            raise AuditError(f"budget {text!r}: a status limit is one of {', '.join(RANKED)}")
        limit = raw
    else:
        try:
            limit = float(raw)
        except ValueError:
            raise AuditError(f"budget {text!r}: limit {raw!r} is not a number") from None
        if math.isnan(limit) or limit < 0:
            raise AuditError(f"budget {text!r}: limit must be a number ≥ 0")
    return Budget(impl.strip(), dtype.strip(), metric, op, limit, text.strip())

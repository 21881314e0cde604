"""What broke where, in words: one line per implementation that is not ok somewhere."""

from __future__ import annotations

import math
from collections import defaultdict

from ce_audit.dtypes import float_format
from ce_audit.engine import SummaryRow
from ce_audit.metrics import worst_status

EPSILON_CAP = -math.log(1e-7)


def _where(row: SummaryRow) -> str:
    text = f"scale {row.scale:g}"
    if row.offset:
        text += f", offset {row.offset:g}"
    return f"{text} ({row.distribution})"


def cause(row: SummaryRow) -> str:
    """A likely cause for a row's status, from the case's extremes and the dtype's thresholds."""
    fmt = float_format(row.dtype)
    if row.status == "error":
        return row.error
    if row.status == "nonfinite":
        kind = "NaN" if row.nan_rows else "Inf"
        overflow = row.max_logit > fmt.exp_overflow
        underflow = row.max_reference > -fmt.exp_underflow  # p_y = exp(−loss) below the smallest subnormal
        overflow_text = f"exp overflows above {fmt.exp_overflow:.2f} (max logit {row.max_logit:.4g})"
        underflow_text = f"p_y underflows to 0 below exp({fmt.exp_underflow:.1f}), then log(0) = −inf"
        if overflow and underflow:
            return f"{kind}: {overflow_text}, or {underflow_text}"
        if overflow:
            return f"{kind}: {overflow_text}"
        if underflow:
            return f"{kind}: {underflow_text}"
        return f"{kind} where the exact loss is finite"
    if row.status == "inaccurate":
        if abs(row.max_value - EPSILON_CAP) < 0.1 and row.max_reference > EPSILON_CAP + 0.1:
            return f"loss capped near −log(1e-7) ≈ {EPSILON_CAP:.1f} (exact up to {row.max_reference:.3g})"
        if row.offset and abs(row.offset) > 8 * max(abs(row.scale), 1.0):
            spacing = 2.0 ** (math.floor(math.log2(abs(row.offset))) - fmt.precision + 1)
            return (
                f"cancellation in lse − z_y under offset {row.offset:g} "
                f"(spacing {spacing:.3g} there; max {row.max_ulp:.3g} ULP)"
            )
        return f"max {row.max_ulp:.3g} ULP ({math.log2(1 + row.max_ulp):.1f} bits) past tolerance"
    return ""


def _first(rows: list[SummaryRow]) -> SummaryRow:
    return min(rows, key=lambda r: (abs(r.offset), abs(r.scale), r.distribution))


def findings(rows: list[SummaryRow]) -> list[str]:
    """Lines like "naive: float16 Inf from scale 10 — exp overflows above 11.09; ..."."""
    groups: dict[tuple[str, str], dict[str, list[SummaryRow]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for row in rows:
        impl = row.impl if row.device == "cpu" else f"{row.impl}@{row.device}"
        if impl not in order:
            order.append(impl)
        groups[(impl, row.dtype)][row.status].append(row)
    lines = []
    for impl in order:
        parts = []
        for (name, dtype), by_status in groups.items():
            if name != impl:
                continue
            status = worst_status([s for s in by_status if s != "ok"] or ["ok"])
            if status in ("ok", "skipped"):
                continue
            first = _first(by_status[status])
            capped = [r for r in by_status[status] if cause(r).startswith("loss capped")]
            first = _first(capped) if capped else first
            label = {"nonfinite": "", "inaccurate": "inaccurate ", "error": "error "}[status]
            reason = cause(first)
            if status == "nonfinite":
                kind, _, reason = reason.partition(": ")
                label = f"{kind} "
            parts.append(f"{dtype} {label}from {_where(first)} — {reason}")
        if parts:
            lines.append(f"{impl}: " + "; ".join(parts))
    lines += _behaviour(rows)
    return lines


def _behaviour(rows: list[SummaryRow]) -> list[str]:
    """Lines for implementations that return a mean or write into their input."""
    means = list(dict.fromkeys(row.impl for row in rows if row.value_kind == "mean"))
    writers = list(dict.fromkeys(row.impl for row in rows if row.wrote_input))
    lines = [
        f"{name}: returns a 0-d mean — audited against the exact mean over the batch (per-row columns: n/a)"
        for name in means
    ]
    lines += [
        f"{name}: writes into its input buffer — it got a private copy, nothing else was affected"
        for name in writers
    ]
    return lines

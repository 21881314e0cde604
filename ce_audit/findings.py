"""Every finding, in words: one line per implementation that is not ok somewhere, with the likely cause;
and the notes that are not failures."""

from __future__ import annotations

import math
import re
from collections import defaultdict

from ce_audit.dtypes import FORMATS, FloatFormat, float_format
from ce_audit.options import options_label
from ce_audit.printable import plural
from ce_audit.results import Cell
from ce_audit.statuses import worst_status
from ce_audit.verdict import PYTORCH_KERNELS

EPSILON_CAP = -math.log(1e-7)
# Constants a loss is commonly clipped at: −log(c) for an epsilon c inside the log or a clamp of p.
KNOWN_EPSILONS = {
    "1e-7": 1e-7, "1e-8": 1e-8, "1e-6": 1e-6, "1e-9": 1e-9, "1e-10": 1e-10, "1e-12": 1e-12, "1e-15": 1e-15,
    "1e-7 as float16 (2^-23)": 2.0**-23,
    "finfo(float16).eps": 2.0**-10, "finfo(bfloat16).eps": 2.0**-7, "finfo(float32).eps": 2.0**-23,
    "finfo(float64).eps": 2.0**-52, "finfo(float16).tiny": 2.0**-14, "finfo(float32).tiny": 2.0**-126,
    "2^-24, float16's smallest subnormal: p_y underflows there": 2.0**-24,
    "1/256: a bfloat16 sum stuck at 256, where adding 1 no longer changes it": 2.0**-8,
    "1/2048: a float16 sum stuck at 2048, where adding 1 no longer changes it": 2.0**-11,
}  # fmt: skip


def cap_text(level: float, exact: float) -> str:
    """A loss capped at ``level``, named as −log(c) when c is a known epsilon (within 1 %)."""
    epsilon = math.exp(-level)
    named = next((name for name, c in KNOWN_EPSILONS.items() if abs(epsilon / c - 1) < 0.01), None)
    what = f"−log({named})" if named else f"−log({epsilon:.3g})"
    return f"loss capped near {what} ≈ {level:.1f} (at {level:.4g}; exact up to {exact:.3g})"


def where(row: Cell) -> str:
    """Where a cell is, in words: "scale 10, offset 100, ls=0.1 (normal)"."""
    text = f"scale {row.scale:g}"
    if row.offset:
        text += f", offset {row.offset:g}"
    label = options_label(row)
    if label:
        text += f", {label}"
    if row.options.reduction != "none":
        text += f" (batch {row.batch})"
    return f"{text} ({row.distribution})"


# causes inferred from the case's parameters alone (not observed): shown as "likely: …" where no trace
# (ce_audit.trace) observed the cause
_GUESSES = re.compile(
    r"^(exp overflows|p_y underflows|Σ_k exp|the label-smoothing sum|0 · log p|w_k · log p_k|σ\(z\) rounds|"
    r"softcap turns|log clamped|lse − z_y cancels|cancellation in|the \w+ (sum|.*mean).* passes)"
)


def cause(row: Cell) -> str:
    """The cause of a row's status: what its trace observed (``traced_cause``: the op and line where a
    value went non-finite or the error entered, or that the error is what the dtype allows), else one
    inferred from the case's extremes and the dtype's thresholds, marked "likely: " where it is a guess."""
    capped = row.status == "inaccurate" and not math.isnan(row.capped_at)
    if row.traced_cause and not capped:
        if row.status == "nonfinite" and row.nonfinite_origin:
            return f"{'NaN' if row.nan_rows else 'Inf'}: {row.traced_cause}"
        if row.status == "inaccurate":
            infinite = row.finite_where_infinite
            where = f"; finite in {infinite} rows where the exact loss is +inf" if infinite else ""
            if row.lower_precision and row.lower_precision == row.dtype:  # a wider dtype returned
                returned = f"returns {row.value_dtype} with {row.dtype}'s error"
                size = f"max {row.max_ulp_returned:.3g} ULP of {row.value_dtype}"
                return f"{returned} ({size}): {row.traced_cause}"
            return row.traced_cause + where
    inferred = _inferred_cause(row)
    kind, colon, reason = inferred.partition(": ") if row.status == "nonfinite" else ("", "", inferred)
    if _GUESSES.match(reason):
        return f"{kind}{colon}likely: {reason}"
    return inferred


def _inferred_cause(row: Cell) -> str:
    """A likely cause for a row's status, from the case's extremes and the dtype's thresholds."""
    fmt, options = float_format(row.dtype), row.options
    if row.status == "error":
        return row.error
    if row.status == "nonfinite":
        kind = "NaN" if row.nan_rows else "Inf"
        reduced = _reduction_cause(row, fmt)
        if reduced:
            return f"{kind}: {reduced}"
        if options.label_smoothing and row.vocab * math.log(max(row.vocab, 2)) > fmt.max:
            return f"{kind}: the label-smoothing sum Σ_k −log p_k over {row.vocab} classes passes {fmt.max:g}"
        if options.targets == "probs" and options.mask_fraction and row.nan_rows:
            return (
                f"{kind}: 0 · log p = 0 · (−inf) where a zero target probability meets a −inf (masked) logit"
            )
        zero_weights = options.weights == "zero-on-target" and options.label_smoothing
        if zero_weights and options.mask_fraction and row.nan_rows:
            return f"{kind}: w_k · log p_k = 0 · (−inf) where a zero class weight meets a −inf (masked) logit"
        if options.loss == "binary":
            return f"{kind}: σ(z) rounds to 0 or 1 in {row.dtype}, then log(0) = −inf and 0 · log(0) = NaN"
        overflow = row.max_logit > fmt.exp_overflow
        underflow = row.max_reference > -fmt.exp_underflow  # p_y = exp(−loss) below the smallest subnormal
        overflow_text = f"exp overflows above {fmt.exp_overflow:.2f} (max logit {row.max_logit:.4g})"
        underflow_text = f"p_y underflows to 0 below exp({fmt.exp_underflow:.1f}), then log(0) = −inf"
        if overflow and underflow:
            return f"{kind}: {overflow_text}, or {underflow_text}"
        if overflow:
            return f"{kind}: {overflow_text}"
        if row.max_logit + math.log(max(row.vocab, 1)) > fmt.exp_overflow:
            where = f"over {row.vocab} classes passes {fmt.max:g} (max logit {row.max_logit:.3g})"
            return f"{kind}: Σ_k exp(z_k) {where}"
        if underflow:
            return f"{kind}: {underflow_text}"
        return f"{kind}: non-finite where the exact loss is finite"
    if row.status == "inaccurate":
        if row.lower_precision and row.lower_precision == row.dtype:  # a wider dtype returned
            return (
                f"returns {row.value_dtype} with {row.dtype}'s error: max {row.max_ulp_returned:.3g} ULP "
                f"of {row.value_dtype} (the {row.value_dtype} floor is ½)"
            )
        if row.lower_precision:
            return (
                f"computed in {row.lower_precision}: every value lies on the {row.lower_precision} grid and "
                f"the errors are its size (max {row.max_ulp:.3g} ULP of {row.dtype})"
            )
        if row.finite_where_infinite:
            if options.softcap and options.mask_fraction:
                cap = options.softcap
                return f"finite: softcap turns −inf masks into −{cap:g} where the exact loss is +inf"
            return f"finite in {plural(row.finite_where_infinite, 'row')} where the exact loss is +inf"
        if not math.isnan(row.capped_at):
            return cap_text(row.capped_at, row.max_reference)
        reduced = _reduction_cause(row, fmt)
        if reduced:
            return reduced
        if options.softcap and options.mask_fraction:
            return f"softcap turns −inf masks into −{options.softcap:g}: masked classes get probability again"
        if options.loss == "binary" and abs(row.max_value - 100) < 0.5 and row.max_reference > 100.5:
            return (
                f"log clamped at −100 (nn.BCELoss): loss capped at 100 (exact up to {row.max_reference:.3g})"
            )
        if row.margin is not None and row.margin > 0 and options.loss == "ce":
            return (
                f"lse − z_y cancels in confident rows (target {row.margin:g} above the rest: "
                f"the loss is below the spacing of z_y; max {row.max_ulp:.3g} ULP)"
            )
        if row.offset and abs(row.offset) > 8 * max(abs(row.scale), 1.0):
            spacing = 2.0 ** (math.floor(math.log2(abs(row.offset))) - fmt.precision + 1)
            return (
                f"cancellation in lse − z_y under offset {row.offset:g} "
                f"(spacing {spacing:.3g} there; max {row.max_ulp:.3g} ULP)"
            )
        return f"max {row.max_ulp:.3g} ULP ({math.log2(1 + row.max_ulp):.1f} bits) past tolerance"
    return ""


def _reduction_cause(row: Cell, fmt: FloatFormat) -> str | None:
    """A sum (or the sum inside a mean) past the dtype's largest finite value, or an accumulation drift."""
    options = row.options
    mean_of_rows = options.reduction == "none" and row.value_kind == "mean"  # a 0-d mean returned by choice
    if options.reduction == "none" and not mean_of_rows:
        return None
    total = row.max_reference * (row.batch if options.reduction == "mean" or mean_of_rows else 1)
    if total > fmt.max:
        what = (
            "sum"
            if options.reduction == "sum"
            else (
                f"sum inside the {'0-d ' if mean_of_rows else ''}mean "
                f"(≈ {row.batch} × {row.max_reference:.3g})"
            )
        )
        return f"the {row.dtype} {what} passes {fmt.max:g}"
    if row.status == "inaccurate":
        what = "0-d mean" if mean_of_rows else options.reduction
        return f"the {what} is {row.max_ulp:.3g} ULP off the exact {what.removeprefix('0-d ')}"
    return None


def _first(rows: list[Cell]) -> Cell:
    return min(rows, key=lambda r: (abs(r.offset), abs(r.scale), r.distribution, len(options_label(r))))


MAX_CAUSES = 4  # per implementation and dtype, in a sweep over several option combinations


def _part(dtype: str, status: str, row: Cell) -> str:
    label = {"nonfinite": "", "inaccurate": "inaccurate ", "error": "error "}[status]
    reason = cause(row)
    if status == "nonfinite":
        kind, _, reason = reason.partition(": ")
        label = f"{kind} "
    return f"{dtype} {label}from {where(row)} — {reason}"


def _cause_key(row: Cell) -> str:
    """A cause with its numbers removed: rows that broke for the same reason share it."""
    return row.status + re.sub(r"[-+]?\d[\d.e+-]*", "#", cause(row))


def findings(rows: list[Cell]) -> list[str]:
    """Lines like "naive: float16 Inf from scale 10 — exp overflows above 11.09; ...".

    One part per implementation and dtype (its worst status, mildest case); when the sweep covers several
    option combinations, one part per distinct cause instead (worst first, at most MAX_CAUSES).
    """
    groups: dict[tuple[str, str], dict[str, list[Cell]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for row in rows:
        impl = row.impl if row.device == "cpu" else f"{row.impl}@{row.device}"
        if impl not in order:
            order.append(impl)
        groups[(impl, row.dtype)][row.status].append(row)
    several = len({options_label(row) for row in rows}) > 1
    relative = relative_to_pytorch(rows)
    lines = []
    for impl in order:
        parts = []
        for (name, dtype), by_status in groups.items():
            if name != impl:
                continue
            status = worst_status([s for s in by_status if s != "ok"] or ["ok"])
            if status in ("ok", "skipped"):
                continue
            if not several:
                capped = [r for r in by_status[status] if cause(r).startswith("loss capped")]
                parts.append(_part(dtype, status, _first(capped or by_status[status])))
                continue
            by_cause: dict[str, list[Cell]] = defaultdict(list)
            for bad in ("error", "nonfinite", "inaccurate"):
                for row in by_status.get(bad, []):
                    by_cause[_cause_key(row)].append(row)
            for key in list(by_cause)[:MAX_CAUSES]:
                first = _first(by_cause[key])
                parts.append(_part(dtype, first.status, first))
        note = relative[impl.split("@")[0]] if impl.split("@")[0] in relative and "@" not in impl else ""
        if parts or note:
            lines.append(f"{impl}: " + "; ".join(parts) + (f" [{note}]" if parts and note else note))
    return lines + notes(rows)


def notes(rows: list[Cell]) -> list[str]:
    """What is not a failure but a user should know: notes on expected values (PyTorch's NaN conventions,
    correct overflow), conventions, 0-d means, narrower results, writes into the input."""
    return expected_values(rows) + conventions(rows) + _behaviour(rows)


def expected_values(rows: list[Cell]) -> list[str]:
    """One line per note (e.g. PyTorch's expected NaN): which cells, and that they count as ok."""
    grouped: dict[str, list[Cell]] = defaultdict(list)
    for row in rows:
        if row.notes:
            grouped[row.notes].append(row)
    lines = []
    for note, noted in grouped.items():
        impls = ", ".join(dict.fromkeys(r.impl for r in noted))
        dtypes = ", ".join(dict.fromkeys(r.dtype for r in noted))
        labels = list(dict.fromkeys(f"{options_label(r)} (batch {r.batch})" for r in noted))
        where = "; ".join(labels[:3]) + (f"; {len(labels) - 3} more" if len(labels) > 3 else "")
        statuses = ", ".join(sorted({r.status for r in noted}))
        cells = plural(len(noted), "cell")
        lines.append(f"{note} — {impls} in {cells} ({dtypes}: {where}): status {statuses}")
    return lines


def _factor(row: Cell) -> float:
    return max((v for v in (row.loss_vs_pytorch, row.grad_vs_pytorch) if not math.isnan(v)), default=math.nan)


def relative_to_pytorch(rows: list[Cell]) -> dict[str, str]:
    """Per implementation, in words: the cells worse than PyTorch's kernel on the same inputs (and by how
    much), or, for the kernel itself (``fused``), where it is flagged — what the others are judged by."""
    notes = {}
    for impl in dict.fromkeys(row.impl for row in rows):
        worse = [r for r in rows if r.impl == impl and r.flag == "worse"]
        own = [
            r
            for r in rows
            if r.impl == impl and impl in PYTORCH_KERNELS.values() and r.flag in ("pytorch", "floor")
        ]
        if worse:
            top = max(worse, key=_factor)
            by = "non-finite where PyTorch is finite" if _factor(top) == math.inf else f"×{_factor(top):.3g}"
            which = "gradient" if top.grad_vs_pytorch >= top.loss_vs_pytorch else "loss"
            notes[impl] = (
                f"worse than PyTorch in {plural(len(worse), 'cell')}, most at {top.dtype} {where(top)}: "
                f"{which} {by}"
            )
        elif own:
            dtypes = ", ".join(dict.fromkeys(r.dtype for r in own))
            notes[impl] = (
                f"this is PyTorch's own kernel, flagged in {plural(len(own), 'cell')} ({dtypes}); "
                "=pt cells behave the same"
            )
    return notes


def conventions(rows: list[Cell]) -> list[str]:
    """Implementations that return a finite value where PyTorch's convention is NaN: not a failure."""
    lines = []
    for impl in dict.fromkeys(row.impl for row in rows if row.convention):
        first = next(row for row in rows if row.impl == impl and row.convention)
        count = sum(1 for row in rows if row.impl == impl and row.convention)
        lines.append(f"{impl}: convention, not a failure — {first.convention} ({plural(count, 'cell')})")
    return lines


def narrower_results(rows: list[Cell]) -> list[str]:
    """Implementations that return a dtype narrower than their input's: the result cannot hold the loss
    to the input's precision, whatever the arithmetic."""
    narrower: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        returned, audited = FORMATS.get(row.value_dtype), FORMATS.get(row.dtype)
        if returned and audited and returned.precision < audited.precision:
            pair = f"{row.value_dtype} for {row.dtype} inputs"
            if pair not in narrower[row.impl]:
                narrower[row.impl].append(pair)
    return [
        f"{impl}: returns a narrower dtype than its input ({', '.join(pairs)}) — the loss is rounded "
        "to the narrower format"
        for impl, pairs in narrower.items()
    ]


def _behaviour(rows: list[Cell]) -> list[str]:
    """Lines for implementations that return a mean or write into their input."""
    means = list(dict.fromkeys(row.impl for row in rows if row.value_kind == "mean"))
    writers = list(dict.fromkeys(row.impl for row in rows if row.wrote_input))
    lines = [
        f"{name}: returns a 0-d mean — audited against the exact mean over the rows not ignored "
        "(per-row columns: n/a)"
        for name in means
    ]
    lines += narrower_results(rows)
    lines += [
        f"{name}: writes into its input buffer — it got a private copy, nothing else was affected"
        for name in writers
    ]
    return lines


def worst_finding(rows: list[Cell]) -> str:
    """One implementation's worst finding in words: its worst loss status, at the mildest case that shows it
    ("float16 NaN from scale 10 (normal) — exp overflows …"); for a loss that holds, the gradient's; "" when
    every measured cell is ok."""
    status = worst_status([row.status for row in rows if row.status in ("inaccurate", "nonfinite", "error")])
    if status in ("inaccurate", "nonfinite", "error"):
        bad = [row for row in rows if row.status == status]
        capped = [row for row in bad if cause(row).startswith("loss capped")]
        row = _first(capped or bad)
        return _part(row.dtype, status, row)
    bad_grad = [row for row in rows if row.grad_status in ("inaccurate", "nonfinite")]
    if not bad_grad:
        return ""
    grad = worst_status(row.grad_status for row in bad_grad)
    row = _first([row for row in bad_grad if row.grad_status == grad])
    dtypes = ", ".join(dict.fromkeys(r.dtype for r in bad_grad))
    word = "non-finite" if grad == "nonfinite" else "past tolerance"
    observed = f" — {row.traced_cause}" if row.traced_cause else ""  # what its trace saw (ce_audit.trace)
    cells = plural(len(bad_grad), "cell")
    return f"gradient {word} in {cells} ({dtypes}), from {row.dtype} {where(row)}{observed}"

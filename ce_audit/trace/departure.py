"""Where a formula leaves the exact values: the op that takes in a known exact quantity and gives out none.

A result far from the exact loss whose float64 shadow computes the same value (an extra term, a wrong
denominator, chunk means added up) has no op that brings in rounding error. Its place is found by value:
the float64 shadow values of the forward ops with at most one value per traced row (``Trace.values``) are
compared with what the reference knows exactly for the traced rows — the per-row losses ℓ_i (0 on ignored
rows), those of the counted rows alone, Σ_i ℓ_i, the reduced loss, and, over each run of consecutive rows as
long as an op's input has rows (a chunk), the run's losses, their sum and their mean. From the result, the
dataflow is walked back through the ops whose value matches none of them; among those, the ones that take in
a matching value are where the formula departs: the one that took in the quantity closest to the result
(the reduced loss, then Σ ℓ, then ℓ, then a chunk's), the first of them in the order they ran, is named, with
what went in, what came out and what the exact loss is.

**Equal** means |v − k| ≤ ``EQUAL`` · max(|k|, 1) in every element, EQUAL = 1e-9. The shadow is the same
formula in float64 on the quantized inputs, the reference the exact value on them: they differ by float64
rounding only — at most 1.6e-13 relative on the gallery's fixed twins, the worst under a common offset of
1e4, where the float64 lse − z_y cancels (tests/test_trace.py checks 1e-11) — so EQUAL leaves a margin of
about 6000 above it, and stays 950 times below the smallest gap the formula path looks at (``FORMULA_GAP`` = 8
ε of float32, 9.5e-7): a result that far from the exact value never matches. Chunks are matched only for
ops whose inputs have that many rows, and a value that equals a known value it took in keeps its name (an
accumulator that starts at 0 + the first chunk's mean). Values that are 0 throughout match nothing (no
evidence: an ignored row's loss, a fresh accumulator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ce_audit.trace.records import Origin, Trace

EQUAL = 1e-9  # |v − k| ≤ EQUAL · max(|k|, 1): the same value (module docstring)
_ALONE = 1e-9  # relative spread under which out / in is one ratio (the shadow's own rounding: ~1e-16)


@dataclass(frozen=True)
class Known:
    """A quantity the reference knows exactly: its words, its values, and how close it is to the result
    (``rank``: 4 the reduced loss, 3 Σ ℓ, 2 ℓ, 1 a chunk's)."""

    words: str
    values: np.ndarray
    rank: int

    @property
    def plural(self) -> bool:
        return self.values.size > 1


def _equal(value: np.ndarray, exact: np.ndarray, tolerance: float = EQUAL) -> bool:
    if value.shape != exact.shape or not np.isfinite(exact).all() or not exact.any():
        return False
    with np.errstate(invalid="ignore"):
        return bool((np.abs(value - exact) <= tolerance * np.maximum(np.abs(exact), 1.0)).all())


class Exact:
    """The exact quantities of the traced rows (module docstring), matched against an op's values."""

    def __init__(self, per_row: np.ndarray, reduced: np.ndarray, valid: np.ndarray, rows: Sequence[int],
                 lengths: set[int], weighted: bool = False) -> None:  # fmt: skip
        self.per_row = np.asarray(per_row, dtype=np.float64)
        self.rows, self.valid = list(rows), valid
        counted = int(valid.sum())
        self.words = "the exact loss"  # what the result should be, in words
        if reduced.size == 1 and self.per_row.size > 1:
            self.words += f" (their {'weighted ' if weighted else ''}mean over the {counted} counted rows)"
        self.fixed = [Known("the exact per-row losses", self.per_row, 2)]
        if counted < valid.size:
            counted_rows = Known(f"the exact losses of the {counted} counted rows", self.per_row[valid], 2)
            self.fixed.append(counted_rows)
        self.fixed.append(Known("the exact sum of the per-row losses", np.array([self.per_row.sum()]), 3))
        if reduced.size == 1 and self.per_row.size > 1:
            self.fixed.append(Known("the exact loss", np.asarray(reduced, dtype=np.float64).reshape(1), 4))
        self.lengths = {n for n in lengths if 1 < n < self.per_row.size}

    def _runs(self, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per run of ``length`` consecutive rows: its losses, their sum, their mean over its counted rows."""
        windows = np.lib.stride_tricks.sliding_window_view(self.per_row, length)
        counts = np.lib.stride_tricks.sliding_window_view(self.valid, length).sum(axis=1)
        sums = windows.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return windows, sums, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

    def _run_words(self, start: int, length: int) -> str:
        return f"rows {self.rows[start]}–{self.rows[start + length - 1]}"

    def match(self, value: np.ndarray, lengths: set[int]) -> Known | None:
        """The exact quantity ``value`` equals, or None; a chunk's only for chunks as long as ``lengths``
        (the leading sizes of the op's inputs)."""
        value = np.ravel(np.asarray(value, dtype=np.float64))
        for known in self.fixed:
            if _equal(value, known.values):
                return known
        for length in sorted(lengths & self.lengths):
            windows, sums, means = self._runs(length)
            if value.size == length:
                close = np.abs(windows - value) <= EQUAL * np.maximum(np.abs(windows), 1.0)
                hits = np.flatnonzero(close.all(axis=1) & windows.any(axis=1))
                if hits.size:
                    words = f"the exact losses of {self._run_words(int(hits[0]), length)}"
                    return Known(words, windows[hits[0]].copy(), 1)
            if value.size == 1:
                for kind, totals in (("sum", sums), ("mean", means)):
                    with np.errstate(invalid="ignore"):
                        close = np.abs(totals - value[0]) <= EQUAL * np.maximum(np.abs(totals), 1.0)
                    hits = np.flatnonzero(close & (totals != 0))
                    if hits.size:
                        words = f"the exact {kind} of the losses of {self._run_words(int(hits[0]), length)}"
                        return Known(words, totals[hits[0] : hits[0] + 1].copy(), 1)
        return None


def _ratio(out: np.ndarray, base: np.ndarray) -> float | None:
    """out / base where it is one number over every element (None otherwise)."""
    if out.shape != base.shape or not (base != 0).all():
        return None
    ratios = out / base
    spread = float(np.ptp(ratios)) if ratios.size > 1 else 0.0
    return float(ratios[0]) if spread <= _ALONE * abs(float(ratios[0])) else None


def _scaled(ratio: float, pronoun: str) -> str:
    if ratio and abs(ratio) < 1 and abs(1 / ratio - round(1 / ratio)) < 1e-9 * abs(1 / ratio):
        return f"{pronoun} divided by {round(1 / ratio)}"
    return f"{ratio:.4g} × {pronoun}"


def _relation(out: np.ndarray, base: np.ndarray, pronoun: str) -> str:
    """``out`` in words of ``base``: a multiple of it, or it plus a term."""
    ratio = _ratio(out, base)
    if ratio is not None:
        return _scaled(ratio, pronoun)
    term = out - base
    top = int(np.argmax(np.abs(term)))
    share = abs(term[top]) / max(abs(base[top]), 1e-300)
    sign = "plus" if term[top] >= 0 else "minus"
    return f"{pronoun} {sign} a term of up to {abs(term[top]):.3g} ({share:.1%} of {pronoun})"


_COMBINED = {"aten.add": "their sum", "aten.add_": "their sum", "aten.sub": "their difference",
             "aten.mul": "their product", "aten.div": "their quotient"}  # fmt: skip


def _why(op_name: str, went_in: list[Known], out: np.ndarray, exact: np.ndarray,
         result: np.ndarray | None, all_known: bool, expected_words: str) -> str:  # fmt: skip
    """What went in, what came out, what the exact loss is, in words."""
    first = max(went_in, key=lambda known: known.rank)
    pronoun = "them" if first.plural else "it"
    if all_known and len(went_in) > 1 and op_name in _COMBINED:
        came = _COMBINED[op_name]
    else:
        came = _relation(out, first.values, pronoun) if out.size == first.values.size else "no exact quantity"
    text = f"takes in {' and '.join(known.words for known in went_in)} and gives {came}"
    if exact.size == first.values.size and first.rank < 4:
        if _equal(first.values, exact):
            text += f", while {'they are' if first.plural else 'it is'} already {expected_words}"
        elif len(went_in) == 1:
            text += f", while {expected_words} is {_relation(exact, first.values, pronoun)}"
    text += ": the formula departs from the exact values here"
    if result is not None and result.size == exact.size:
        ratio = _ratio(result, exact)
        if ratio is not None:
            text += f" (the result is {ratio:.4g} × the exact loss)"
        else:
            relative = np.max(np.abs(result - exact) / np.maximum(np.abs(exact), 1e-300))
            text += f" (the result is up to {relative:.3g} relative from the exact loss)"
    return text


def departure(trace: Trace, exact: Exact, expected: np.ndarray) -> Origin | None:
    """The op where the formula leaves the exact values (module docstring), or None: the result matches
    an exact quantity, or no op on its way takes one in."""
    ops, feeds, values = trace.ops, trace.feeds, trace.values
    final = trace.loss_op
    if final < 0 or final not in values or len(feeds) != len(ops):
        return None
    known: dict[int, Known | None] = {}
    for index in sorted(values):  # in the order they ran: an op that passes a known value on keeps it
        value = values[index]
        came_in = [known.get(p) for p in feeds[index] if p >= 0]
        kept = next((k for k in came_in if k is not None and _equal(np.ravel(value), k.values)), None)
        lengths = {shape[0] for shape in ops[index].shapes if shape}
        known[index] = kept or exact.match(value, lengths)
    if known[final] is not None:
        return None
    ways, stack = set(), [final]  # the ops that reach the result through unmatched values only
    while stack:
        index = stack.pop()
        if index < 0 or index in ways or known.get(index) is not None:
            continue
        ways.add(index)
        stack += list(feeds[index])
    found = []
    for index in sorted(ways):
        went_in = [known[p] for p in dict.fromkeys(feeds[index]) if p >= 0 and known.get(p) is not None]
        if went_in and index in values:
            found.append((-max(k.rank for k in went_in), index, went_in))
    if not found:
        return None
    _, index, went_in = min(found, key=lambda item: item[:2])
    op = ops[index]
    all_known = all(p >= 0 and known.get(p) is not None for p in feeds[index])
    result = np.ravel(values[final])
    why = _why(op.name, went_in, np.ravel(values[index]), np.ravel(expected), result, all_known, exact.words)
    return Origin(op.name, op.line, why, op.index)

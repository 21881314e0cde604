"""A log-sum-exp shifted by something other than its row maximum: the op that changed the shift is named.

lse(x) = s + log Σ_k exp(x_k − s) is exact for any s, but only s = max_k x_k keeps the largest term at
exp(0) = 1: shifted by a value far above the maximum (a maximum clamped from below, on a row far below 0),
every exp(x_k − s) of the row underflows, the sum is 0 and log(0) = −inf. When the non-finite origin is a
log of 0 whose zeros come from an exp that made whole rows 0 (``OpRecord.zero_rows``), and that exp's
argument is x − s, s is walked back through the ops with one floating input (views, a clamp) to a max of
the same x. The first op on the way whose output differs from its input on the rows that went non-finite
changed the shift; it is named instead of the log, with the values that went in and came out. Where the
shift is the row maximum itself (the exps underflowed because the row's values are spread past the dtype's
range), or s comes from anything else, the log stays the origin. The values compared are the ops' own
(``TorchTracer.small``), not their shadows: this needs no shadow execution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ce_audit.trace.records import OpRecord, Origin

ROW_MAXIMA = frozenset({"aten.max", "aten.amax"})
_LONGEST = 8  # ops between the row maximum and the shift


def _underflowed_exp(ops: Sequence[OpRecord], feeds: Sequence[tuple[int, ...]], start: int) -> int:
    """The nearest exp upstream of ``start`` that made whole rows 0 (-1: none)."""
    frontier, seen = [start], set()
    for _ in range(_LONGEST):
        ahead = []
        for index in frontier:
            for producer in feeds[index]:
                if producer < 0 or producer in seen:
                    continue
                seen.add(producer)
                if ops[producer].zero_rows:
                    return producer
                ahead.append(producer)
        frontier = ahead
    return -1


def _shift_chain(ops: Sequence[OpRecord], feeds: Sequence[tuple[int, ...]], ids: Sequence[tuple[int, ...]],
                 sub: int) -> list[int]:  # fmt: skip
    """From the shift s of ``sub`` (x − s) back to a row maximum of the same x, latest first ([]: none)."""
    chain, at = [], feeds[sub][1]
    while at >= 0 and len(chain) < _LONGEST:
        chain.append(at)
        if ops[at].name in ROW_MAXIMA and ids[at][:1] == ids[sub][:1]:
            return chain
        if len(feeds[at]) != 1:
            return []
        at = feeds[at][0]
    return []


def shifted_origin(
    ops: Sequence[OpRecord], feeds: Sequence[tuple[int, ...]], ids: Sequence[tuple[int, ...]],
    small: dict[int, Any], origin: Origin | None,
) -> Origin | None:  # fmt: skip
    """The op that changed a log-sum-exp's shift away from the row maximum, where the log of 0 ``origin``
    came from it (module docstring); None otherwise."""
    if origin is None or not origin.op.startswith("aten.log") or not origin.why.startswith("of 0"):
        return None
    exp = _underflowed_exp(ops, feeds, origin.index)
    sub = feeds[exp][0] if exp >= 0 and feeds[exp] else -1
    if sub < 0 or ops[sub].name != "aten.sub" or len(feeds[sub]) != 2:
        return None
    chain = _shift_chain(ops, feeds, ids, sub)
    broken = small.get(origin.index)
    if not chain or broken is None:
        return None
    broken = ~np.isfinite(np.ravel(broken))
    for later, earlier in zip(reversed(chain[:-1]), reversed(chain[1:]), strict=True):
        came_in, came_out = small.get(earlier), small.get(later)
        if came_in is None or came_out is None or not came_in.size == came_out.size == broken.size:
            return None
        came_in, came_out = np.ravel(came_in), np.ravel(came_out)
        changed = (came_in != came_out) & broken
        if changed.any():
            row = int(np.argmax(changed))
            op = ops[later]
            why = (
                f"changed the shift of the log-sum-exp at {ops[sub].line or '?'} away from the row maximum "
                f"({came_in[row]:.6g} went in, {came_out[row]:.6g} came out, on {int(changed.sum())} of "
                f"{broken.size} rows): shifted by it, the row peaks at {came_in[row] - came_out[row]:.4g}, "
                f"every exp of the row underflowed to 0 and {origin.op} at {origin.line or '?'} took log of 0"
            )
            return Origin(op.name, op.line, why, op.index)
    return None

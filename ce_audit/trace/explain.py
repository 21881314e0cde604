"""From recorded ops to origins: the op where a non-finite value was born, the ops where error entered.

**Non-finite origin.** From the result (or the gradient) that is non-finite, the ops whose non-finite
outputs led to it are walked back. The origin is the first of them, in the order they ran, that was *born*
non-finite: NaN from inputs with no NaN (0 · ∞, ∞ − ∞, 0/0, log of a negative number) or ±inf from finite
inputs (exp past the dtype's overflow threshold, log of 0, a sum past the largest finite value). A
non-finite value the inputs brought (a −inf mask) that only spreads is not an origin; where no op on the way
was born non-finite, the origin is the first op that made a whole row non-finite from rows that were not (a
−inf padding lane picked as the target's logit). Ops that make constants (``torch.full``) are inputs, not
origins.

**Error origin.** An op introduced error when its output carries at least ``INTRODUCED`` ULPs of the audited
dtype against the float64 shadow and at least ``GAIN`` times what its inputs carried
(ce_audit.trace.torch_tracer): its own arithmetic (a large ``local`` error: a float16 accumulation), a
cancellation that magnifies earlier rounding (``lse − z_y`` under an offset, ``p_y − 1`` from a rounded
``p_y``) or a rounding to a narrower dtype. Only ops the error came through count (inputs carrying at least
``INTRODUCED`` ULPs, walked back from the result), and only when the result itself carries that much. A
flagged result that is accurate to its own formula has no rounding origin; where an op on its way turned
±inf entries into finite nonzero values (``tanh`` of −inf padding, a clamp of a −inf mask) and no later op
put ±inf back in their place, that op is named instead. Otherwise the error is what the dtype allows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ce_audit.trace.ops import NOT_RERUN
from ce_audit.trace.records import OpRecord, Origin

INTRODUCED = 4.0  # ULPs of the audited dtype
GAIN = 4.0
MAX_ORIGINS = 3
ABSORBED = (
    "turned ±inf entries (masks or padding) into finite nonzero values, which then count as classes "
    "(the arithmetic is accurate: the formula is wrong)"
)
_CANCELS = frozenset({"aten.sub", "aten.add", "aten.rsub"})


Inputs = list[list[tuple[int, str, float]]]  # per op: (producing op, non-finite kind, carried ULPs)


def _walk(start: Iterable[int], inputs: Inputs, nonfinite: bool | None) -> set[int]:
    """The ops ``start`` depends on through inputs that hold non-finite values (``nonfinite``) or carry at
    least ``INTRODUCED`` ULPs of error (``nonfinite`` False): the way the non-finite value or the error
    came; through every input (None). ``start`` included."""
    seen: set[int] = set()
    stack = [index for index in start if index >= 0]
    while stack:
        index = stack.pop()
        if index in seen:
            continue
        seen.add(index)
        stack += [
            p
            for p, kind, carried in inputs[index]
            if p >= 0 and (nonfinite is None or (kind if nonfinite else carried >= INTRODUCED))
        ]
    return seen


def nonfinite_origin(ops: list[OpRecord], inputs: Inputs, finals: list[int]) -> Origin | None:
    """The op a non-finite result (produced by the ops ``finals``) was born in (module docstring)."""
    chain = sorted(_walk(finals, inputs, nonfinite=True))
    born = [i for i in chain if ops[i].born]
    if born:
        op = ops[born[0]]
        return Origin(op.name, op.line, op.born, op.index)
    took = [i for i in chain if ops[i].takes_row]
    if took:
        op = ops[took[0]]
        kind = "NaN" if op.nonfinite == "nan" else "±inf"
        why = f"made a whole row {kind}: a non-finite entry of its input (a mask or padding) reached it"
        return Origin(op.name, op.line, why, op.index)
    return None


def why_error(op: OpRecord, final: float) -> str:
    """What an op that introduced error did, in words, with its share of the result's error."""
    bits = math.log2(1 + op.carried)
    gain = op.carried / max(op.carried_in, 0.5)
    short = op.name.removeprefix("aten.")
    if not math.isnan(op.local) and op.local >= INTRODUCED:
        local_bits = math.log2(1 + op.local)
        if op.terms > 1:
            what = f"{op.dtype} accumulation of {op.terms} terms, {local_bits:.1f} bits"
        else:
            what = f"{op.dtype} {short}: local error {op.local:.3g} ULP, {local_bits:.1f} bits"
    elif op.name in _CANCELS:
        what = f"cancellation: earlier rounding magnified ×{gain:.3g}, {bits:.1f} bits"
    elif op.name == "aten._to_copy":
        what = f"rounds to {op.dtype}: {bits:.1f} bits"
    else:
        what = f"magnifies earlier rounding ×{gain:.3g}: {bits:.1f} bits"
    share = min(op.carried / final, 1.0) if final > 0 else 1.0
    return f"{what} ({share:.0%} of the result's error)"


def introduced(op: OpRecord) -> bool:
    """Whether an op brought in error itself (module docstring); data movement never does."""
    moves = op.name.removeprefix("aten.") in NOT_RERUN and op.name != "aten._to_copy"
    return not moves and op.carried >= INTRODUCED and op.carried >= GAIN * max(op.carried_in, 0.5)


def error_origins(
    ops: list[OpRecord], inputs: Inputs, finals: list[tuple[int, float, bool]]
) -> tuple[Origin, ...]:
    """The ops that introduced the error of each result ``(producing op, its carried ULPs, finite)`` that
    carries at least ``INTRODUCED`` ULPs (a finite one accurate to its own formula: the op that undid a mask),
    the first in the order they ran, at most ``MAX_ORIGINS``."""
    found: list[Origin] = []
    for producer, error, finite in finals:
        if producer < 0:
            continue
        chain = sorted(_walk([producer], inputs, nonfinite=False)) if error >= INTRODUCED else []
        origin = next((ops[i] for i in chain if introduced(ops[i])), None)
        if origin is not None:
            why = why_error(origin, error)
        elif finite:  # accurate to its own formula: a mask undone on the way makes the formula wrong
            every = sorted(_walk([producer], inputs, nonfinite=None))
            masking = [i for i in every if ops[i].masks]
            undone = {i for m in masking for i in _walk([m], inputs, None)}  # a mask put back after it
            origin = next((ops[i] for i in every if ops[i].absorbs and i not in undone), None)
            why = ABSORBED
        if origin is not None and all(o.index != origin.index for o in found):
            found.append(Origin(origin.name, origin.line, why, origin.index))
    return tuple(found[:MAX_ORIGINS])

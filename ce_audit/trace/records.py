"""What a trace holds: one ``OpRecord`` per tensor operation, the origins found from them, as plain data.

A trace is sent back from an isolated worker (pickled), printed by ``ce-audit explain`` and summed up in
two summary.csv columns, ``nonfinite_origin`` and ``error_origin``: ``"<op> <file>:<line>"`` or empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Error sizes are in ULPs (u ≤ ½ for a correctly rounded value): of the op's own dtype for ``local``, of
# the audited dtype for ``carried`` (relative to each row's largest magnitude).


@dataclass(frozen=True)
class OpRecord:
    """One operation as it ran: its name (``aten.exp``), output dtype and shapes, the user's line, and
    what it did to the values.

    ``local``: its own arithmetic error, re-run in float64 on its actual inputs (max |v − r| over the
    ULP of the output dtype at max |r|, per row); NaN where not measured (data movement, creation).
    ``carried``: the error its output holds against the float64 shadow execution of every op before it
    (ULPs of the audited dtype, per row relative to the row's largest magnitude); ``carried_in``: the
    largest among its floating inputs. ``nonfinite``: "nan", "inf" or "" — what its output holds;
    ``born``: why it made a non-finite value its inputs did not have ("" if it did not).
    """

    index: int
    name: str
    dtype: str
    shapes: tuple[tuple[int, ...], ...]
    line: str  # file:line of the user's code ("" where none was found)
    phase: str  # forward or backward
    local: float = float("nan")
    carried: float = float("nan")
    carried_in: float = float("nan")
    nonfinite: str = ""
    born: str = ""
    terms: int = 0  # elements reduced into each output value (a sum's length), 0 for an elementwise op
    takes_row: bool = False  # a row of its output is non-finite throughout, none of its inputs' was
    absorbs: bool = False  # it turned ±inf input entries into finite nonzero ones (a mask undone)
    masks: bool = False  # it put ±inf where a same-shaped input held finite values (a mask applied)
    zero_rows: bool = False  # an exp that made a whole row 0 from finite inputs (every term underflowed)


@dataclass(frozen=True)
class Origin:
    """An op named as the cause: where it is and what it did, in words."""

    op: str
    line: str
    why: str
    index: int = -1

    def column(self) -> str:
        """The summary.csv form: ``"<op> <file>:<line>"``."""
        return f"{self.op} {self.line or '?'}"

    def text(self) -> str:
        """The finding's form: ``"aten.exp at my_ce.py:12 overflowed: …"``."""
        return f"{self.op} at {self.line or '?'} {self.why}"


@dataclass(frozen=True)
class Trace:
    """The ops of one traced call (forward, then backward) and what was found in them.

    ``traced``: False where the implementation cannot be traced (``note`` says why: a JAX function, a
    Triton kernel's inside); ``rows``: the input rows traced; ``loss_error``/``grad_error``: the carried
    error of the result and of the gradient (ULPs of the audited dtype); ``allowed``: True when no op
    introduced error past a few ULPs — the error is what the dtype allows.
    """

    impl: str
    dtype: str
    rows: tuple[int, ...] = ()
    ops: tuple[OpRecord, ...] = ()
    nonfinite_origin: Origin | None = None
    error_origins: tuple[Origin, ...] = ()
    loss_error: float = float("nan")
    grad_error: float = float("nan")
    traced: bool = True
    note: str = ""
    candidates: tuple[int, ...] = field(default=())  # indices of ops that introduced error
    # per op: the ops that made its floating inputs (-1: an input of the call), for the walk by value
    feeds: tuple[tuple[int, ...], ...] = field(default=(), compare=False)
    # forward ops with at most one value per traced row: their float64 shadows' values (trace.departure)
    values: dict[int, Any] = field(default_factory=dict, compare=False)
    loss_op: int = -1  # the op that made the returned loss
    departure: Origin | None = None  # where the formula leaves the exact quantities (a term, a denominator)

    @property
    def error_origin(self) -> Origin | None:
        return self.departure or (self.error_origins[0] if self.error_origins else None)

    @property
    def allowed(self) -> bool:
        found = self.error_origins or self.nonfinite_origin is not None or self.departure is not None
        return self.traced and not found

    def columns(self) -> dict[str, str]:
        """The two summary.csv columns."""
        return {
            "nonfinite_origin": self.nonfinite_origin.column() if self.nonfinite_origin else "",
            "error_origin": self.error_origin.column() if self.error_origin else "",
        }

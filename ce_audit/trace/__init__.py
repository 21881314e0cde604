"""Observed causes: the op where a value first went non-finite and the ops where the error entered.

``ce_audit.trace.cells.traced`` traces a flagged cell's worst rows where its implementation runs and
puts the origins in the cell (``nonfinite_origin``, ``error_origin``: ``"<op> <file>:<line>"``, and the
words, ``traced_cause``). A run traces while ``tracing(True)`` is in force (a sweep or a replay, unless
``--no-trace``). See docs/trace.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_ON: ContextVar[bool] = ContextVar("ce_audit_tracing", default=False)


def tracing_on() -> bool:
    """Whether flagged cells are traced in this context."""
    return _ON.get()


@contextlib.contextmanager
def tracing(on: bool) -> Iterator[None]:
    """Trace flagged cells (``on``) inside the block."""
    token = _ON.set(on)
    try:
        yield
    finally:
        _ON.reset(token)

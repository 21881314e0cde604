"""Observed causes: the op where a value first went non-finite and the ops where the error entered.

``ce_audit.trace.cells.traced`` traces a flagged cell's worst rows where its implementation runs and
puts the origins in the cell (``nonfinite_origin``, ``error_origin``: ``"<op> <file>:<line>"``, and the
words, ``traced_cause``). A run traces while ``tracing(scope)`` is in force (a sweep or a replay): with
``plugins`` (the default) the cells of implementations that are not built in, with ``all`` the built-ins'
too, with ``none`` nothing. See docs/trace.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

TRACE_SCOPES = ("plugins", "all", "none")  # whose flagged cells are traced; plugins: not the built-ins
_SCOPE: ContextVar[str] = ContextVar("ce_audit_tracing", default="none")


def tracing_on() -> bool:
    """Whether any flagged cell is traced in this context."""
    return _SCOPE.get() != "none"


def traces(impl: Any) -> bool:
    """Whether a flagged cell of ``impl`` is traced in this context: ``all``, or ``plugins`` and ``impl``
    is not built in."""
    scope = _SCOPE.get()
    return scope == "all" or (scope == "plugins" and not getattr(impl, "builtin", False))


@contextlib.contextmanager
def tracing(scope: str) -> Iterator[None]:
    """Trace the flagged cells of ``scope`` (TRACE_SCOPES) inside the block."""
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)

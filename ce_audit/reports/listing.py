"""`ce-audit list`: the registered implementations, with the dtypes and devices here.

A table where the terminal is wide enough (STACKED_BELOW columns and up); below that, one block per
implementation, its lines wrapped on word boundaries with a hanging indent, so no word is split."""

from __future__ import annotations

import os
import textwrap

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ce_audit.devices import resolve_devices
from ce_audit.dtypes import DTYPE_NAMES
from ce_audit.implementations import REGISTRY, Implementation
from ce_audit.printable import printable

STACKED_BELOW = 140  # narrower consoles get one block per implementation instead of a table
COLUMNS = ("name", "backend", "what it computes", "origin", "dtypes", "loss", "options")


def origin_words(entry: Implementation) -> str:
    """Where an implementation comes from, as a user reads it: ``built-in, the textbook naive form``, or
    ``plugin examples/plugin/my_ce.py`` (a path under the working directory written relative to it)."""
    if entry.builtin:
        return f"built-in, {entry.origin}"
    root = os.getcwd().rstrip(os.sep) + os.sep
    return entry.origin.replace(root, "") if root != os.sep else entry.origin


def _rows() -> list[tuple[str, ...]]:
    rows = []
    for entry in REGISTRY.values():
        dtypes = "all" if entry.dtypes == DTYPE_NAMES else ", ".join(entry.dtypes)
        supports = ", ".join(sorted(entry.supports)) or "—"
        described = (entry.name, entry.backend, entry.description, origin_words(entry), dtypes, entry.family)
        rows.append(tuple(printable(text) for text in (*described, supports)))  # a docstring may hold any
    return rows


def _wrapped(console: Console, text: str, indent: int, style: str = "") -> None:
    for line in textwrap.wrap(
        text,
        width=max(console.width, 20),
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + 4),
        break_long_words=False,
        break_on_hyphens=False,
    ):
        console.print(Text(line, style=style), soft_wrap=True)  # plain text: descriptions hold [brackets]


def print_implementations(console: Console) -> None:
    """Per implementation: name, backend, description, origin, dtypes, loss family, options."""
    rows = _rows()
    if console.width >= STACKED_BELOW:
        table = Table(title="Implementations", title_justify="left")
        for column in COLUMNS:
            table.add_column(column, no_wrap=column in ("name", "backend", "loss"))
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
    else:
        console.print(Text("Implementations", style="bold"))
        for name, backend, description, origin, dtypes, family, supports in rows:
            console.print(Text(f"{name}", style="bold").append(f"  {backend}, {family}", style=""))
            _wrapped(console, description, indent=4)
            _wrapped(console, f"origin: {origin}; dtypes: {dtypes}; options: {supports}", 4, "dim")
    _wrapped(console, f"dtypes: {', '.join(DTYPE_NAMES)}", 0)
    _wrapped(console, f"devices here: {', '.join(resolve_devices(('all',)))}", 0)

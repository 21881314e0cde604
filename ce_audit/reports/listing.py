"""`ce-audit list`: the registered implementations as a table, with the dtypes and devices here."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ce_audit.devices import resolve_devices
from ce_audit.dtypes import DTYPE_NAMES
from ce_audit.implementations import REGISTRY


def print_implementations(console: Console) -> None:
    """One line per implementation: name, backend, description, origin, dtypes, loss family, options."""
    table = Table(title="Implementations", title_justify="left")
    widest = max((len(entry.name) for entry in REGISTRY.values()), default=4)
    for column in ("name", "backend", "what it computes", "origin", "dtypes", "loss", "options"):
        fixed = column in ("name", "backend", "loss")
        table.add_column(
            column, no_wrap=fixed, min_width=widest if column == "name" else None, overflow="fold"
        )
    for entry in REGISTRY.values():
        dtypes = "all" if entry.dtypes == DTYPE_NAMES else ", ".join(entry.dtypes)
        supports = ", ".join(sorted(entry.supports)) or "—"
        cells = (entry.name, entry.backend, entry.description, entry.origin, dtypes, entry.family, supports)
        table.add_row(*(Text(cell) for cell in cells))  # plain text: descriptions hold [brackets]
    console.print(table)
    console.print(f"dtypes: {', '.join(DTYPE_NAMES)}")
    console.print(f"devices here: {', '.join(resolve_devices(('all',)))}")

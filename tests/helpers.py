"""Plain helpers shared by the test modules (fixtures live in conftest.py), and the audit tester.

The tester, in the manner of torchmetrics' ``MetricTester``: ``audit(impls, **grid)`` sweeps those
implementations over a tiny CPU grid and returns ``AuditedCells``; ``cells.one(impl=..., dtype=...)`` finds
the one cell with that key, ``cells.by("impl", "scale")`` indexes them, and ``assert_cell(cell, status=...)``
checks measurements with a message that names the cell and every mismatch. Every key is read through
``key_value``, the one function to adapt when the cell's fields move.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

from ce_audit.config import load_config
from ce_audit.implementations import REGISTRY, Implementation, add
from ce_audit.results import CELL_COLUMNS, KEY_COLUMNS, Cell, cell_from_columns, column_value

# The twelve built-in names every release keeps (the README lists them).
BUILTIN_NAMES = (
    "naive",
    "softmax_log",
    "shifted",
    "logsumexp",
    "log_softmax_nll",
    "fused",
    "chunked",
    "online",
    "accurate",
    "numpy_naive",
    "numpy_shifted",
    "numpy_eps",
)


def tiny_overrides(**changes: Any) -> dict[str, Any]:
    """Overrides for a sweep of one small case on the CPU; keyword arguments replace entries."""
    overrides: dict[str, Any] = {
        "dtypes": ["float32"],
        "devices": ["cpu"],
        "impls": ["shifted", "numpy_shifted"],
        "distributions": ["normal"],
        "scales": [1.0],
        "offsets": [0.0],
        "vocabs": [50],
        "batches": [8],
        "seed": 0,
    }
    overrides.update(changes)
    return overrides


def same_value(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (summary rows carry NaN for cells that measured nothing)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def row_differences(first: Any, second: Any) -> list[str]:
    """Names of the dataclass fields in which two rows differ (NaN-aware, type-strict)."""
    return [f.name for f in fields(first) if not same_value(getattr(first, f.name), getattr(second, f.name))]


@contextmanager
def registered_implementations() -> Iterator[Callable[..., Implementation]]:
    """Yields ``register(name, function, backend="torch")``; every name it added leaves REGISTRY on exit."""
    added: list[str] = []

    def register(name: str, function: Callable[..., Any], backend: str = "torch") -> Implementation:
        assert name not in REGISTRY, f"{name} is already registered"
        implementation = add(
            Implementation(
                name=name,
                backend=backend,
                target=function,
                description=f"test implementation {name}",
                origin="tests",
                builtin=False,
            )
        )
        added.append(name)
        return implementation

    try:
        yield register
    finally:
        for name in added:
            REGISTRY.pop(name, None)


def cell(**values: Any) -> Cell:
    """A measured fused float16 cell, changed by ``values``."""
    base: dict[str, Any] = dict(
        impl="fused",
        dtype="float16",
        device="cpu",
        distribution="normal",
        scale=1.0,
        offset=0.0,
        batch=8,
        vocab=64,
        seed=0,
        status="ok",
        grad_status="ok",
        value_kind="rows",
    )
    base.update(values)
    return cell_from_columns(base)  # option columns (ignore_index, focal_gamma, …) go to cell.options
# --------------------------------------------------------------------------------------------------
# the audit tester: one sweep, its cells by key, assertions that show the cell
# --------------------------------------------------------------------------------------------------

# the case's own key (what every summary row starts with); loss options and the rest follow in describe()
CASE_KEYS = ("impl", "dtype", "device", "distribution", "scale", "offset", "batch", "vocab", "seed")


def key_value(cell: Cell, name: str) -> Any:
    """The value of key ``name`` in ``cell``: an implementation, dtype, case dimension or loss option
    (``reduction``, ``margin``, ...), or a measurement. The one place the tests read a key by name."""
    return column_value(cell, name) if name in CELL_COLUMNS else getattr(cell, name)


def _equal(value: Any, expected: Any) -> bool:
    """Equal as values (10 == 10.0), NaN equal to NaN."""
    return same_value(value, expected) or value == expected


def _matches(cell: Cell, key: dict[str, Any]) -> bool:
    """Whether each key of ``cell`` has the value given, or one of the values of a set given."""
    return all(
        key_value(cell, name) in value
        if isinstance(value, set | frozenset)
        else _equal(key_value(cell, name), value)
        for name, value in key.items()
    )


def describe(cell: Cell) -> str:
    """One line: the cell's key (the options that differ from their default included) and its verdict."""
    words = [f"{name}={getattr(cell, name)!r}" for name in CASE_KEYS]
    defaults = Cell("", "", "", "", 0.0, 0.0, 0, 0, 0)
    for name in KEY_COLUMNS:
        if name not in CASE_KEYS:
            value = column_value(cell, name)
            if not same_value(value, column_value(defaults, name)):
                words.append(f"{name}={value!r}")
    words.append(
        f"-> {cell.status}/{cell.grad_status} rows={cell.rows} nan={cell.nan_rows} inf={cell.inf_rows} "
        f"max_ulp={cell.max_ulp:.4g} max_rel_err={cell.max_rel_err:.4g} "
        f"grad_max_rel_err={cell.grad_max_rel_err:.4g}"
    )
    if cell.error:
        words.append(f"error={cell.error!r}")
    return " ".join(words)


def assert_cell(cell: Cell, **expected: Any) -> None:
    """Each ``measurement=value`` (or key) holds in ``cell``, NaN equal to NaN; the failure message names
    the cell and every field that differs."""
    wrong = [
        f"{name}: {key_value(cell, name)!r}, expected {value!r}"
        for name, value in expected.items()
        if not _equal(key_value(cell, name), value)
    ]
    assert not wrong, f"{describe(cell)}\n  " + "\n  ".join(wrong)


@dataclass(frozen=True)
class AuditedCells(Sequence[Cell]):
    """The cells of one audit, in the sweep's order, found by key (``impl``, ``dtype``, ``scale``, an
    option's name, ...)."""

    cells: tuple[Cell, ...]

    def __getitem__(self, index: Any) -> Any:
        return self.cells[index]

    def __len__(self) -> int:
        return len(self.cells)

    def where(self, **key: Any) -> list[Cell]:
        """Every cell whose key has these values (a set: any of its values)."""
        return [cell for cell in self.cells if _matches(cell, key)]

    def one(self, **key: Any) -> Cell:
        """The one cell whose key has these values (the assertion lists what there is otherwise)."""
        found = self.where(**key)
        assert len(found) == 1, f"{len(found)} cells match {key} among:\n" + "\n".join(
            describe(cell) for cell in self.cells
        )
        return found[0]

    def by(self, *names: str) -> dict[Any, Cell]:
        """The cells indexed by one key's value, or by a tuple of several; the names must identify them."""
        table = {
            key_value(cell, names[0]) if len(names) == 1 else tuple(key_value(cell, n) for n in names): cell
            for cell in self.cells
        }
        assert len(table) == len(self.cells), f"{names} do not identify the {len(self.cells)} cells"
        return table

    def values(self, name: str) -> set[Any]:
        """The values key or measurement ``name`` takes over the cells."""
        return {key_value(cell, name) for cell in self.cells}


def audit(impls: Iterable[str] = (), **grid: Any) -> AuditedCells:
    """Sweep ``impls`` (none: every implementation of the loss) over the tiny grid of ``tiny_overrides``
    changed by ``grid`` (config keys: ``dtypes=[...]``, ``scales=[...]``, ``reductions=[...]``, ...)."""
    from ce_audit.run.sweep import run_sweep

    config = load_config(None, tiny_overrides(impls=list(impls), **grid))
    return AuditedCells(tuple(run_sweep(config).cells))

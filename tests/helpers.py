"""Plain helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

from ce_audit.implementations import REGISTRY, Implementation, add
from ce_audit.results import Cell, cell_from_columns

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

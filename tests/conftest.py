"""Shared fixtures: a pinned terminal width, a tiny sweep configuration and temporary implementations."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helpers import registered_implementations, tiny_overrides

from ce_audit.config import SweepConfig, load_config
from ce_audit.implementations import Implementation
from ce_audit.plugins import isolated

# The width every test's console sees unless the test sets its own: the CLI's width when stdout is not a
# terminal. Rich and the CLI read $COLUMNS (and Rich the terminal's size), so an inherited COLUMNS=80 or
# a wide terminal would otherwise rewrap the output that tests read.
PINNED_COLUMNS = "100"


@pytest.fixture(scope="session", autouse=True)
def pinned_terminal_width() -> Iterator[None]:
    """``COLUMNS`` and ``LINES`` fixed for the whole session, module-scoped fixtures included (subprocesses
    inherit them); a test of a layout at another width passes its own (``Console(width=...)``,
    ``runner.invoke(..., env={"COLUMNS": ...})``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLUMNS", PINNED_COLUMNS)
        patch.setenv("LINES", "25")
        yield


@pytest.fixture(scope="module")
def isolated_plugins() -> Iterator[None]:
    """Restore the registry, plugin modules and the entry-point flag when a module's tests end.

    Every sweep loads the `ce_audit.implementations` entry points once per process; without this a
    module that runs sweeps would leave that flag set for the test modules after it.
    """
    with isolated():
        yield


@pytest.fixture
def tiny_config() -> SweepConfig:
    """Float32, `shifted` and `numpy_shifted`, normal logits, V = 50, 8 rows, CPU only."""
    return load_config(None, tiny_overrides())


@pytest.fixture
def temporary_impl() -> Iterator[Callable[..., Implementation]]:
    """``register(name, function, backend="torch")`` for one test; the names leave REGISTRY afterwards."""
    with registered_implementations() as register:
        yield register

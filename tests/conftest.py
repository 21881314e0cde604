"""Shared fixtures: a tiny sweep configuration and temporary implementations in the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from helpers import registered_implementations, tiny_overrides

from ce_audit.config import SweepConfig, load_config
from ce_audit.implementations import Implementation
from ce_audit.plugins import isolated


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

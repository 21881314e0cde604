"""ce-audit: a numerical-stability auditor for cross-entropy loss implementations.

``ce_audit.register`` (plugins) and ``ce_audit.check`` (the Python API for test suites) are loaded on
first use, so that ``import ce_audit`` imports neither NumPy nor torch (``ce-audit --help`` no torch).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["AuditError", "CheckReport", "check", "register"]

_LAZY = {
    "register": "ce_audit.plugins",
    "check": "ce_audit.api",
    "CheckReport": "ce_audit.check_report",
    "AuditError": "ce_audit.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ce_audit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])

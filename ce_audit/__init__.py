"""ce-audit: a numerical-stability auditor for cross-entropy loss implementations.

``ce_audit.register`` (plugins) and ``ce_audit.check`` (the Python API for test suites) are loaded on
first use, so that ``import ce_audit`` imports neither NumPy nor torch (``ce-audit --help`` no torch).
"""

from __future__ import annotations

from ce_audit.lazy import lazy_names

__version__ = "0.1.0"
__all__ = ["AuditError", "CheckReport", "check", "register"]

_LAZY = {
    "register": "ce_audit.plugins",
    "check": "ce_audit.api",
    "CheckReport": "ce_audit.check_report",
    "AuditError": "ce_audit.errors",
}


__getattr__, __dir__ = lazy_names("ce_audit", globals(), _LAZY)

"""ce-audit: a numerical-stability auditor for cross-entropy loss implementations."""

__version__ = "0.1.0"

"""The one exception type the library raises for problems a user can fix."""


class AuditError(Exception):
    """A user-facing problem (bad option, unreadable file, missing device); the CLI turns it into exit 2."""

"""Built-in implementations (torch and NumPy) and the registry user plugins join."""

from ce_audit.implementations.builtins import register_builtins
from ce_audit.implementations.registry import REGISTRY, Implementation, add, registered, remove, resolve

register_builtins()

__all__ = ["REGISTRY", "Implementation", "add", "registered", "remove", "resolve"]

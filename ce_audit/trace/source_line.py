"""The user's source line of an operation: the first stack frame outside torch and ce-audit.

The walk stops at the tracer's own entry (``BOUNDARY``): what called the implementation is not the
implementation. Built-in implementations live in ce_audit/implementations/: their line is the first frame
there when no frame outside ce-audit is found. During backward, an op of a built-in autograd node has no
user frame on the stack: the tracer tags each forward result's ``grad_fn.metadata`` with the forward
line, and an op run by that node takes it (``torch._C._current_autograd_node()``).
"""

from __future__ import annotations

import os
import sys
from types import CodeType

_CE_AUDIT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_BUILTINS = os.path.join(_CE_AUDIT, "implementations") + os.sep
_SKIPPED: list[str] = [os.path.dirname(os.path.__file__) + os.sep + "contextlib.py"]
BOUNDARY: set[CodeType] = set()  # code objects that call the implementation (the walk stops there)
METADATA_KEY = "ce_audit_line"
BUILTIN_FILES = frozenset(name for name in os.listdir(_BUILTINS) if name.endswith(".py"))


def excluded_prefixes() -> list[str]:
    """Where frames are not the user's: torch (once imported) and ce-audit."""
    prefixes = [_CE_AUDIT]
    torch = sys.modules.get("torch")
    if torch is not None:
        prefixes.append(os.path.dirname(torch.__file__) + os.sep)
    return prefixes


def user_line(prefixes: list[str], depth: int = 1) -> str:
    """``file:line`` of the first frame outside ``prefixes`` (a built-in's own file where no such frame
    is found before the tracer's entry); "" when there is none."""
    frame = sys._getframe(depth)
    builtin = ""
    kinds = _KINDS.setdefault(tuple(prefixes), {})
    while frame is not None:
        code = frame.f_code
        if code in BOUNDARY:
            break
        kind = kinds.get(code.co_filename)
        if kind is None:
            kind = kinds[code.co_filename] = _kind(code.co_filename, prefixes)
        if kind == "user":
            return f"{os.path.basename(code.co_filename)}:{frame.f_lineno}"
        if kind == "builtin" and not builtin:
            builtin = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return builtin


_KINDS: dict[tuple[str, ...], dict[str, str]] = {}  # prefixes → file name → its kind (``_kind``)


def _kind(name: str, prefixes: list[str]) -> str:
    """"skip" (generated code, contextlib, torch, ce-audit), "builtin" (a built-in implementation's file) or
    "user"."""
    if name.startswith("<") or name in _SKIPPED:
        return "skip"
    if any(name.startswith(prefix) for prefix in prefixes):
        return "builtin" if name.startswith(_BUILTINS) else "skip"
    return "user"

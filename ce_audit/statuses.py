"""The statuses of a cell, their order, and the small helpers every module shares for them.

A measured status ranks ok < inaccurate < nonfinite < error; ``skipped`` (not measured) ranks apart.
A gradient status may also be ``off`` (gradients not audited) or ``n/a`` (the backend has none).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import numpy as np

from ce_audit.printable import printable


class Status(StrEnum):
    """A cell's verdict; compares equal to its text (``Status.OK == "ok"``)."""

    OK = "ok"
    INACCURATE = "inaccurate"
    NONFINITE = "nonfinite"
    ERROR = "error"
    SKIPPED = "skipped"


RANKED: tuple[str, ...] = (Status.OK, Status.INACCURATE, Status.NONFINITE, Status.ERROR)
FAILING: tuple[str, ...] = (Status.INACCURATE, Status.NONFINITE, Status.ERROR)
UNMEASURED: tuple[str, ...] = (Status.ERROR, Status.SKIPPED)
GRAD_OFF = "off"  # gradients were not audited
GRAD_NOT_AVAILABLE = "n/a"  # the backend takes no gradients (NumPy)


def status_rank(status: str) -> int | None:
    """ok 0 < inaccurate 1 < nonfinite 2 < error 3; None for unmeasured (skipped, off, n/a, '')."""
    return RANKED.index(status) if status in RANKED else None


def worst_status(statuses: Iterable[str]) -> str:
    """The worst of several statuses (ok < inaccurate < nonfinite < error); ``skipped`` when none ranks."""
    ranked = [status for status in statuses if status in RANKED]
    return max(ranked, key=RANKED.index) if ranked else Status.SKIPPED


def first_line(error: BaseException) -> str:
    """``TypeName: first line of the message`` — how a failure is recorded in a cell's ``error`` (control
    characters shown as escapes: the text may come from a plugin)."""
    text = str(error).strip().splitlines()
    return printable(f"{type(error).__name__}: {text[0] if text else ''}".strip().rstrip(":"))


def message_line(error: BaseException) -> str:
    """The first line of the error's message, or its type name when it has none (for one-line errors),
    control characters shown as escapes."""
    text = str(error).strip().splitlines()
    return printable(text[0]) if text else type(error).__name__


def relative_error(diff: np.ndarray, size: np.ndarray) -> np.ndarray:
    """|diff| / |size| elementwise: 0 where both are 0, inf where only the size is 0."""
    with np.errstate(all="ignore"):
        nonzero = size > 0
        return np.where(nonzero, diff / np.where(nonzero, size, 1), np.where(diff > 0, np.inf, 0))

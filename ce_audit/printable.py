"""Text made to print: from outside the run (a plugin's error or output, a file, a report.json) made
safe (``printable``), and a count with its noun in the right number (``plural``).

A control character reaching a terminal or a CI log is an instruction, not text: ESC starts a sequence
that sets the window title, clears the screen or moves the cursor; CR overwrites the line; BEL rings. Every
such character is shown instead as its escape (``\\x1b``), so the text keeps its meaning and loses its
power. Newline and tab are kept. The terminal report, the gate's summary, its Markdown, JUnit and HTML
reports and the one-line errors at the CLI edge all print through ``printable``.
"""

from __future__ import annotations

import re

# C0 controls but tab and newline, DEL, and the C1 controls (U+0080–U+009F, of which U+009B is a CSI)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _shown(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 cell``, ``2 cells``, ``0 cells``: the count and its noun (``many``: an irregular plural)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def printable(text: str) -> str:
    """``text`` with every control character but newline and tab written as ``\\xNN`` (ESC as ``\\x1b``)."""
    return _CONTROL.sub(_shown, text)

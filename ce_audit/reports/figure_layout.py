"""Fixed margins for the figures of ``plots.py``, computed once from the sizes of their texts.

matplotlib's constrained layout measures every artist of a figure twice per draw (about half of a figure's
cost); the figures here have a known shape, so their margins are the sum of the texts and pads around each
side, measured with the font that draws them (``text_points``), and set with ``subplots_adjust``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

PAD = 4.0  # points between neighbouring texts, and at the figure's edge
TICK = 3.5 + 3.5  # a major tick and its label's pad, points (matplotlib's defaults)
LINE = 1.2  # a text line's height, in font sizes (matplotlib's default linespacing)


@functools.lru_cache(maxsize=4096)
def text_points(text: str, fontsize: float, math_text: bool = False) -> tuple[float, float]:
    """Width and height in points of ``text`` in the default font at ``fontsize`` (``math_text``: parsed as
    mathtext, as a log axis' labels are)."""
    from matplotlib.font_manager import FontProperties

    width, height, _ = _renderer().get_text_width_height_descent(
        text, FontProperties(size=fontsize), ismath=math_text
    )
    return float(width), float(height)


@functools.lru_cache(maxsize=1)
def _renderer():  # type: ignore[no-untyped-def]
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(1, 1, 72)  # at 72 dpi a pixel is a point


def widest(texts: Iterable[str], fontsize: float, math_text: bool = False) -> float:
    """The largest width in points among ``texts`` (0 for none)."""
    return max((text_points(text, fontsize, math_text)[0] for text in texts), default=0.0)


def tick_labels_height(labels: Iterable[str], fontsize: float, rotation: float) -> float:
    """The height in points taken below an axis by its tick labels, rotated by ``rotation`` degrees."""
    angle = math.radians(rotation)
    sizes = [text_points(label, fontsize) for label in labels] or [(0.0, fontsize)]
    return max(w * math.sin(angle) + h * math.cos(angle) for w, h in sizes)


def log_tick_labels(low: float, high: float) -> list[str]:
    """The labels a log axis from ``low`` to ``high`` may show (10^k, mathtext)."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    return [rf"$\mathdefault{{10^{{{k}}}}}$" for k in range(first, last + 1)]


@dataclass(frozen=True)
class Margins:
    """A row of panels' margins in points: around them (``left``, ``right``, ``bottom``, ``top``), between
    two (``gap``), and a colour bar's place in the right margin (``bar_gap`` from the panels, ``bar``
    wide; 0: none)."""

    left: float
    right: float
    bottom: float
    top: float
    gap: float
    bar_gap: float = 0.0
    bar: float = 0.0

    def grid(self, size: tuple[float, float], panels: int) -> dict[str, float]:
        """``subplots``' gridspec arguments for a figure of ``size`` inches."""
        width, height = size[0] * 72, size[1] * 72
        panel = (width - self.left - self.right - (panels - 1) * self.gap) / panels
        return {
            "left": self.left / width,
            "right": 1 - self.right / width,
            "bottom": self.bottom / height,
            "top": 1 - self.top / height,
            "wspace": self.gap / panel,
        }

    def colorbar(self, size: tuple[float, float], shrink: float = 0.8) -> list[float]:
        """The colour bar's rectangle (figure fraction): beside the last panel, ``shrink`` of its height."""
        width, height = size[0] * 72, size[1] * 72
        tall = height - self.top - self.bottom
        low = self.bottom + tall * (1 - shrink) / 2
        left = (width - self.right + self.bar_gap) / width
        return [left, low / height, self.bar / width, shrink * tall / height]

    def title_y(self, size: tuple[float, float]) -> float:
        """Where the figure's title hangs from (figure fraction): PAD below the top edge."""
        return 1 - PAD / (size[1] * 72)

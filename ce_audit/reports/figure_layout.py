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
LABEL_PAD = 4.0  # an axis label's distance from its tick labels, points (matplotlib's default)


@functools.lru_cache(maxsize=4096)
def text_points(text: str, fontsize: float) -> tuple[float, float]:
    """Width and height in points of ``text`` in the default font at ``fontsize``."""
    from matplotlib.font_manager import FontProperties

    width, height, _ = _renderer().get_text_width_height_descent(
        text, FontProperties(size=fontsize), ismath=False
    )
    return float(width), float(height)


@functools.lru_cache(maxsize=1)
def _renderer():  # type: ignore[no-untyped-def]
    from matplotlib.backends.backend_agg import RendererAgg

    return RendererAgg(1, 1, 72)  # at 72 dpi a pixel is a point


def widest(texts: Iterable[str], fontsize: float) -> float:
    """The largest width in points among ``texts`` (0 for none)."""
    return max((text_points(text, fontsize)[0] for text in texts), default=0.0)


def tick_labels_height(labels: Iterable[str], fontsize: float, rotation: float) -> float:
    """The height in points taken below an axis by its tick labels, rotated by ``rotation`` degrees."""
    angle = math.radians(rotation)
    sizes = [text_points(label, fontsize) for label in labels] or [(0.0, fontsize)]
    return max(w * math.sin(angle) + h * math.cos(angle) for w, h in sizes)


SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def power_label(value: float) -> str:
    """A log axis' tick label as plain text: ±10 with the exponent in superscript digits where ``value`` is a
    power of ten (10⁻³, −10⁴), else the value (``g``). matplotlib's own labels are mathtext, whose parsing
    cost more than the rest of a figure's text."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    exponent = round(math.log10(abs(value)))
    if abs(abs(value) / 10.0**exponent - 1) > 1e-9:
        return f"{value:g}".replace("-", "−")
    return ("−" if value < 0 else "") + "10" + str(exponent).translate(SUPERSCRIPTS)


def log_tick_labels(low: float, high: float) -> list[str]:
    """The labels a log axis from ``low`` to ``high`` may show (``power_label`` of each 10^k)."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    return [power_label(10.0**k) for k in range(first, last + 1)]


def place_axis_labels(axis, below: float | None = None, left: float | None = None) -> None:  # type: ignore[no-untyped-def]
    """Put ``axis``' x label ``below`` points under its panel and its y label ``left`` points left of it (the
    room the margins measured for the tick marks and labels), plus LABEL_PAD, where matplotlib would measure
    every tick label of the panel and its siblings at each draw to find about the same place."""
    from matplotlib.transforms import ScaledTranslation

    points = axis.figure.dpi_scale_trans
    if below is not None:
        shift = ScaledTranslation(0, -(below + LABEL_PAD) / 72, points)
        axis.xaxis.set_label_coords(0.5, 0, transform=axis.transAxes + shift)
    if left is not None:
        shift = ScaledTranslation(-(left + LABEL_PAD) / 72, 0, points)
        axis.yaxis.set_label_coords(0, 0.5, transform=axis.transAxes + shift)


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


def heatmap_margins(impls: list[str], columns: list[str], rotation: float, top: float) -> Margins:
    """Left: the implementations' names; bottom: the rotated column labels and the axis label; top: the
    figure's and the panels' titles; right: the colour bar with its tick labels and label."""
    bar_text = TICK + widest([f"{top:.1f}"], 10) + PAD + LINE * 10
    return Margins(
        left=PAD + widest(impls, 8) + TICK,
        right=12 + 14 + bar_text + PAD,
        bottom=PAD + LINE * 10 + PAD + tick_labels_height(columns, 8, rotation) + TICK,
        top=PAD + LINE * 11 + PAD + LINE * 9 + 6,
        gap=12,
        bar_gap=12,
        bar=14,
    )


# A legend's width beside its text, in font sizes: two border pads, the handle, the pad after it.
LEGEND_PADS = 2 * 0.4 + 2.0 + 0.8


def curves_margins(labels: list[str], low: float, high: float, x_labels: list[str]) -> Margins:
    """Left and between the panels: each panel's axis label and log tick labels; bottom: the x tick labels
    and axis label; top: the titles; right: the legend (``labels`` at 7 points, after a 2-em handle)."""
    y_ticks = log_tick_labels(low, high)
    y_text = PAD + LINE * 10 + PAD + widest(y_ticks, 10) + TICK
    x_ticks = max([LINE * 10, *(text_points(label, 10)[1] for label in x_labels)])
    return Margins(
        left=y_text,
        right=3 * PAD + LEGEND_PADS * 7 + widest(labels, 7) + PAD,  # 3 PAD from the panel
        bottom=PAD + LINE * 10 + PAD + x_ticks + TICK,
        top=PAD + LINE * 11 + PAD + LINE * 9 + 6,
        gap=y_text + 2 * PAD,
    )

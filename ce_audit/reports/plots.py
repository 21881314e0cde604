"""The figures of an audit, drawn with matplotlib (the optional ``html`` extra) from its cells alone.

Per dtype:
- a **heatmap**: implementations × the swept dimension that matters (``swept_dimension``), one panel the
  verdict (the worse of loss and gradient status, over every other dimension) and one the loss error in
  bits, ``log2(1 + max_ulp)`` (Herbie's measure);
- **error curves**: the loss's largest error in ULPs and the gradient's normwise error in machine epsilons
  2^(1−p) against each numeric dimension that varies (logit scale, common offset, target margin =
  confidence), one line per implementation, the maximum over every other dimension, with the tolerance
  band ``error ≤ rtol / 2^(1−p)`` shaded (what ``rtol·|exact|`` allows at least) and the dtype's floor
  (the exact values rounded once) dashed. A point whose cell fails its verdict is filled; a non-finite one
  is an × on the top edge.

Torch is never imported here; matplotlib only when a figure is drawn (``plotting_available``).
"""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from ce_audit.dtypes import FORMATS, float_format
from ce_audit.reports.figure_layout import (
    PAD,
    TICK,
    curves_margins,
    heatmap_margins,
    place_axis_labels,
    power_label,
    text_points,
    tick_labels_height,
    widest,
)
from ce_audit.results import KEY_COLUMNS, Cell, column_value
from ce_audit.statuses import RANKED, worst_status

# What a heatmap may run along, in order of preference when several matter equally.
DIMENSIONS: tuple[str, ...] = ("scale", "offset", "vocab", "distribution", "margin", "batch", "hidden_size")
# Numeric dimensions an error curve is drawn against, and their axis labels.
CURVE_DIMENSIONS: dict[str, str] = {
    "scale": "logit scale",
    "offset": "common logit offset",
    "margin": "target margin (confidence: the target this far above the rest)",
    "hidden_size": "hidden size D (linear_ce: the logits are sums of D products)",
}
# The verdict colours, chosen to stay apart for the common colour-vision deficiencies (Okabe–Ito).
STATUS_COLOURS: dict[str, str] = {
    "ok": "#009E73",
    "inaccurate": "#E69F00",
    "nonfinite": "#D55E00",
    "error": "#CC79A7",
    "skipped": "#BBBBBB",
}
NOT_MEASURED = ("off", "n/a", "skipped", "")
# What the figures read of a cell besides its key columns (a cell's traced cause is never among them).
FIGURE_FIELDS = ("status", "grad_status", "max_ulp", "best_max_ulp", "grad_norm_rel_err",
                 "best_grad_norm_rel_err")  # fmt: skip
DPI = 96
# The names of the figures this version writes under plots/ (``file_stem`` of ``_heatmap`` and ``_curves``):
# what a report set may replace or remove there, and nothing else.
FIGURE_NAME = re.compile(
    rf"(?:heatmap|error-(?:{'|'.join(CURVE_DIMENSIONS)}))-(?:{'|'.join(map(re.escape, FORMATS))})\.png"
)


def is_figure_name(name: str) -> bool:
    """Whether ``name`` is the file name of a figure this version draws (heatmap-float16.png, …)."""
    return FIGURE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Figure:
    """One drawn figure: ``name`` is its file stem under plots/, ``png`` its bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def plotting_available() -> bool:
    """Whether matplotlib (``pip install 'ce-audit[html]'``) can be imported."""
    import importlib.util
    import sys

    if "matplotlib" in sys.modules:
        return sys.modules["matplotlib"] is not None
    return importlib.util.find_spec("matplotlib") is not None  # found, not imported (it takes 0.3 s)


def overall_status(cell: Cell) -> str:
    """The worse of the loss and gradient statuses (``skipped`` when neither was measured)."""
    return worst_status([cell.status, cell.grad_status])


def loss_bits(cell: Cell) -> float:
    """Bits of loss error, log2(1 + max_ulp); inf where the cell is non-finite, NaN where unmeasured."""
    if cell.status == "nonfinite":
        return math.inf
    if cell.status not in RANKED or cell.status == "error" or math.isnan(cell.max_ulp):
        return math.nan
    return math.log2(1 + cell.max_ulp)


def machine_epsilon(dtype: str) -> float:
    """2^(1−p): the spacing of the dtype at 1."""
    return 2.0 ** (1 - float_format(dtype).precision)


def loss_error(cell: Cell) -> float:
    """The loss's largest error in ULPs of the dtype; inf where non-finite, NaN where unmeasured."""
    if cell.status == "nonfinite":
        return math.inf
    return cell.max_ulp if cell.status in ("ok", "inaccurate") else math.nan


def grad_error(cell: Cell) -> float:
    """The gradient's normwise error max_i ‖g_i − g*_i‖₂ / ‖g*_i‖₂ in units of the dtype's machine epsilon
    2^(1−p); inf where non-finite, NaN where unmeasured."""
    if cell.grad_status == "nonfinite":
        return math.inf
    if cell.grad_status not in ("ok", "inaccurate"):
        return math.nan
    return cell.grad_norm_rel_err / machine_epsilon(cell.dtype)


def tolerance_in_ulps(dtype: str, rtol: float) -> float:
    """rtol in units of the dtype's machine epsilon: the error in ULPs that rtol·|exact| allows at least
    (a ULP is between ½ and 1 machine epsilon of the value)."""
    return rtol / machine_epsilon(dtype)


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, 0.0)
    return (1, value) if isinstance(value, (int, float)) else (2, str(value))


def dimension_values(cells: Iterable[Cell], dimension: str) -> list[Any]:
    """The distinct values of a dimension, in order (None first, numbers, then names)."""
    return sorted({getattr(cell, dimension) for cell in cells}, key=_sort_key)


def swept_dimension(cells: list[Cell]) -> str | None:
    """The dimension that matters: of those that vary, the one along which the verdict changes most often
    with everything else held (same implementation, dtype, device, case and options); ties go to the one
    with more values, then to DIMENSIONS' order. None if none varies."""
    varying = [name for name in DIMENSIONS if len({getattr(cell, name) for cell in cells}) > 1]
    if not varying:
        return None

    keyed = [(tuple(column_value(cell, name) for name in KEY_COLUMNS), overall_status(cell))
             for cell in cells]  # fmt: skip

    def score(dimension: str) -> tuple[int, int, int]:
        held = itemgetter(*(i for i, name in enumerate(KEY_COLUMNS) if name not in (dimension, "seed")))
        verdicts: dict[tuple[Any, ...], set[str]] = defaultdict(set)
        for key, status in keyed:
            verdicts[held(key)].add(status)
        changes = sum(1 for statuses in verdicts.values() if len(statuses) > 1)
        return (changes, len(dimension_values(cells, dimension)), -DIMENSIONS.index(dimension))

    return max(varying, key=score)


def value_label(value: Any) -> str:
    if value is None:
        return "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def impl_label(cell: Cell) -> str:
    return cell.impl if cell.device == "cpu" else f"{cell.impl}@{cell.device}"


def file_stem(*parts: str) -> str:
    """A file name from words: letters, digits, '-', '_' and '.' kept, anything else '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts)).strip("-")


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer, metadata={"Software": None})  # margins set already
    return buffer.getvalue()


def _heatmap(cells: list[Cell], dtype: str, dimension: str | None) -> Figure:
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure as MplFigure

    impls = list(dict.fromkeys(impl_label(cell) for cell in cells))
    values = dimension_values(cells, dimension) if dimension else [None]
    status_at: dict[tuple[str, Any], list[str]] = defaultdict(list)
    bits_at: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for cell in cells:
        where = (impl_label(cell), getattr(cell, dimension) if dimension else None)
        status_at[where].append(overall_status(cell))
        bits_at[where].append(loss_bits(cell))
    names = list(STATUS_COLOURS)
    verdict = [[names.index(worst_status(status_at[(i, v)])) for v in values] for i in impls]
    bits = [[max((b for b in bits_at[(i, v)] if not math.isnan(b)), default=math.nan) for v in values]
            for i in impls]  # fmt: skip
    columns = [value_label(v) for v in values] if dimension else ["(one case)"]
    width = max(3.0, 0.55 * len(columns) + 1.2)
    finite = [b for row in bits for b in row if math.isfinite(b)]
    top = max([*finite, float(float_format(dtype).precision)])  # all p bits of the format wrong
    rotation = 45 if len(columns) > 6 else 0
    size = (2 * width + 2.2, 0.32 * len(impls) + 1.6)
    figure = MplFigure(figsize=size, dpi=DPI)
    margins = heatmap_margins(impls, columns, rotation, top)
    left, right = figure.subplots(1, 2, sharey=True, gridspec_kw=margins.grid(size, panels=2))
    left.imshow(verdict, cmap=ListedColormap(list(STATUS_COLOURS.values())), vmin=0, vmax=len(names) - 1,
                aspect="auto", interpolation="nearest")  # fmt: skip
    shown = [[min(b, top) if not math.isnan(b) else math.nan for b in row] for row in bits]
    image = right.imshow(shown, cmap="viridis", vmin=0, vmax=top, aspect="auto", interpolation="nearest")
    for row, impl_bits in enumerate(bits):
        for column, value in enumerate(impl_bits):
            text = "" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.1f}")
            colour = "white" if not math.isinf(value) and value < 0.6 * top else "black"
            right.text(column, row, text, ha="center", va="center", fontsize=7, color=colour)
            left.text(column, row, names[verdict[row][column]][:4], ha="center", va="center", fontsize=7)
    below = TICK + tick_labels_height(columns, 8, rotation)
    for axis, title in ((left, "verdict (worse of loss and gradient)"), (right, "loss error, bits")):
        axis.set_xticks(range(len(columns)), columns, rotation=rotation, fontsize=8)
        axis.set_xlabel(dimension or "")
        place_axis_labels(axis, below=below)
        axis.set_title(title, fontsize=9, y=1.0)  # y given: not placed above tick labels it does not have
    left.set_yticks(range(len(impls)), impls, fontsize=8)
    figure.colorbar(image, cax=figure.add_axes(margins.colorbar(size)), label="log2(1 + max ULP)")
    figure.suptitle(f"{dtype}: implementations × {dimension or 'case'}", fontsize=11, y=margins.title_y(size))
    caption = (
        f"{dtype}: the worst cell of each implementation at each {dimension or 'case'} "
        "(over every other dimension): its verdict (ok; inac: inaccurate; nonf: NaN or ±inf; erro: error; "
        "skip: not measured), and its loss error in bits, log2(1 + ULPs), on a scale up to the dtype's "
        "precision (inf: non-finite)."
    )
    return Figure(file_stem("heatmap", dtype), f"{dtype} heatmap", caption, _png(figure))


@dataclass(frozen=True)
class Point:
    """One implementation at one value of the dimension: the worst error there, whether a cell there fails
    its verdict, and the dtype's floor (the exact value rounded once) on the same cells."""

    error: float
    failing: bool
    floor: float


def _curve_panel(
    axis: Any, series: dict[str, dict[Any, Point]], band: float, what: str, unit: str, precision: int
) -> bool:
    """One panel of error curves with the tolerance band (error ≤ ``band``) and the dtype's floor; False
    when it has nothing to draw. Errors past 2^(p+3) units (all p bits wrong, and then some) are drawn at
    that edge, so that a value 1e180 ULPs off does not flatten every other curve."""
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter, NullLocator

    colours = colormaps["tab20"]
    errors = [p.error for points in series.values() for p in points.values()]
    if all(math.isnan(e) for e in errors):
        axis.set_axis_off()
        axis.text(0.5, 0.5, f"{what}: not measured", ha="center", va="center", transform=axis.transAxes)
        return False
    finite = [e for e in errors if math.isfinite(e) and e > 0]
    low = min([*finite, band]) / 10
    high = min(max([*finite, band]) * 30, 2.0 ** (precision + 3))
    axis.axhspan(low, band, color="#009E73", alpha=0.12, label="tolerance band (rtol)")
    axis.axhline(band, color="#009E73", linewidth=1)
    floors: dict[Any, float] = {}
    # Every point's marker in one collection (filled 5 points wide past tolerance, else white and 4), and
    # every × in another: two artists a panel rather than three a curve.
    dots: list[tuple[Any, float, Any, Any, float]] = []
    crosses: list[tuple[Any, Any]] = []
    for index, (name, points) in enumerate(series.items()):
        xs = [x for x, p in points.items() if not math.isnan(p.error)]
        ys = [max(min(points[x].error, high), low) for x in xs]
        colour = colours(index % 20)
        axis.plot(xs, ys, "-", color=colour, linewidth=1.2, label=name)
        for x, y in zip(xs, ys, strict=True):
            filled = points[x].failing
            dots.append((x, y, colour if filled else "white", colour, 25.0 if filled else 16.0))
            if math.isinf(points[x].error):
                crosses.append((x, colour))
        for x, point in points.items():
            if not math.isnan(point.floor):
                floors[x] = max(floors.get(x, 0.0), point.floor)
    if dots:
        x, y, face, edge, area = zip(*dots, strict=True)
        axis.scatter(x, y, s=area, c=face, edgecolors=edge, linewidths=1.0, marker="o", zorder=2.5)
    if crosses:
        x, edge = zip(*crosses, strict=True)
        axis.scatter(x, [high] * len(x), s=49.0, c=edge, linewidths=2.0, marker="x", zorder=2.5)
    if floors:
        xs = sorted(floors)
        axis.plot(xs, [max(floors[x], low) for x in xs], "--", color="#444444", linewidth=1,
                  label="floor: exact value rounded once")  # fmt: skip
    axis.set_yscale("log")
    axis.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost more to place than the rest
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: power_label(value)))
    axis.set_ylim(low, high * 1.5)
    axis.set_ylabel(f"{what}: {unit}")
    axis.set_title(f"{what} (filled: past tolerance; × on top: NaN or ±inf)", fontsize=9, y=1.0)
    axis.grid(True, which="major", alpha=0.3)
    return True


def _grad_floor(cell: Cell) -> float:
    return cell.best_grad_norm_rel_err / machine_epsilon(cell.dtype)


def _series(
    cells: list[Cell], dimension: str, error: Callable[[Cell], float], status: Callable[[Cell], str],
    floor: Callable[[Cell], float],
) -> dict[str, dict[Any, Point]]:  # fmt: skip
    """Per implementation, per value of the dimension: the worst of its cells there."""
    worst: dict[str, dict[Any, Point]] = defaultdict(dict)
    for cell in cells:
        x = getattr(cell, dimension)
        new = Point(error(cell), status(cell) in ("inaccurate", "nonfinite", "error"), floor(cell))
        old = worst[impl_label(cell)].get(x)
        if old is not None:
            new = Point(
                max(old.error, new.error) if not math.isnan(old.error) else new.error,
                old.failing or new.failing,
                max(old.floor, new.floor) if not math.isnan(old.floor) else new.floor,
            )
        worst[impl_label(cell)][x] = new
    return {name: dict(sorted(points.items())) for name, points in worst.items()}


def _curves(cells: list[Cell], dtype: str, dimension: str, rtol: float) -> Figure:
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.ticker import FuncFormatter, NullLocator

    size = (12, 4.6)
    figure = MplFigure(figsize=size, dpi=DPI)
    loss_axis, grad_axis = figure.subplots(1, 2, sharex=True)
    band = tolerance_in_ulps(dtype, rtol)
    loss = _series(cells, dimension, loss_error, lambda c: c.status, lambda c: c.best_max_ulp)
    grad = _series(cells, dimension, grad_error, lambda c: c.grad_status, _grad_floor)
    precision = float_format(dtype).precision
    has_loss = _curve_panel(loss_axis, loss, band, "loss", "max error, ULPs", precision)
    grad_unit = "max ‖g − g*‖ / ‖g*‖, machine epsilons"
    has_grad = _curve_panel(grad_axis, grad, band, "gradient", grad_unit, precision)
    values = [v for v in dimension_values(cells, dimension) if v is not None]
    x_labels = [value_label(v) for v in values] if len(values) <= 10 else [power_label(-1.0)]
    for axis in (loss_axis, grad_axis):
        if dimension == "scale" and min(values) > 0:
            axis.set_xscale("log")
        elif dimension == "offset" or max(abs(v) for v in values) / max(min(abs(v) for v in values), 1) > 100:
            axis.set_xscale("symlog", linthresh=1)
        axis.xaxis.set_minor_locator(NullLocator())
        if len(values) <= 10:
            axis.set_xticks(values, x_labels)  # the swept values themselves
        elif axis.get_xscale() != "linear":
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: power_label(value)))
        axis.set_xlabel(CURVE_DIMENSIONS[dimension])
    handles, labels = loss_axis.get_legend_handles_labels()
    drawn = [axis.get_ylim() for axis, shown in ((loss_axis, has_loss), (grad_axis, has_grad)) if shown]
    low, high = min([1.0, *(y[0] for y in drawn)]), max([1.0, *(y[1] for y in drawn)])
    margins = curves_margins(labels, low, high, x_labels)
    figure.subplots_adjust(**margins.grid(size, panels=2))
    x_ticks = max(text_points(label, 10)[1] for label in x_labels)
    for axis in (loss_axis, grad_axis):
        bottom, top_y = axis.get_ylim()
        y_ticks = widest([power_label(tick) for tick in axis.get_yticks() if bottom <= tick <= top_y], 10)
        place_axis_labels(axis, below=TICK + x_ticks, left=TICK + y_ticks)
    top = 1 - margins.top / (size[1] * 72)
    figure.legend(handles, labels, loc="upper right", bbox_to_anchor=(1 - PAD / (size[0] * 72), top),
                  borderaxespad=0, fontsize=7, frameon=False)  # fmt: skip
    title = f"{dtype}: error against {CURVE_DIMENSIONS[dimension].split(' (')[0]}"
    figure.suptitle(title, fontsize=11, y=margins.title_y(size))
    caption = (
        f"{dtype}: each implementation's largest loss error in ULPs"
        + (" and normwise gradient error in machine epsilons" if has_grad else "")
        + f" at each {dimension} (the worst over every other dimension). The band is the tolerance "
        f"rtol = {rtol:g}, {band:.3g} machine epsilons (atol lets values near 0 pass above it; the "
        "gradient's verdict is elementwise); a filled point is a cell past tolerance, × a NaN or ±inf; "
        "the dashed line is the dtype's floor, the exact values rounded once; errors past "
        f"2^{precision + 3} (every bit wrong) are drawn at the top edge."
    )
    name = file_stem("error", dimension, dtype)
    return Figure(name, f"{dtype} error vs {dimension}", caption, _png(figure))


@dataclass(frozen=True)
class FigureJob:
    """One figure to draw from ``cells``: a dtype's heatmap along ``dimension`` (the swept one; None: no
    dimension varies) or its error curves along ``dimension`` with tolerance ``rtol``."""

    kind: str  # "heatmap" or "curves"
    dtype: str
    dimension: str | None
    cells: list[Cell]
    rtol: float = 0.0


def figure_jobs(cells: list[Cell], rtols: dict[str, float]) -> list[FigureJob]:
    """The figures of the cells, in the page's order: per dtype (in the cells' order) its heatmap and its
    error curves; none for a dtype with one case (the verdict table says all a figure would)."""
    by_dtype: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        by_dtype[cell.dtype].append(cell)
    dimension = swept_dimension(cells)
    jobs: list[FigureJob] = []
    for dtype, group in by_dtype.items():
        measured = [cell for cell in group if overall_status(cell) != "skipped"] or group
        if (dimension is None or len(dimension_values(measured, dimension)) < 2) and not any(
            len(dimension_values(measured, curve)) > 1 for curve in CURVE_DIMENSIONS
        ):
            continue
        jobs.append(FigureJob("heatmap", dtype, dimension, measured))
        for curve in CURVE_DIMENSIONS:
            along = [cell for cell in measured if getattr(cell, curve) is not None]
            if len(dimension_values(along, curve)) > 1:
                rtol = rtols.get(dtype) or float_format(dtype).rtol
                jobs.append(FigureJob("curves", dtype, curve, along, rtol))
    return jobs


def draw_figure(job: FigureJob) -> Figure:
    """The figure of one job (needs matplotlib)."""
    if job.kind == "heatmap":
        return _heatmap(job.cells, job.dtype, job.dimension)
    assert job.dimension is not None
    return _curves(job.cells, job.dtype, job.dimension, job.rtol)


def figures_by_dtype(jobs: list[FigureJob], figures: list[Figure]) -> dict[str, list[Figure]]:
    """The drawn figures of ``jobs`` grouped by dtype, in order."""
    grouped: dict[str, list[Figure]] = defaultdict(list)
    for job, figure in zip(jobs, figures, strict=True):
        grouped[job.dtype].append(figure)
    return dict(grouped)


def audit_figures(cells: list[Cell], rtols: dict[str, float]) -> dict[str, list[Figure]]:
    """Per dtype (in the cells' order), its heatmap and its error curves, drawn here. Needs matplotlib."""
    jobs = figure_jobs(cells, rtols)
    return figures_by_dtype(jobs, [draw_figure(job) for job in jobs])

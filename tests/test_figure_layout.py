"""The figures' fixed margins (reports/figure_layout.py): every label, title and legend inside the figure
and clear of every panel it does not belong to, for a heatmap with rotated column labels and the curves."""

from __future__ import annotations

from pathlib import Path

import pytest

from ce_audit.reports import plots
from ce_audit.reports.csv import read_cells
from ce_audit.reports.figure_layout import Margins, text_points, tick_labels_height
from tests.test_html_report import _cli, needs_matplotlib

SCALES = ["1", "3", "10", "30", "100", "300", "1000"]  # seven columns: the heatmap's labels are rotated
SWEEP = [
    "sweep", "--impl", "naive", "--impl", "log_softmax_nll", "--dtype", "float16", "--device", "cpu",
    "--distribution", "normal", *(arg for scale in SCALES for arg in ("--scale", scale)),
    "--offset", "0", "--vocab", "64", "--batch", "8", "-q",
]  # fmt: skip


def _labels(figure):  # the texts around the panels, with the panel each belongs to (None: the figure's)
    for axes in figure.axes:
        for text in [*axes.get_xticklabels(), *axes.get_yticklabels(), axes.xaxis.label, axes.yaxis.label,
                     axes.title]:  # fmt: skip
            if text.get_visible() and text.get_text():
                yield axes, text
    for legend in figure.legends:
        yield None, legend
    if figure._suptitle is not None:
        yield None, figure._suptitle


@needs_matplotlib
def test_labels_inside_the_figure_and_off_other_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert _cli([*SWEEP, "--out", tmp_path / "out"]) == 0
    cells = read_cells(tmp_path / "out" / "summary.csv").cells
    drawn = []
    real_png = plots._png
    monkeypatch.setattr(plots, "_png", lambda figure: (drawn.append(figure), real_png(figure))[1])
    figures = plots.audit_figures(cells, {})
    assert [figure.name for figure in figures["float16"]] == ["heatmap-float16", "error-scale-float16"]
    assert any(label.get_rotation() == 45 for label in drawn[0].axes[0].get_xticklabels())
    for figure in drawn:
        renderer = figure.canvas.get_renderer()
        frame = figure.bbox
        panels = [(axes, axes.get_window_extent(renderer)) for axes in figure.axes]
        for owner, text in _labels(figure):
            box = text.get_window_extent(renderer)
            inside = frame.x0 - 0.5 <= box.x0 and box.x1 <= frame.x1 + 0.5
            assert inside and frame.y0 - 0.5 <= box.y0 and box.y1 <= frame.y1 + 0.5, (figure, str(text))
            for axes, panel in panels:
                if axes is not owner:
                    overlap = min(box.x1, panel.x1) - max(box.x0, panel.x0) > 1 and (
                        min(box.y1, panel.y1) - max(box.y0, panel.y0) > 1
                    )
                    assert not overlap, (str(text), axes)


def test_margins_arithmetic():
    margins = Margins(left=72, right=36, bottom=18, top=9, gap=36, bar_gap=6, bar=12)
    grid = margins.grid((10, 5), panels=2)
    assert grid["left"] == pytest.approx(72 / 720) and grid["right"] == pytest.approx(1 - 36 / 720)
    assert grid["bottom"] == pytest.approx(18 / 360) and grid["top"] == pytest.approx(1 - 9 / 360)
    assert grid["wspace"] == pytest.approx(36 / ((720 - 72 - 36 - 36) / 2))
    left, low, width, height = margins.colorbar((10, 5))
    assert left == pytest.approx((720 - 36 + 6) / 720) and width == pytest.approx(12 / 720)
    assert low + height / 2 == pytest.approx((18 + (360 - 27) / 2) / 360)


@needs_matplotlib
def test_text_sizes_grow_with_the_text_and_rotation():
    short, long = text_points("ok", 8), text_points("log_softmax_nll", 8)
    assert 0 < short[0] < long[0] and short[1] > 0
    assert tick_labels_height(["10000"], 8, 45) > tick_labels_height(["10000"], 8, 0)

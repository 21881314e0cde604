"""The terminal report at 80, 120 and 200 columns, with and without colour: nothing cut, nothing past the
width, the verdict first, every verdict readable as a mark or a word, the legend present; `ce-audit list`
at 80 columns; a PNG
screenshot of the 80-column report rendered by headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import tiny_overrides
from rich.console import Console

from ce_audit.config import load_config
from ce_audit.implementations import REGISTRY
from ce_audit.plugins import prepare
from ce_audit.ranking import CELL_VERDICTS
from ce_audit.reports.listing import print_implementations
from ce_audit.reports.table import STYLES, print_report, verdict_text
from ce_audit.run.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("isolated_plugins")

IMPLS = ["naive", "softmax_log", "shifted", "log_softmax_nll", "fused", "accurate", "numpy_eps", "rounded"]
PATHS = ["ce-audit-report/summary.csv", "ce-audit-report/report.json"]


@pytest.fixture(scope="module")
def cells():
    """Every status but error: overflow (NaN/Inf), cancellation under an offset, the epsilon cap, ok."""
    overrides = tiny_overrides(
        dtypes=["float16", "bfloat16", "float32", "float64"],
        impls=IMPLS,
        distributions=["normal", "adversarial", "spike"],
        scales=[1.0, 10.0, 100.0],
        offsets=[0.0, 1e4],
        vocabs=[64],
        batches=[8],
    )
    return run_sweep(load_config(None, overrides)).cells


def render(cells, width: int, detail: bool | None = None, **console_options) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), **console_options)
    print_report(cells, console, PATHS, 2.5, detail)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 120, 200])
@pytest.mark.parametrize("detail", [None, True])
def test_nothing_is_cut_and_no_line_passes_the_width(cells, width, detail):
    text = render(cells, width, detail, no_color=True)
    assert "…" not in text  # no number or name truncated
    assert all(len(line.rstrip()) <= width for line in text.splitlines()), width
    for name in IMPLS:
        assert re.search(rf"(^|\s){name}(\s|:|$)", text, re.M), name  # every name whole
    flowing = " ".join(text.split())
    assert (
        "Legend: ✗ ×N = worse than PyTorch's kernel on the same rows" in flowing and "✓ = within" in flowing
    )
    assert text.lstrip().startswith("Verdict per implementation and dtype")  # the verdict first, always


def test_the_compact_default_has_a_verdict_per_implementation_and_dtype(cells):
    text = render(cells, 80)
    header = next(line for line in text.splitlines() if line.lstrip().startswith("implementation"))
    assert header.split() == ["implementation", "float16", "bfloat16", "float32", "float64"]
    rows = [line.split()[0] for line in text.splitlines()[3:] if line.strip() and not line.startswith(" ")]
    naive = next(line for line in text.splitlines() if line.startswith("naive "))
    assert (
        naive.count("✗ NaN/Inf") == 4
    )  # exp overflows in every dtype at scale 100, where PyTorch's does not
    rounded = next(line for line in text.splitlines() if line.startswith("rounded "))
    assert rounded.split()[1:] == ["✓"] * 4
    assert rows.index("naive") < rows.index("fused") < rows.index("rounded")  # worse first, fine last
    assert "the verdict of each case" not in text  # the grid is behind --detail
    assert "Next: --detail for the per-case tables" in text
    assert "ce-audit-report/summary.csv for every cell" in text
    assert len(text.splitlines()) < 60


def test_the_story_wraps_on_words_with_a_hanging_indent(cells):
    text = render(cells, 80, no_color=True)
    lines = text.splitlines()
    start = lines.index("Worse than it has to be (than PyTorch's kernel on the same rows)")
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line)
    assert any(line.startswith("  naive: ") for line in block)
    assert any(line.startswith("      ") for line in block)  # continuation lines hang by four more
    joined = " ".join(line.strip() for line in block)
    assert "exp overflows above 11.09" in joined  # a number never split over two lines
    assert "non-finite where PyTorch is finite" in joined


def test_the_layout_does_not_change_with_the_width_detail_adds_the_grid_after_the_verdict(cells):
    wide = render(cells, 200)
    assert "the verdict of each case" not in wide and "Next: --detail" in wide
    text = render(cells, 200, detail=True)
    assert text.index("Verdict per implementation") < text.index("float16: the verdict of each case")
    assert "Every finding" in text
    assert "columns: s=S logit scale, +O/-O common offset added to every logit" in " ".join(text.split())
    assert "Next: --detail" not in text


def test_detail_false_never_shows_the_grid(cells):
    assert "the verdict of each case" not in render(cells, 400, detail=False)


def test_status_reads_without_colour(cells, monkeypatch):
    """Under NO_COLOR no escape codes are written, and marks and words still tell the statuses apart."""
    monkeypatch.setenv("NO_COLOR", "1")
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True)
    print_report(cells, console, PATHS, 2.5, True)
    written = console.file.getvalue()
    assert "\x1b[1m" in written  # styled (bold) …
    assert not re.search(r"\x1b\[(\d+;)*(3[0-8]|9[0-7])[;m]", written)  # … but no foreground colour
    text = console.export_text()
    assert "✓" in text and "✗ ×" in text and "NaN/Inf" in text and "=pt" in text
    ok = [c for c in cells if c.impl == "rounded" and c.dtype == "float32"]
    bad = [c for c in cells if c.impl == "numpy_eps" and c.dtype == "float32"]
    assert verdict_text(ok).plain == "✓"
    assert verdict_text(bad).plain.startswith("✗ ") and verdict_text(bad).plain != verdict_text(ok).plain


def test_status_is_coloured_on_a_colour_terminal(cells):
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True, color_system="256")
    print_report(cells, console, PATHS, 2.5)
    written = console.file.getvalue()
    assert "\x1b[32m✓" in written  # green
    assert re.search(r"\x1b\[1;31m✗ NaN/Inf", written)  # bold red: worse than PyTorch
    assert re.search(r"\x1b\[36m(=pt|floor)", written)  # the dtype's limits in cyan, never red
    assert not re.search(r"\x1b\[[0-9;]*31m(=pt|floor)", written)


def test_every_verdict_has_a_colour():
    assert set(STYLES) == set(CELL_VERDICTS)


def test_list_splits_no_word_at_80_columns():
    prepare((), ())
    console = Console(record=True, width=80, file=io.StringIO(), no_color=True)
    print_implementations(console)
    text = console.export_text()
    assert all(len(line.rstrip()) <= 80 for line in text.splitlines())
    words = set(text.split())
    for entry in REGISTRY.values():
        assert entry.name in words
        for word in entry.description.split():
            assert word.strip(",;:") in {w.strip(",;:") for w in words}, (entry.name, word)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium")
def test_screenshot_of_the_80_column_report(cells, tmp_path):
    """The 80-column report as SVG (Rich), then PNG from headless Chromium: it renders, and is not blank."""
    console = Console(record=True, width=80, file=io.StringIO(), force_terminal=True, color_system="256")
    print_report(cells, console, PATHS, 2.5)
    svg = tmp_path / "report-80.svg"
    console.save_svg(str(svg), title="ce-audit sweep (80 columns)")
    page = tmp_path / "report-80.html"
    page.write_text(f"<html><body style='margin:0;background:#fff'>{svg.read_text()}</body></html>")
    png = tmp_path / "report-80.png"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={png}",
            "--window-size=1000,1500",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert png.exists(), done.stderr[-2000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # a blank page compresses to a few kB

"""report.html and plots/: written by a sweep, rebuilt by `ce-audit report DIR` (identically, without
torch), self-contained, findings linked to existing cells, a page without matplotlib, and the page as a
real headless browser (Debian's Chromium) renders it: the heatmap's colours on the screenshot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ce_audit.cli import main
from ce_audit.errors import AuditError
from ce_audit.plugins import isolated
from ce_audit.printable import plural
from ce_audit.reports import plots
from ce_audit.reports.csv import read_cells
from ce_audit.reports.html import finding_cells
from ce_audit.reports.rebuild import rebuild_report
from ce_audit.results import Cell

ROOT = Path(__file__).resolve().parents[1]
# float16 naive overflows from scale 100 on (nonfinite), shifted stays finite: both colours on the heatmap.
SWEEP = [
    "sweep", "--impl", "naive", "--impl", "shifted", "--dtype", "float16", "--device", "cpu",
    "--distribution", "normal", "--scale", "1", "--scale", "10", "--scale", "100",
    "--offset", "0", "--offset", "10000", "--vocab", "64", "--batch", "8", "-q",
]  # fmt: skip
needs_matplotlib = pytest.mark.skipif(not plots.plotting_available(), reason="matplotlib (the html extra)")


def _cli(args: list[str]) -> int:
    with isolated():
        try:
            main([str(arg) for arg in args])
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report"
    assert _cli([*SWEEP, "--out", out]) == 0
    return out


def _copy_without_page(report_dir: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("summary.csv", "report.json"):
        shutil.copy(report_dir / name, target / name)
    return target


def test_sweep_writes_a_self_contained_page(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from a network
    assert not re.search(r"""src=["'](?!data:image/png;base64,)""", page)  # every image inline
    cells = read_cells(report_dir / "summary.csv").cells
    ids = re.findall(r'<tr id="cell-(\d+)"', page)
    assert ids == [str(i) for i in range(len(cells))]
    for target in re.findall(r'href="#cell-(\d+)"', page):
        assert int(target) < len(cells)
    assert "Every finding" in page and "naive: float16" in page
    assert (
        page.index("Verdict per implementation")
        < page.index("Worse than it has to be")
        < page.index('id="figures"')
    )


@needs_matplotlib
def test_sweep_draws_the_heatmap_and_the_error_curves(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    names = sorted(path.name for path in (report_dir / "plots").iterdir())
    assert names == ["error-offset-float16.png", "error-scale-float16.png", "heatmap-float16.png"]
    for name in names:
        assert (report_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count('src="data:image/png;base64,') == 3
    assert "implementations × scale" in page or "along <b>scale</b>" in page


def test_findings_link_to_the_cells_they_name(report_dir):
    cells = read_cells(report_dir / "summary.csv").cells
    from ce_audit.findings import findings

    lines = findings(cells)
    naive = next(line for line in lines if line.startswith("naive:"))
    linked = finding_cells(naive, cells)
    assert linked and all(cells[i].impl == "naive" for i in linked)
    assert {cells[i].status for i in linked} >= {"nonfinite"}
    assert all(plots.overall_status(cells[i]) != "ok" or cells[i].flag == "worse" for i in linked)


def test_report_command_rebuilds_the_same_page_without_torch(report_dir, tmp_path):
    copy = _copy_without_page(report_dir, tmp_path / "copy")
    script = textwrap.dedent(
        f"""
        import sys
        from ce_audit.cli import main
        try:
            main(["report", {str(copy)!r}])
        except SystemExit as done:
            print("EXIT", done.code)
        print("RESULT", "torch" in sys.modules)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "RESULT False", done.stdout
    assert f"wrote {copy / 'report.html'}" in done.stdout
    assert (copy / "report.html").read_bytes() == (report_dir / "report.html").read_bytes()
    if plots.plotting_available():
        for png in (report_dir / "plots").iterdir():
            assert (copy / "plots" / png.name).read_bytes() == png.read_bytes()


def test_page_without_matplotlib_keeps_tables_and_findings(report_dir, tmp_path, monkeypatch):
    copy = _copy_without_page(report_dir, tmp_path / "copy")
    (copy / "plots").mkdir()
    (copy / "plots" / "heatmap-float16.png").write_bytes(b"the sweep's figure")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert not plots.plotting_available()
    with pytest.raises(AuditError, match="cannot redraw the figures in .*: matplotlib is not installed"):
        rebuild_report(copy)  # figures it cannot draw again are not thrown away
    assert (copy / "plots" / "heatmap-float16.png").read_bytes() == b"the sweep's figure"
    assert not (copy / "report.html").exists()
    shutil.rmtree(copy / "plots")  # a set without figures: the page is written, with the note
    written = rebuild_report(copy)
    assert written == [copy / "report.html"]
    page = written[0].read_text(encoding="utf-8")
    assert "The plots need matplotlib" in page and "ce-audit[html]" in page
    assert "<img" not in page and not (copy / "plots").exists()  # no stale figure beside it
    assert '<tr id="cell-0"' in page and "naive: float16" in page


def test_report_command_rejects_a_directory_without_a_summary(tmp_path, capsys):
    assert _cli(["report", tmp_path / "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ce-audit: error: summary ") and "does not exist" in err
    assert len(err.strip().splitlines()) == 1


def _cell(scale: float, vocab: int, status: str, impl: str = "naive") -> Cell:
    return Cell(impl, "float16", "cpu", "normal", scale, 0.0, 8, vocab, 0, status=status, grad_status="ok")


def test_swept_dimension_is_the_one_the_verdict_changes_along():
    # vocab differs between two groups (as between two [[grids]]) but never with the rest held; scale does
    cells = [_cell(1, 100, "ok"), _cell(100, 100, "nonfinite"), _cell(1, 5000, "inaccurate")]
    assert plots.swept_dimension(cells) == "scale"
    assert plots.swept_dimension([_cell(1, 100, "ok")]) is None
    assert plots.swept_dimension([_cell(1, 100, "ok"), _cell(1, 200, "ok")]) == "vocab"


def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _screenshot(page: Path, shot: Path, profile: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary found")
    command = [
        browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]


def _pixels_near(image, colour: str, tolerance: float = 0.03) -> int:
    import numpy as np

    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < tolerance).sum())


@needs_matplotlib
def test_chromium_renders_the_figures(report_dir, tmp_path, monkeypatch):
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    _screenshot(report_dir / "report.html", shot, tmp_path / "profile")
    image = imread(shot)
    assert image.shape[0] >= 1500 and image.shape[1] >= 1200
    assert image[..., :3].std() > 0.05  # not a blank page
    # The heatmap's verdict colours: shifted ok (green), naive nonfinite (vermilion) from scale 100.
    assert _pixels_near(image, plots.STATUS_COLOURS["ok"]) > 2000
    assert _pixels_near(image, plots.STATUS_COLOURS["nonfinite"]) > 2000
    # The same page without its figures has none of those colours: the check sees the figures.
    copy = _copy_without_page(report_dir, tmp_path / "bare")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        rebuild_report(copy)
    bare = tmp_path / "bare.png"
    _screenshot(copy / "report.html", bare, tmp_path / "profile-bare")
    plain = imread(bare)
    assert plain[..., :3].std() > 0.05
    assert _pixels_near(plain, plots.STATUS_COLOURS["ok"]) < 50


def test_report_markdown_lists_or_inlines_the_plots(report_dir, tmp_path):
    copy = _copy_without_page(report_dir, tmp_path / "copy")
    listed, inline = tmp_path / "listed.md", tmp_path / "inline.md"
    assert _cli(["report", copy, "--markdown", listed]) == 0
    assert _cli(["report", copy, "--markdown", inline, "--inline-images"]) == 0
    pngs = sorted(path.name for path in (copy / "plots").glob("*.png"))
    text, embedded = listed.read_text(encoding="utf-8"), inline.read_text(encoding="utf-8")
    assert text.startswith("### ce-audit verdict") and "\n### ce-audit plots" in text
    if not plots.plotting_available():
        assert pngs == [] and "need matplotlib" in text
        return
    assert pngs and all(f"`plots/{name}`" in text for name in pngs) and "data:" not in text
    assert embedded.count("](data:image/png;base64,") == len(pngs)


def test_the_page_names_what_the_verdict_changes_with_and_counts_in_words(report_dir):
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    cells = read_cells(report_dir / "summary.csv").cells
    assert "<p>The verdict changes most along <b>scale</b>, the heatmaps' axis.</p>" in page
    assert f"<p>{len(cells)} cells: " in page  # the closing line's counts by verdict
    assert not re.search(r"\b1 (cells|rows|cases|implementations)\b", page)


def test_plural_agrees_with_the_count():
    assert [plural(n, "cell") for n in (0, 1, 2)] == ["0 cells", "1 cell", "2 cells"]
    assert plural(1, "class", "classes") == "1 class" and plural(3, "class", "classes") == "3 classes"

"""report.html: one self-contained page (inline CSS, figures as base64 PNG, no script, no network) and
the same figures as PNG files in ``plots/`` for a CI job summary.

The page holds: what was run (from report.json), a verdict per implementation × dtype, the findings in
words each linked to its cells, per dtype the figures of ``plots.py``, and a table of every cell (anchors
``#cell-N``). Without matplotlib the page is still written, with the tables and findings and a line saying
that the plots need the ``html`` extra. Torch is never imported.

``reports/rebuild.py`` redraws both from DIR/summary.csv and DIR/report.json (``ce-audit report DIR``).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ce_audit.findings import findings
from ce_audit.options import options_label
from ce_audit.printable import plural, printable
from ce_audit.ranking import CELL_VERDICTS, cell_verdict, factor, implementation_name, ranked
from ce_audit.reports import plots
from ce_audit.reports.figure_painter import FigureDrawing
from ce_audit.reports.files import ReportFile
from ce_audit.reports.table import closing_line, legend, verdict_text
from ce_audit.results import Cell
from ce_audit.statuses import FAILING
from ce_audit.verdict_story import story

HTML_NAME = "report.html"
PLOTS_DIR = "plots"
EXTRA_HINT = "pip install 'ce-audit[html]'"
MAX_LINKS = 12  # cells linked from one finding before "… and N more"
MEASURED = ("ok", "inaccurate")  # statuses whose error columns hold measured values
# Where a findings line passes from one dtype's part to the next ("…; float32 Inf from …").
PART_BOUNDARY = re.compile(r"; (?=(?:float16|bfloat16|float32|float64) )")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em;
       color: #222; background: #fff; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } code { background: #f4f4f4; padding: 0 .25em; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.v-worse, .v-past { background: #f8cfb9; font-weight: bold; } .v-error { background: #f2d4e6; }
.v-pytorch, .v-floor { background: #d8eef5; } .v-ok { background: #d9f2e6; } .v-skipped { color: #666; }
.trace { font-size: 90%; color: #333; } .trace code { white-space: normal; }
.s-ok { background: #d9f2e6; } .s-inaccurate { background: #fde9bf; } .s-nonfinite { background: #f8cfb9; }
.s-error { background: #f2d4e6; } .s-skipped, .s-off, .s-na { background: #eee; color: #666; }
tr:target { outline: 3px solid #0072B2; } tr:target td { background: #d6eaf8; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 12px; max-width: 1000px; }
.findings li { margin-bottom: .5em; } .links { font-size: 12px; }
.note { background: #fff6d6; padding: .5em; }
"""


def _e(value: Any) -> str:
    return html.escape(printable(str(value)), quote=True)


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _status_class(status: str) -> str:
    return "s-" + ("na" if status == "n/a" else status or "skipped")


def _status_cell(status: str) -> str:
    return f'<td class="{_status_class(status)}">{_e(status or "—")}</td>'


# The cell table's columns: header, how a cell reads, numeric (right-aligned).
CELL_TABLE: tuple[tuple[str, Any, bool], ...] = (
    ("impl", plots.impl_label, False),
    ("dtype", lambda c: c.dtype, False),
    ("distribution", lambda c: c.distribution, False),
    ("scale", lambda c: _number(c.scale), True),
    ("offset", lambda c: _number(c.offset), True),
    ("vocab", lambda c: c.vocab, True),
    ("batch", lambda c: c.batch, True),
    ("options", options_label, False),
    ("max ULP", lambda c: _number(c.max_ulp), True),
    ("bits", lambda c: _number(plots.loss_bits(c)), True),
    ("max rel", lambda c: _number(c.max_rel_err), True),
    ("NaN/Inf rows", lambda c: f"{c.nan_rows}/{c.inf_rows}" if c.nan_rows or c.inf_rows else "", True),
    ("grad max rel", lambda c: _number(c.grad_max_rel_err) if c.grad_status in MEASURED else "", True),
    ("flag", lambda c: c.flag, False),
)


def finding_cells(line: str, cells: list[Cell]) -> list[int]:
    """Indices of the cells a findings line speaks of: the cells carrying its note; or, for a line about an
    implementation ("impl: …"), its cells that the line is about (a convention, a 0-d mean, a write into
    the input) or else its cells that are not ok or are worse than PyTorch."""
    noted = [i for i, cell in enumerate(cells) if cell.notes and line.startswith(cell.notes)]
    if noted:
        return noted
    name = line.partition(": ")[0]
    mine = [i for i, cell in enumerate(cells) if plots.impl_label(cell) == name]
    for marker, about in (
        ("convention, not a failure", lambda c: bool(c.convention)),
        ("returns a 0-d mean", lambda c: c.value_kind == "mean"),
        ("writes into its input", lambda c: c.wrote_input),
    ):
        if marker in line:
            return [i for i in mine if about(cells[i])]
    return [i for i in mine if plots.overall_status(cells[i]) in FAILING or cells[i].flag == "worse"]


def _findings_html(cells: list[Cell]) -> str:
    lines = findings(cells)
    if not lines:
        return "<p>Every measured cell is within tolerance; nothing to report.</p>"
    items = []
    for line in lines:
        linked = finding_cells(line, cells)
        links = " ".join(f'<a href="#cell-{i}">#{i}</a>' for i in linked[:MAX_LINKS])
        if len(linked) > MAX_LINKS:
            links += f" … and {len(linked) - MAX_LINKS} more"
        where = f'<div class="links">{plural(len(linked), "cell")}: {links}</div>'
        name, colon, rest = line.partition(": ")
        parts = PART_BOUNDARY.split(rest) if colon else []
        if len(parts) > 1:
            text = f"<b>{_e(name)}</b>:<ul>" + "".join(f"<li>{_e(part)}</li>" for part in parts) + "</ul>"
        else:
            text = _e(line)
        items.append(f"<li>{text}{_traces_html([cells[i] for i in linked])}{where if linked else ''}</li>")
    return '<ul class="findings">' + "".join(items) + "</ul>"


MAX_TRACES = 4  # distinct observed causes shown under one finding


def _traces_html(cells: list[Cell]) -> str:
    """What the traces of a finding's cells observed (ce_audit.trace): each distinct op, line and local
    error once, with how many cells showed it; ``ce-audit explain`` prints every op of one cell."""
    seen: dict[str, list[str]] = {}  # the cause without its numbers → the causes of its cells
    for cell in cells:
        if cell.traced_cause:
            seen.setdefault(re.sub(r"[-+]?\d[\d.e+×%-]*", "#", cell.traced_cause), []).append(
                cell.traced_cause
            )
    if not seen:
        return ""
    shown = sorted(seen.values(), key=lambda causes: -len(causes))[:MAX_TRACES]
    rows = "".join(
        f"<li><code>{_e(causes[0])}</code>"
        + (f" (and {plural(len(causes) - 1, 'more cell')} alike)" if causes[1:] else "")
        + "</li>"
        for causes in shown
    )
    more = f"<li>… and {len(seen) - MAX_TRACES} more</li>" if len(seen) > MAX_TRACES else ""
    return f'<div class="trace">observed by the trace:<ul>{rows}{more}</ul></div>'


def _overview_html(cells: list[Cell]) -> str:
    """The verdict table of the terminal (the same marks, ce_audit.ranking's order: worse than it has to be,
    the dtype's limits, fine), each entry linked to the cell that decides it; then the story's lines."""
    dtypes = list(dict.fromkeys(cell.dtype for cell in cells))
    at: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, cell in enumerate(cells):
        at[(implementation_name(cell), cell.dtype)].append(index)
    rows = ["<tr><th>implementation</th>" + "".join(f"<th>{_e(d)}</th>" for d in dtypes) + "</tr>"]
    for verdict in ranked(cells):
        row = f'<tr class="g-{verdict.group}"><td>{_e(verdict.name)}</td>'
        for dtype in dtypes:
            indices = at.get((verdict.name, dtype), [])
            if not indices:
                row += "<td></td>"
                continue
            own = [cells[i] for i in indices]
            verdicts = [cell_verdict(cell) for cell in own]
            top = next(v for v in CELL_VERDICTS if v in verdicts)
            first = indices[verdicts.index(top)]
            if top == "worse":
                first = max(
                    (i for i in indices if cell_verdict(cells[i]) == "worse"), key=lambda i: factor(cells[i])
                )
            mark = verdict_text(own).plain
            row += f'<td class="v-{top}"><a href="#cell-{first}">{_e(mark)}</a></td>'
        rows.append(row + "</tr>")
    told = story(cells)
    parts = ["<table>" + "".join(rows) + "</table>"]
    for title, lines in told.sections:
        parts.append(
            f"<h3>{_e(title)}</h3><ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>"
        )
    return "".join(parts)


def _cells_html(cells: list[Cell]) -> str:
    header = "<tr><th>#</th>" + "".join(f"<th>{_e(name)}</th>" for name, _, _ in CELL_TABLE)
    header += "<th>status</th><th>gradient</th></tr>"
    rows = [header]
    for index, cell in enumerate(cells):
        values = "".join(
            f'<td class="n">{_e(read(cell))}</td>' if numeric else f"<td>{_e(read(cell))}</td>"
            for _, read, numeric in CELL_TABLE
        )
        rows.append(
            f'<tr id="cell-{index}"><td class="n">{index}</td>{values}'
            f"{_status_cell(cell.status)}{_status_cell(cell.grad_status)}</tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _meta_html(document: dict[str, Any] | None) -> str:
    if not document:
        return '<p class="meta">No report.json beside the summary: run details unknown.</p>'
    versions = ", ".join(f"{k} {v}" for k, v in (document.get("versions") or {}).items())
    devices = ", ".join(f"{k}: {v}" for k, v in (document.get("devices") or {}).items())
    parts = [f"command <code>{_e(document.get('command', '?'))}</code>"]
    parts.append(f"seed {_e(document.get('seed', '?'))}")
    if "timestamp" in document:  # written by versions before run.json held the timing
        parts += [f"run at {_e(document['timestamp'])}", f"{_e(document.get('seconds', '?'))} s"]
    text = " · ".join(parts)
    if devices:
        text += f"<br>devices: {_e(devices)}"
    if versions:
        text += f"<br>versions: {_e(versions)}"
    return f'<p class="meta">{text}</p>'


def rtols_of(document: dict[str, Any] | None) -> dict[str, float]:
    """The relative tolerance of each dtype in the run's config (report.json), where it is recorded."""
    tolerances = ((document or {}).get("config") or {}).get("tolerances") or {}
    return {
        dtype: float(entry["rtol"])
        for dtype, entry in tolerances.items()
        if isinstance(entry, dict) and isinstance(entry.get("rtol"), (int, float))
    }


def _figures_html(figures: dict[str, list[plots.Figure]] | None) -> str:
    if figures is None:
        return (
            '<p class="note">The plots need matplotlib, which is not installed: '
            f"<code>{_e(EXTRA_HINT)}</code>, then <code>ce-audit report DIR</code> redraws this page.</p>"
        )
    parts = []
    for dtype, drawn in figures.items():
        parts.append(f'<h3 id="dtype-{_e(dtype)}">{_e(dtype)}</h3>')
        for figure in drawn:
            data = base64.b64encode(figure.png).decode("ascii")
            parts.append(
                f'<figure id="fig-{_e(figure.name)}"><img alt="{_e(figure.title)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{_e(figure.caption)}</figcaption></figure>'
            )
    return "".join(parts)


FiguresByDtype = dict[str, list[plots.Figure]] | None


def html_report(
    cells: list[Cell], document: dict[str, Any] | None, figures: FiguresByDtype | Callable[[], FiguresByDtype]
) -> str:
    """The page: run details, the verdict (as the terminal tells it), figures (None: matplotlib is missing;
    a callable: called for them once the rest of the page is rendered, while painters draw them), every
    finding linked to its cells, and the cells."""
    dimension = plots.swept_dimension(cells)
    findings_html, cells_html = _findings_html(cells), _cells_html(cells)
    figures = figures() if callable(figures) else figures
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>ce-audit report: {plural(len(cells), 'cell')}</title>",
            f"<style>{STYLE}</style></head><body>",
            "<h1>ce-audit report</h1>",
            _meta_html(document),
            '<p><a href="#figures">Figures</a> · <a href="#findings">Every finding</a> · '
            '<a href="#cells">Cells</a></p>',
            "<h2>Verdict per implementation and dtype (most severe first)</h2>"
            f"<p>{_e(closing_line(cells, None))}. Each entry is the most severe verdict over the "
            "implementation's cells in that dtype, linked to the cell that decides it.</p>",
            _overview_html(cells),
            f'<p class="legend">{_e(legend(cells, False))}</p>',
            '<h2 id="figures">Figures</h2>',
            f"<p>The verdict changes most along <b>{_e(dimension)}</b>, the heatmaps' axis.</p>"
            if dimension
            else "",
            _figures_html(figures),
            '<h2 id="findings">Every finding</h2>',
            findings_html,
            '<h2 id="cells">Cells</h2>',
            cells_html,
            "</body></html>",
            "",
        ]
    )


def html_files(cells: list[Cell], document: dict[str, Any] | None) -> list[ReportFile]:
    """report.html and (when there are figures) the plots/ folder as members of the report set
    (``ReportFile``s); the figures are drawn once, for both, by the run's painter where one was started
    (ce_audit.reports.figure_painter: it starts on them now, while the other members are written). The cells
    are as summary.csv holds them (``AuditResult.summary_cells``), so `ce-audit report` draws the same page
    from summary.csv."""
    drawing = None
    if plots.plotting_available():
        drawing = FigureDrawing(plots.figure_jobs(cells, rtols_of(document)))

    def figures() -> FiguresByDtype:
        return None if drawing is None else plots.figures_by_dtype(drawing.jobs, drawing.figures())

    def write_page(path: Path) -> None:
        path.write_text(html_report(cells, document, figures), encoding="utf-8")

    def write_plots(path: Path) -> None:
        assert drawing is not None
        path.mkdir()
        for figure in drawing.figures():
            (path / f"{figure.name}.png").write_bytes(figure.png)

    members = [ReportFile(HTML_NAME, write_page)]
    return [*members, ReportFile(PLOTS_DIR, write_plots)] if drawing is not None and drawing.jobs else members


def plots_markdown(directory: str | Path, inline: bool = False) -> str:
    """A Markdown section on the figures in DIR/plots/ (other files there aside) for a CI job summary: the
    images inline as data: URIs (``inline``; for platforms whose Markdown shows them: GitHub's job summary
    strips data: images), or their names, to be found in the uploaded report directory."""
    folder = Path(directory) / PLOTS_DIR
    pngs = sorted(p for p in folder.glob("*.png") if plots.is_figure_name(p.name)) if folder.is_dir() else []
    lines = ["### ce-audit plots", ""]
    if not pngs:
        return "\n".join([*lines, f"No plots in {folder} (they need matplotlib: `{EXTRA_HINT}`).", ""])
    if inline:
        for png in pngs:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            lines += [f"![{png.stem}](data:image/png;base64,{data})", ""]
        return "\n".join(lines)
    lines.append(f"In the uploaded report directory, beside {HTML_NAME} (which shows them all):")
    lines += ["", *(f"- `{PLOTS_DIR}/{png.name}`" for png in pngs), ""]
    return "\n".join(lines)

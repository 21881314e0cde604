"""The terminal report, designed for 80 columns and up.

By default it is compact: one verdict per implementation × dtype, the worst finding of each implementation
in one paragraph, the tally, a one-line legend and where to look next. With ``detail`` (``--detail``), or
where the terminal is wide enough to show each dtype's case table whole, the per-dtype table of cases ×
implementations and every finding come first. Numbers and names are never cut: a case table is split into
bands of implementations that fit the width; text wraps on word boundaries with a hanging indent. Every
status carries a mark or a word, so it reads without colour (``NO_COLOR``)."""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ce_audit.dtypes import LIMITED_FLOAT64_REFERENCE, reference_precision
from ce_audit.findings import findings
from ce_audit.options import label_meanings, options_label
from ce_audit.printable import plural
from ce_audit.ranking import CELL_VERDICTS, cell_verdict, factor, factor_text, implementation_name, ranked
from ce_audit.results import Cell
from ce_audit.statuses import UNMEASURED
from ce_audit.verdict import cell_status
from ce_audit.verdict_story import counts_text, story

STYLES = {
    "worse": "bold red",
    "error": "magenta",
    "past": "red",
    "pytorch": "cyan",
    "floor": "cyan",
    "ok": "green",
    "skipped": "dim",
}
"""Each cell verdict's colour (ce_audit.ranking.CELL_VERDICTS): red only for what is worse than it has to
be; the dtype's limits (PyTorch's kernel included) in cyan, never red."""

# what the short labels of a case table's rows and columns stand for (ce_audit.options.options_label)
LABEL_MEANINGS = {
    "s=": "s=S logit scale",
    "+": "+O/-O common offset added to every logit",
    "-": "+O/-O common offset added to every logit",
    **label_meanings(),
}


def verdict_text(rows: list[Cell]) -> Text:
    """The most severe verdict (ce_audit.ranking) of some cells as a mark and a number or word:
    ``✗ ×3.3e3`` (worse than PyTorch on the same rows, by up to that factor), ``✗ NaN/Inf`` (non-finite
    where PyTorch is finite), ``! 3 error``, ``✗ 12ε`` (past the tolerance, no PyTorch result to compare;
    the loss error in ε at max(|exact|, 1)), ``=pt`` (past the tolerance as PyTorch is), ``floor`` (within
    2× the correctly rounded result), ``✓``, ``- skipped``. Every mark reads the same without colour."""
    verdicts = [cell_verdict(row) for row in rows]
    top = next((v for v in CELL_VERDICTS if v in verdicts), "skipped")
    chosen = [row for row, verdict in zip(rows, verdicts, strict=True) if verdict == top]
    if top == "worse":
        text = "✗ " + factor_text(max(factor(row) for row in chosen))
    elif top == "error":
        text = f"! {len(chosen)} error"
    elif top == "past":
        text = f"✗ {_eps_text(max(row.loss_err for row in chosen))}"
    else:
        text = {"pytorch": "=pt", "floor": "floor", "ok": "✓", "skipped": "- skipped"}[top]
    if any(row.value_kind == "mean" for row in chosen):
        text += " μ"
    if any(row.wrote_input for row in rows):
        text += " w!"
    return Text(text, style=STYLES[top])


def _eps_text(value: float) -> str:
    if math.isinf(value):
        return "NaN/Inf"
    return (f"{value:.2g}" if value < 1e5 else f"{value:.1e}").replace("e+0", "e").replace("e+", "e") + "ε"


cell_text = verdict_text  # a case table's entry: the same verdict over the cells it stands for


VERDICT_TITLE = "Verdict per implementation and dtype (most severe first)"


def verdict_table(rows: list[Cell]) -> Table:
    """Implementations down (ce_audit.ranking's order: worse than it has to be, the dtype's limits, fine),
    dtypes across: each implementation's verdict per dtype (``verdict_text``)."""
    dtypes = list(dict.fromkeys(row.dtype for row in rows))
    by_key: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for row in rows:
        by_key[(implementation_name(row), row.dtype)].append(row)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("implementation", style="bold", no_wrap=True)
    for dtype in dtypes:
        table.add_column(dtype, no_wrap=True)
    verdicts = ranked(rows)
    for index, verdict in enumerate(verdicts):
        last = index + 1 == len(verdicts) or verdicts[index + 1].group != verdict.group
        name = verdict.name
        table.add_row(
            Text(name),
            *(verdict_text(by_key[(name, d)]) if by_key[(name, d)] else Text("") for d in dtypes),
            end_section=last,
        )
    return table


WIDE_LIMIT = 12  # more (offset, scale, options) columns than this: one row per column key instead


def _column_label(key: tuple[float, float, str], offsets: int, scales: int, sep: str) -> str:
    offset, scale, options_text = key
    parts = [f"s={scale:g}"] if scales > 1 or not options_text else []
    if offset and (offsets > 1 or not options_text):
        parts.append(f"{offset:+g}")
    if options_text:
        parts += options_text.split(" ") if sep == "\n" else [options_text]
    return sep.join(parts) or "plain"


def _fits(table: Table, console: Console | None, width: int | None) -> bool:
    """Whether ``table`` (no column of which wraps) can be drawn within ``width`` columns."""
    if console is None or width is None:
        return True
    return Measurement.get(console, console.options.update_width(10_000), table).maximum <= width


def _wide_table(title: str, names: list[str], used: list, at: dict, offsets: int, scales: int) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("impl", style="bold", no_wrap=True)
    for key in used:
        table.add_column(_column_label(key, offsets, scales, "\n"), justify="right", no_wrap=True)
    for name in names:
        table.add_row(Text(name), *(cell_text(at[(name, *c)]) if at[(name, *c)] else "" for c in used))
    return table


def _column_widths(columns: list[list[str]], room: int | None) -> list[int] | None:
    """Widths for columns of texts within ``room`` characters (their borders and padding deducted): each
    at least its longest word, so a word is never cut; the room left shared out up to each one's longest
    text. None when even the longest words do not fit."""
    longest = [max((len(text) for text in texts), default=1) for texts in columns]
    if room is None:
        return longest
    widths = [max((len(word) for text in texts for word in text.split()), default=1) for texts in columns]
    if sum(widths) > room:
        return None
    while sum(widths) < room and any(w < top for w, top in zip(widths, longest, strict=True)):
        for index, top in enumerate(longest):
            if widths[index] < top and sum(widths) < room:
                widths[index] += 1
    return widths


def _turned_table(
    title: str, band: list[str], keys: list, at: dict, sizes: tuple[int, int], width: int | None
) -> Table | None:
    """Option combinations down, the implementations of ``band`` across, within ``width`` (None when the
    band does not fit)."""
    labels = [_column_label(key, *sizes, " ") for key in keys]
    body = [[cell_text(at[(n, *key)]) if at[(n, *key)] else Text("") for n in band] for key in keys]
    texts = [["options", *labels]] + [[name, *(row[i].plain for row in body)] for i, name in enumerate(band)]
    room = None if width is None else width - 1 - 3 * len(texts)  # a border and a padded separator each
    widths = _column_widths(texts, room)
    if widths is None:
        return None
    table = Table(title=title, title_justify="left")
    table.add_column("options", style="bold", width=widths[0])
    for name, column_width in zip(band, widths[1:], strict=True):
        table.add_column(name, justify="right", width=column_width)
    for label, cells in zip(labels, body, strict=True):
        table.add_row(Text(label), *cells)
    return table


def summary_tables(
    rows: list[Cell], console: Console | None = None, width: int | None = None
) -> list[list[Table]]:
    """Per dtype, its case table: implementations down and (offset, scale, loss options) across, the worst
    over distributions, vocabs and batches. Where that does not fit ``width`` columns, or has more than
    WIDE_LIMIT columns, the table turns: option combinations down (only those where some implementation is
    not ok), implementations across, in bands of implementations that each fit ``width`` (one table per
    band; no number is cut). Returns the tables of each dtype."""
    out = []
    dtypes = list(dict.fromkeys(row.dtype for row in rows))
    offsets = sorted({row.offset for row in rows}, key=abs)
    scales = sorted({row.scale for row in rows}, key=abs)
    option_texts = list(dict.fromkeys(options_label(row) for row in rows))
    columns = [(offset, scale, text) for text in option_texts for offset in offsets for scale in scales]
    sizes = (len(offsets), len(scales))
    for dtype in dtypes:
        at: dict[tuple[str, float, float, str], list[Cell]] = defaultdict(list)  # the cells of each entry
        names: list[str] = []
        for row in rows:
            if row.dtype != dtype:
                continue
            if implementation_name(row) not in names:
                names.append(implementation_name(row))
            at[(implementation_name(row), row.offset, row.scale, options_label(row))].append(row)
        used = [c for c in columns if any(at[(name, *c)] for name in names)]
        title = f"{dtype}: the verdict of each case (the legend's marks)"
        if len(used) <= WIDE_LIMIT:
            table = _wide_table(title, names, used, at, *sizes)
            if _fits(table, console, width):
                out.append([table])
                continue
        failing = [
            c
            for c in used
            if any(cell_verdict(r) not in ("ok", "skipped") for name in names for r in at[(name, *c)])
        ]
        hidden = len(used) - len(failing)
        if hidden:
            title += f"; {hidden} of {len(used)} option combinations all fine or skipped, not shown"
        bands: list[list[str]] = []
        for name in names:
            if not (bands and _turned_table(title, [*bands[-1], name], failing, at, sizes, width)):
                bands.append([])
            bands[-1].append(name)
        tables = []
        for index, band in enumerate(bands, 1):
            part = f" (implementations {index} of {len(bands)})" if len(bands) > 1 else ""
            table = _turned_table(title + part, band, failing, at, sizes, width)
            tables.append(table or _turned_table(title + part, band, failing, at, sizes, None))
        out.append(tables)
    return out


def _paragraph(
    console: Console, text: str, indent: int = 0, hang: int = 4, style: str | None = None, bold: int = 0
) -> None:
    """``text`` wrapped on word boundaries to the console's width, later lines indented by ``hang`` more;
    its first ``bold`` characters in bold."""
    lines = textwrap.wrap(
        text,
        width=max(console.width, 20),
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + hang),
        break_long_words=False,
        break_on_hyphens=False,
    )
    for number, line in enumerate(lines):
        text_line = Text(line, style=style or "")
        if number == 0 and bold:
            text_line.stylize("bold", indent, indent + bold)
        console.print(text_line, soft_wrap=True)


DISTRIBUTION_WORDS = {
    "normal": "normal N(0, 1)",
    "uniform": "uniform U(−1, 1)",
    "spike": "spike, confident rows (loss near 0)",
    "adversarial": "adversarial, the target far below the others (p_y underflows)",
    "ramp": "ramp, 1 − p_y from 0.9 down to 1e-17",
}
"""The logit distributions as the legend names them (ce_audit.plan.cases.DISTRIBUTIONS in full)."""


def legend(rows: list[Cell], case_tables_shown: bool) -> str:
    parts = [
        "✗ ×N = worse than PyTorch's kernel on the same rows, by up to N times its error (loss or gradient, "
        "in ε = 2^(1−p) at max(|exact|, 1); docs/verdicts.md)",
        "✗ NaN/Inf = NaN or ±inf where PyTorch is finite",
        "=pt = past the tolerance as PyTorch is on the same rows",
        "floor = within 2× the error of the exact result rounded once (the dtype allows no better)",
        "✓ = within the tolerance and no worse than PyTorch",
    ]
    present = [name for name in DISTRIBUTION_WORDS if any(row.distribution == name for row in rows)]
    if present:
        parts.append(
            "("
            + "), (".join(present)
            + (") = the hidden states: " if all(row.hidden_size for row in rows) else ") = the logits: ")
            + "; ".join(DISTRIBUTION_WORDS[n] for n in present)
        )
    parts.append("ULP = the dtype's spacing at the exact value")
    if any(cell_verdict(row) == "past" for row in rows):
        parts.append("✗ Nε = past the tolerance, no PyTorch result to compare: the loss error in ε")
    if any(row.value_kind == "mean" for row in rows):
        parts.append("μ = a 0-d mean, audited against the exact mean")
    if any(row.wrote_input for row in rows):
        parts.append("w! = wrote into its input")
    if case_tables_shown:
        keys = {(row.offset, row.scale, options_label(row)) for row in rows}
        labels = " " + " ".join(_column_label(key, 2, 2, " ") for key in keys)
        shown = list(dict.fromkeys(m for prefix, m in LABEL_MEANINGS.items() if f" {prefix}" in labels))
        parts.append("columns: " + ", ".join(shown) if shown else "columns: cases")
        if any(row.convention for row in rows):
            parts.append("c = 0 where PyTorch gives NaN")
    return "Legend: " + "; ".join(parts) + "."


def print_report(
    rows: list[Cell], console: Console, paths: list[str], seconds: float, detail: bool | None = None
) -> None:
    """The report, the verdict first whatever the number of implementations: the verdict table (most severe
    first), the story (ce_audit.verdict_story: worse than it has to be, the dtype's limits, fine), the tally,
    the legend, where to look next; with ``detail`` then the case tables and every finding; the files
    written last."""
    if any(row.dtype == "float64" for row in rows) and reference_precision()["float64"].startswith(
        "float64:"
    ):
        _paragraph(console, f"warning: {LIMITED_FLOAT64_REFERENCE}", style="yellow")
    console.print(Text(VERDICT_TITLE, style="bold"))
    console.print(verdict_table(rows))
    told = story(rows)
    for title, lines in told.sections:
        console.print(Text(title, style="bold"))
        for line in lines:
            _paragraph(console, line, indent=2, bold=line.find(": ") + 1)
    overall = [cell_status(row.status, row.grad_status) for row in rows]
    measured_all = bool(rows) and all(status not in UNMEASURED for status in overall)
    if measured_all and all(status == "ok" for status in overall):
        console.print(Text("Every cell is within tolerance.", style="green"))
    _paragraph(console, closing_line(rows, seconds))
    _paragraph(console, legend(rows, bool(detail)), style="dim")
    if detail:
        for tables in summary_tables(rows, console, console.width):
            for table in tables:
                title, table.title = str(table.title or ""), None  # wrapped to the width, not the table
                _paragraph(console, title, style="italic")
                console.print(table)
        lines = findings(rows)
        if lines:
            console.print(Text("Every finding", style="bold"))
        for line in lines:
            _paragraph(console, line, indent=2, bold=line.find(": ") + 1)
    _paragraph(console, _next_steps(paths, bool(detail)), style="dim")
    for path in paths:
        console.print(Text(f"wrote {path}"), soft_wrap=True)


def _next_steps(paths: list[str], case_tables_shown: bool) -> str:
    steps = [] if case_tables_shown else ["--detail for the per-case tables and every finding"]
    names = {path.replace("\\", "/").rsplit("/", 1)[-1]: path for path in paths}
    if "report.html" in names:
        steps.append(f"{names['report.html']} for plots")
    if "summary.csv" in names:
        steps.append(f"{names['summary.csv']} for every cell")
    steps.append("docs/verdicts.md for what the verdicts mean")
    return "Next: " + "; ".join(steps) + "."


def closing_line(rows: list[Cell], seconds: float | None) -> str:
    """The cells by verdict (ce_audit.verdict_story.counts_text), then by the tolerance's status (the worse
    of loss and gradient; skipped cells are counted among the verdicts as not measured)."""
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[cell_status(row.status, row.grad_status)] += 1
    statuses = ("ok", "inaccurate", "nonfinite", "error")
    tally = ", ".join(f"{counts[s]} {s}" for s in statuses if counts[s])
    timing = f" in {seconds:.1f} s" if seconds is not None else ""
    text = f"{plural(len(rows), 'cell')}{timing}: {counts_text(rows)}"
    if tally:
        text += f". By the tolerance: {tally}"
    return text

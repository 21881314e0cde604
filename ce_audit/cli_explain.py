"""The `ce-audit explain` command: which cell of a report, one call of ce_audit.trace.report, and the
op-by-op trace printed. Registered on the app by ce_audit.cli."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ce_audit.cli_options import LoadPluginOption


def explain(
    directory: Annotated[
        Path,
        typer.Argument(help="A sweep's report directory (summary.csv and report.json) or its summary.csv."),
    ],
    impl: Annotated[
        str | None, typer.Option("--impl", metavar="NAME", help="The cell's implementation.")
    ] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", metavar="DTYPE", help="The cell's dtype.")] = None,
    distribution: Annotated[
        str | None, typer.Option("--distribution", metavar="NAME", help="The cell's distribution.")
    ] = None,
    scale: Annotated[float | None, typer.Option("--scale", metavar="S", help="The cell's scale.")] = None,
    offset: Annotated[float | None, typer.Option("--offset", metavar="O", help="The cell's offset.")] = None,
    row: Annotated[
        int | None,
        typer.Option("--row", metavar="N", help="The cell of summary.csv's N-th data row (1: the first)."),
    ] = None,
    plugin: LoadPluginOption = None,
) -> None:
    """Trace one cell's worst rows op by op and print every op: its line, local error, the error it
    carries, and where a value went non-finite or the error entered (the first flagged cell that matches)."""
    from ce_audit.dtypes import canonical_dtype
    from ce_audit.trace.report import explain_cell, trace_lines

    chosen = canonical_dtype(dtype) if dtype is not None else None
    cell, trace = explain_cell(
        directory, row, tuple(plugin or ()), impl=impl, dtype=chosen, distribution=distribution, scale=scale,
        offset=offset,
    )  # fmt: skip
    for line in trace_lines(cell, trace):
        typer.echo(line)

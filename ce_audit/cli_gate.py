"""The `ce-audit gate` command: its arguments and options, one call of ce_audit.gate.workflow, and what
it prints and exits with (0 held or updated, 1 regressed; bad input, 2, at the CLI edge). Registered on
the app by ce_audit.cli."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ce_audit import commands
from ce_audit.cli_options import PluginOption, QuietOption
from ce_audit.printable import plural
from ce_audit.reports.stdout import terminal_console


def gate(
    baseline: Annotated[
        Path | None,
        typer.Argument(
            metavar="BASELINE",
            help="Committed baseline: a summary.csv (report.json beside it) or its directory.",
        ),
    ] = None,
    current: Annotated[
        Path | None,
        typer.Option(
            "--current", metavar="FILE.csv", help="Compare this summary.csv instead of running a fresh sweep."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE.toml",
            help="Run the fresh sweep with this TOML config, not the baseline's recorded one.",
        ),
    ] = None,
    plugin: PluginOption = None,
    budget: Annotated[
        list[str] | None,
        typer.Option(
            "--budget",
            metavar="RULE",
            help='Absolute limit "IMPL:DTYPE:METRIC<=VALUE", * allowed (repeatable).',
        ),
    ] = None,
    ulp_growth: Annotated[
        float | None,
        typer.Option(
            "--ulp-growth",
            metavar="U",
            help="Allowed growth of max_ulp in ULPs (default: the config's, else 1).",
        ),
    ] = None,
    rel_growth: Annotated[
        float | None,
        typer.Option(
            "--rel-growth",
            metavar="R",
            help="Allowed relative growth, 0.1 = 10% (default: the config's, else 0.1).",
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on cells that are not in the baseline.")
    ] = False,
    markdown: Annotated[
        Path | None,
        typer.Option(
            "--markdown", metavar="FILE.md", help="Write a Markdown summary (for a CI job summary page)."
        ),
    ] = None,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", metavar="FILE.xml", help="Write JUnit XML, one test case per cell."),
    ] = None,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Write the baseline from the current audit (atomically), exit 0: a re-run of the "
            "baseline's recorded sweep, or for a new baseline of --config, else what `ce-audit sweep` runs "
            "here; the plugins given are recorded and loaded again by later runs.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Also write the fresh audit's reports to this directory."),
    ] = None,
    quiet: QuietOption = False,
    baseline_plugins: Annotated[
        bool,
        typer.Option(
            "--baseline-plugins",
            help="Also import the plugins the baseline's report.json records by module name or from "
            "outside the working directory (those inside it are imported without it).",
        ),
    ] = False,
) -> None:
    """Compare the current audit with a baseline: exit 0 held, 1 regressed, 2 bad input."""
    outcome = commands.gate_to_files(
        baseline, current=current, config=config, plugins=plugin or (), budgets=budget or (),
        ulp_growth=ulp_growth, rel_growth=rel_growth, strict=strict, markdown=markdown, junit=junit,
        update=update, out=out, baseline_plugins=baseline_plugins,
    )  # fmt: skip
    console = terminal_console()
    if not quiet and not update:
        commands.print_gate(outcome.result, console)
    for path in outcome.written:
        console.print(f"wrote {path}" if not quiet else path, highlight=False, markup=False)
    if outcome.updated is not None:
        cells = plural(len(outcome.run.current.cells), "cell")
        console.print(f"baseline written: {outcome.updated} ({cells})", highlight=False, markup=False)
        return
    if not outcome.result.passed:
        if quiet:
            count = len(outcome.result.failures)
            print(f"ce-audit gate: FAILED ({plural(count, 'failure')})", file=sys.stderr)
        raise typer.Exit(1)

"""The `ce-audit` command line: parses options, calls one library function per command, prints.

No numerics here, and no torch import at start-up: `ce-audit --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ce_audit.errors import AuditError

try:  # Typer ≥ 0.20 vendors Click; older releases use the click package itself.
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as click_exceptions

app = typer.Typer(
    name="ce-audit",
    help="Numerical-stability auditor for cross-entropy loss implementations.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

DtypeOption = Annotated[
    list[str] | None, typer.Option("--dtype", help="float16, bfloat16, float32, float64 (repeatable).")
]
DeviceOption = Annotated[
    list[str] | None,
    typer.Option(
        "--device", help="cpu, cuda, cuda:N, mps, auto (cpu + first accelerator), all (repeatable)."
    ),
]
ImplOption = Annotated[
    list[str] | None, typer.Option("--impl", help="Implementation name (repeatable; default: every one).")
]
OutOption = Annotated[Path | None, typer.Option("--out", help="Report directory [default: ce-audit-report].")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the paths written and errors.")]
GradOption = Annotated[
    bool | None, typer.Option("--grad/--no-grad", help="Audit gradients too [default: on].")
]


def _console() -> Console:
    """Rich on a terminal; plain text, 160 columns wide, when stdout is a file or a pipe."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160, no_color=True)
    return console


def _progress_bar(console: Console, total: float, quiet: bool) -> tuple[Any, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("auditing"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
    task = progress.add_task("sweep", total=total)
    return progress, lambda units: progress.advance(task, units)


def _write_reports(result: Any, out: Path, command: str, extra: dict[str, Any] | None = None) -> list[str]:
    from ce_audit.reports.csv import write_rows_csv, write_summary_csv
    from ce_audit.reports.json import write_report_json

    paths = [write_summary_csv(result.rows, out / "summary.csv")]
    if result.records:
        paths.append(write_rows_csv(result.records, out / "rows.csv"))
    paths.append(write_report_json(result, out / "report.json", command, extra))
    return [str(path) for path in paths]


@app.command()
def sweep(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML sweep config [default: built-in].")
    ] = None,
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    impl: ImplOption = None,
    distribution: Annotated[
        list[str] | None,
        typer.Option("--distribution", help="normal, uniform, spike, adversarial (repeatable)."),
    ] = None,
    scale: Annotated[list[float] | None, typer.Option("--scale", help="Logit scale (repeatable).")] = None,
    offset: Annotated[
        list[float] | None, typer.Option("--offset", help="Common logit offset (repeatable).")
    ] = None,
    vocab: Annotated[list[int] | None, typer.Option("--vocab", help="Vocabulary size (repeatable).")] = None,
    batch: Annotated[list[int] | None, typer.Option("--batch", help="Rows per case (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the input generator.")] = None,
    grad: GradOption = None,
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Run implementations over a grid of cases and report errors against the exact loss."""
    from ce_audit.config import load_config
    from ce_audit.engine import run_sweep, sweep_size
    from ce_audit.reports.table import print_report

    overrides = {
        "dtypes": dtype or None,
        "devices": device or None,
        "impls": impl or None,
        "distributions": distribution or None,
        "scales": scale or None,
        "offsets": offset or None,
        "vocabs": vocab or None,
        "batches": batch or None,
        "seed": seed,
        "grad": grad,
        "out": str(out) if out else None,
    }
    resolved = load_config(config, overrides)
    console = _console()
    progress, advance = _progress_bar(console, sweep_size(resolved), quiet)
    with progress:
        result = run_sweep(resolved, progress=advance)
    paths = _write_reports(result, Path(resolved.out), "sweep")
    if quiet:
        for path in paths:
            console.print(path)
    else:
        print_report(result.rows, console, paths, result.seconds)


@app.command()
def replay(
    logits: Annotated[Path, typer.Argument(help="(N, V) logits, .npy or .pt.")],
    targets: Annotated[Path, typer.Argument(help="(N,) integer targets, .npy or .pt.")],
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    impl: ImplOption = None,
    grad: GradOption = None,
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Audit logits dumped from a real model; writes summary.csv, rows.csv and report.json."""
    from ce_audit.config import load_config
    from ce_audit.replay import run_replay
    from ce_audit.reports.table import print_report

    resolved = load_config(
        None,
        {
            "devices": device or None,
            "impls": impl or None,
            "grad": grad,
            "out": str(out) if out else None,
            "dtypes": dtype or None,
        },
    )
    result = run_replay(logits, targets, resolved, dtypes=list(dtype) if dtype else None)
    paths = _write_reports(
        result, Path(resolved.out), "replay", {"inputs": {"logits": str(logits), "targets": str(targets)}}
    )
    console = _console()
    if quiet:
        for path in paths:
            console.print(path)
    else:
        print_report(result.rows, console, paths, result.seconds)


@app.command("list")
def list_implementations() -> None:
    """List the implementations, their origin, the dtypes and the devices present here."""
    from rich.table import Table

    from ce_audit.devices import resolve_devices
    from ce_audit.dtypes import DTYPE_NAMES
    from ce_audit.implementations import REGISTRY

    console = _console()
    table = Table(title="Implementations", title_justify="left")
    for column in ("name", "backend", "what it computes", "origin", "dtypes"):
        table.add_column(column)
    for entry in REGISTRY.values():
        dtypes = "all" if entry.dtypes == DTYPE_NAMES else ", ".join(entry.dtypes)
        table.add_row(entry.name, entry.backend, entry.description, entry.origin, dtypes)
    console.print(table)
    console.print(f"dtypes: {', '.join(DTYPE_NAMES)}")
    console.print(f"devices here: {', '.join(resolve_devices(('all',)))}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage and input errors exit 2 with one line on stderr, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except AuditError as error:
        print(f"ce-audit: error: {error}", file=sys.stderr)
        sys.exit(2)
    except click_exceptions.UsageError as error:
        if type(error).__name__ in ("NoArgsIsHelp", "NoArgsIsHelpError"):
            sys.exit(0)
        print(f"ce-audit: error: {error.format_message()}", file=sys.stderr)
        sys.exit(2)
    except click_exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click_exceptions.Abort:
        print("ce-audit: aborted", file=sys.stderr)
        sys.exit(130)
    except click_exceptions.ClickException as error:
        print(f"ce-audit: error: {error.format_message()}", file=sys.stderr)
        sys.exit(error.exit_code)

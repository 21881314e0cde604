"""The `ce-audit` command line: parses options, calls one library function per command, prints.

No numerics here, and no torch import at start-up: `ce-audit --help` stays fast.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from ce_audit.cli_options import option_overrides, with_loss_options
from ce_audit.errors import AuditError
from ce_audit.interruption import stop_on_signals

try:  # Typer ≥ 0.20 vendors Click; older releases use the click package itself.
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(command: F) -> F:
    """AuditError from the library becomes one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AuditError as error:
            typer.echo(f"ce-audit: error: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


# Typer ≥ 0.20 raises its own Exit/Abort; older releases raise click's.
_CLICK_EXIT = tuple(filter(None, [getattr(click_exceptions, "Exit", None)]))
_CLICK_ABORT = tuple(filter(None, [getattr(click_exceptions, "Abort", None)]))

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
    list[str] | None,
    typer.Option(
        "--impl",
        help="Implementation name, or module:function to audit an undecorated torch function "
        "(repeatable; default: every one).",
    ),
]
OutOption = Annotated[Path | None, typer.Option("--out", help="Report directory (default: ce-audit-report).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the paths written and errors.")]
FailOnOption = Annotated[
    str | None,
    typer.Option(
        "--fail-on",
        help="Exit 1 when a cell reaches this level: inaccurate, nonfinite, error (the worse of loss and "
        "gradient), or worse-than-pytorch. A CI check without a baseline.",
    ),
]
GradOption = Annotated[
    bool | None, typer.Option("--grad/--no-grad", help="Audit gradients too (default: on).")
]
PluginOption = Annotated[
    list[str] | None,
    typer.Option(
        "--plugin",
        help="Load user implementations from a .py file or a dotted module "
        "(repeatable; adds to the config's).",
    ),
]

IsolationOption = Annotated[
    str | None,
    typer.Option(
        "--isolation",
        help="process (default): implementations that are not built in run in a worker process, so a crash, "
        "exit or hang costs only their cells; none: in-process (for debugging).",
    ),
]
TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        help="Seconds one call of an isolated implementation may take before its cell is an error "
        "(default 120; 0: no limit).",
    ),
]


def _console(width: int = 160) -> Console:
    """Rich on a terminal; plain text, ``width`` columns wide, when stdout is a file or a pipe."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=width, no_color=True)
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
    from ce_audit.reports.bundle import write_reports

    return write_reports(result, out, command, extra)


@app.command()
@_user_errors
@with_loss_options(grid=True)
def sweep(
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML sweep config (default: built-in).")
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
    plugin: PluginOption = None,
    isolation: IsolationOption = None,
    timeout: TimeoutOption = None,
    out: OutOption = None,
    quiet: QuietOption = False,
    fail_on: FailOnOption = None,
    **loss_options: Any,
) -> None:
    """Run implementations over a grid of cases and report errors against the exact loss."""
    from ce_audit.config import load_config
    from ce_audit.reports.table import print_report
    from ce_audit.sweep import run_sweep, sweep_size

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
        "isolation": isolation,
        "timeout": timeout,
        "out": str(out) if out else None,
        **option_overrides(loss_options, grid=True),
    }
    _check_fail_on(fail_on)
    resolved = _with_plugins(load_config(config, overrides), plugin)
    console = _console()
    progress, advance = _progress_bar(console, sweep_size(resolved), quiet)
    with stop_on_signals():  # through the writing of the reports: a signal then exits after it
        with progress:
            result = run_sweep(resolved, progress=advance)
        paths = _write_reports(result, Path(resolved.out), "sweep")
        if quiet:
            for path in paths:
                console.print(path, markup=False)
        else:
            print_report(result.cells, console, paths, result.seconds)
        _exit_if_interrupted(result, Path(resolved.out), console, quiet)
    _exit_on(result.cells, fail_on)


@app.command()
@_user_errors
@with_loss_options(grid=False)
def replay(
    logits: Annotated[Path, typer.Argument(help="(N, V) logits, .npy or .pt.")],
    targets: Annotated[
        Path, typer.Argument(help="(N,) integer targets (ignore_index allowed) or (N, V) probabilities.")
    ],
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    impl: ImplOption = None,
    grad: GradOption = None,
    plugin: PluginOption = None,
    isolation: IsolationOption = None,
    timeout: TimeoutOption = None,
    out: OutOption = None,
    quiet: QuietOption = False,
    fail_on: FailOnOption = None,
    **loss_options: Any,
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
            "plugins": plugin or None,
            "isolation": isolation,
            "timeout": timeout,
            **option_overrides(loss_options, grid=False),
        },
    )
    _check_fail_on(fail_on)
    with stop_on_signals():  # through the writing of the reports: a signal then exits after it
        result = run_replay(logits, targets, resolved, dtypes=list(dtype) if dtype else None)
        paths = _write_reports(
            result, Path(resolved.out), "replay", {"inputs": {"logits": str(logits), "targets": str(targets)}}
        )
        console = _console()
        if quiet:
            for path in paths:
                console.print(path, markup=False)
        else:
            print_report(result.cells, console, paths, result.seconds)
        _exit_if_interrupted(result, Path(resolved.out), console, quiet)
    _exit_on(result.cells, fail_on)


@app.command("list")
@_user_errors
def list_implementations(plugin: PluginOption = None) -> None:
    """List the implementations (built-ins and plugins), their origin, the dtypes and the devices here."""
    from ce_audit.plugins import prepare
    from ce_audit.reports.listing import print_implementations

    prepare((), plugin or ())
    print_implementations(_console(width=220))  # seven columns, plugin paths among them


@app.command()
@_user_errors
def gate(
    baseline: Annotated[
        Path | None,
        typer.Argument(help="Committed baseline: a summary.csv (report.json beside it) or its directory."),
    ] = None,
    current: Annotated[
        Path | None,
        typer.Option("--current", help="Compare this summary.csv instead of running a fresh sweep."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Run the fresh sweep with this TOML config, not the baseline's."),
    ] = None,
    plugin: PluginOption = None,
    budget: Annotated[
        list[str] | None,
        typer.Option("--budget", help='Absolute limit "IMPL:DTYPE:METRIC<=VALUE", * allowed (repeatable).'),
    ] = None,
    ulp_growth: Annotated[
        float | None,
        typer.Option(
            "--ulp-growth", help="Allowed growth of max_ulp in ULPs (default: the config's, else 1)."
        ),
    ] = None,
    rel_growth: Annotated[
        float | None,
        typer.Option(
            "--rel-growth", help="Allowed relative growth, 0.1 = 10% (default: the config's, else 0.1)."
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on cells that are not in the baseline.")
    ] = False,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write a Markdown summary (for a CI job summary page).")
    ] = None,
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Write JUnit XML, one test case per cell.")
    ] = None,
    update: Annotated[
        bool,
        typer.Option("--update", help="Rewrite the baseline from the current audit (atomically), exit 0."),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the fresh audit's reports to this directory.")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Compare the current audit with a baseline: exit 0 held, 1 regressed, 2 bad input."""
    from ce_audit.errors import AuditError
    from ce_audit.gate import run_gate, update_baseline
    from ce_audit.reports.junit import write_gate_junit
    from ce_audit.reports.markdown import write_gate_markdown
    from ce_audit.reports.table import print_gate

    if update and baseline is None:
        raise AuditError("--update needs the BASELINE to write")
    for name, value in (("--ulp-growth", ulp_growth), ("--rel-growth", rel_growth)):
        if value is not None and not (0 <= value < float("inf")):
            raise AuditError(f"{name} must be a finite number ≥ 0")
    console = _console()
    run = run_gate(
        baseline,
        current_path=current,
        config_path=config,
        plugins=plugin or (),
        budgets=budget or (),
        ulp_growth=ulp_growth,
        rel_growth=rel_growth,
        strict=strict,
        allow_missing_baseline=update,
    )
    result = run.result
    written = []
    if out is not None and run.fresh is not None:
        written += _write_reports(run.fresh, out, run.command, run.extra)
    if markdown is not None:
        written.append(str(write_gate_markdown(result, markdown)))
    if junit is not None:
        written.append(str(write_gate_junit(result, junit)))
    if not quiet:
        print_gate(result, console)
    if update:
        assert baseline is not None
        written += [str(path) for path in update_baseline(run, baseline)]
    for path in written:
        console.print(f"wrote {path}" if not quiet else path, highlight=False, markup=False)
    if update:
        if not quiet:
            console.print(
                f"baseline {baseline} updated from {result.current_source}", highlight=False, markup=False
            )
        return
    if not result.passed:
        if quiet:
            count = len(result.failures)
            print(f"ce-audit gate: FAILED ({count} failure{'s' if count != 1 else ''})", file=sys.stderr)
        raise typer.Exit(1)


def _check_fail_on(level: str | None) -> None:
    from ce_audit.verdict import FAIL_LEVELS

    if level is not None and level not in FAIL_LEVELS:
        raise AuditError(f"--fail-on takes one of {', '.join(FAIL_LEVELS)}, got {level!r}")


def _exit_if_interrupted(result: Any, out: Path, console: Console, quiet: bool) -> None:
    """After SIGINT / SIGTERM (during the run, or while its reports were written): say what the written
    report holds, and exit 130 / 143."""
    from ce_audit.interruption import exit_code, received_signal, signal_name

    late = received_signal()
    name = result.interrupted or (signal_name(late) if late else "")
    if not name:
        return
    done, total = result.units_done, result.units_total
    if not quiet:
        line = f"partial report: {done} of {total} units completed (interrupted by {name})"
        if not result.partial:
            line = f"interrupted by {name} after the last unit: the report is complete"
        console.print(line, highlight=False)
    what = "the partial report" if result.partial else "the report"
    print(f"ce-audit: interrupted by {name}: {what} of {done} of {total} units is in {out}", file=sys.stderr)
    raise typer.Exit(exit_code(signal.Signals[name].value))


def _exit_on(cells: list[Any], level: str | None) -> None:
    """Exit 1 with one line on stderr when a cell reaches the --fail-on level."""
    from ce_audit.verdict import reaches

    if level is None:
        return
    failing = [cell for cell in cells if reaches(cell, level)]
    if failing:
        first = failing[0]
        print(
            f"ce-audit: {len(failing)} of {len(cells)} cells reach --fail-on {level} "
            f"(first: {first.impl} {first.dtype} {first.device} {first.distribution} scale {first.scale:g})",
            file=sys.stderr,
        )
        raise typer.Exit(1)


def _with_plugins(config: Any, plugins: list[str] | None) -> Any:
    """The config's plugins followed by those of the command line (--plugin adds, it does not replace)."""
    from dataclasses import replace

    if not plugins:
        return config
    return replace(config, plugins=tuple(dict.fromkeys([*config.plugins, *plugins])))


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage and input errors exit 2 with one line on stderr, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)  # returns typer.Exit's code outside standalone mode
    except AuditError as error:
        print(f"ce-audit: error: {error}", file=sys.stderr)
        sys.exit(2)
    except click_exceptions.UsageError as error:
        if type(error).__name__ in ("NoArgsIsHelp", "NoArgsIsHelpError"):
            sys.exit(0)
        print(f"ce-audit: error: {error.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, *_CLICK_EXIT) as done:
        if isinstance(done.__cause__, KeyboardInterrupt):  # Typer turns Ctrl-C into a silent Exit(130)
            print("ce-audit: interrupted", file=sys.stderr)
        sys.exit(done.exit_code)
    except (typer.Abort, *_CLICK_ABORT):
        print("ce-audit: aborted", file=sys.stderr)
        sys.exit(130)
    except click_exceptions.ClickException as error:
        print(f"ce-audit: error: {error.format_message()}", file=sys.stderr)
        sys.exit(error.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)

"""The `ce-audit` command line: parses options, calls one library function per command, prints.

No numerics and no policy here (what a run does and how it ends are the library's: ce_audit.run.audit,
ce_audit.gate.workflow), and no torch import at start-up: `ce-audit --help` stays fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ce_audit import __version__, collector, commands
from ce_audit.cli_explain import explain
from ce_audit.cli_gate import gate
from ce_audit.cli_options import (
    DTYPE_HELP,
    LoadPluginOption,
    OutOption,
    PluginOption,
    QuietOption,
    RunOptions,
    with_loss_options,
    with_run_options,
)
from ce_audit.config import default_help_text
from ce_audit.errors import AuditError
from ce_audit.fast_exit import exit_now
from ce_audit.plugins import prepare
from ce_audit.printable import printable
from ce_audit.reports.files import write_atomically
from ce_audit.reports.stdout import print_summary, status_console, terminal_console
from ce_audit.run.audit import ReportedRun, replay_to_report, sweep_to_report
from ce_audit.run.executors import Execution
from ce_audit.run.shards import Shard

try:  # Typer ≥ 0.20 vendors Click; older releases use the click package itself.
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed Typer
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(command: F, *, start_up_ends_inside: bool = False) -> F:
    """AuditError from the library becomes one line on stderr and exit code 2. The process's start-up ends
    as the command begins (ce_audit.collector.resume), or inside it where ``start_up_ends_inside`` (`sweep`:
    once torch is imported, before its workers are forked, ce_audit.run.audit)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not start_up_ends_inside:
            collector.resume()
        try:
            return command(*args, **kwargs)
        except AuditError as error:
            typer.echo(f"ce-audit: error: {printable(str(error))}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


# Typer ≥ 0.20 raises its own Exit/Abort; older releases raise click's.
_CLICK_EXIT = tuple(filter(None, [getattr(click_exceptions, "Exit", None)]))
_CLICK_ABORT = tuple(filter(None, [getattr(click_exceptions, "Abort", None)]))


def _examples(*lines: str) -> str:
    """A command's epilog: its examples, one per line (\b keeps Click from re-wrapping them)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(
    name="ce-audit",
    help="Numerical-stability auditor for cross-entropy loss implementations: where each one overflows, "
    "returns NaN or loses bits, in which dtype, against the exact loss.",
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: metavars, not <list[str]> types; readable at 80 columns
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_examples(
        "ce-audit sweep                 # the default audit",
        "ce-audit sweep --dtype fp16 --detail",
        "ce-audit list",
        "ce-audit sweep -h              # a command's options and their defaults",
    ),
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ce-audit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Numerical-stability auditor for cross-entropy loss implementations: where each one overflows,
    returns NaN or loses bits, in which dtype, against the exact loss. `ce-audit sweep` runs the default
    audit; `ce-audit COMMAND -h` explains a command."""


def _show(run: ReportedRun, options: RunOptions) -> None:
    """A run's summary on stdout in --format (the paths written alone with --quiet)."""
    print_summary(
        run.result, run.paths, run.command, run.extra, options.output_format, options.quiet, options.detail
    )


def _exit(run: ReportedRun, options: RunOptions) -> None:
    """Exit as the run ended: after SIGINT / SIGTERM 130 / 143, saying what the written report holds
    (the status line on the report's console, or stderr when stdout holds JSON or CSV); 1 when a cell
    reaches the --fail-on level."""
    stop = run.interruption
    if stop is not None:
        if not options.quiet:
            status_console(options.output_format).print(stop.status, highlight=False)
        print(f"ce-audit: {stop.message}", file=sys.stderr)
        raise typer.Exit(stop.code)
    if run.fail_on is not None:
        print(f"ce-audit: {run.fail_on}", file=sys.stderr)
        raise typer.Exit(1)


def _grid_option(key: str, flag: str, metavar: str, help_text: str) -> Any:
    """A sweep option whose help ends with the built-in default's ``key`` (ce_audit/default.toml)."""
    return typer.Option(flag, metavar=metavar, help=f"{help_text} Default: {default_help_text(key)}.")


@app.command(
    epilog=_examples(
        "ce-audit sweep                                  # the default audit",
        "ce-audit sweep --dtype fp16 --impl fused --impl naive",
        "ce-audit sweep --scale 1 --scale 100 --offset 0 --offset 1e4 --vocab 50257",
        "ce-audit sweep --config configs/llm.toml --detail",
        "ce-audit sweep --format json > summary.json     # machine-readable",
    )
)
@functools.partial(_user_errors, start_up_ends_inside=True)
@with_loss_options(grid=True)
@with_run_options(
    dtype_help=f"{DTYPE_HELP} Default: {default_help_text('dtypes')}.",
    plugin=PluginOption,
    after="config",
    before="jobs",
)
def sweep(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE.toml",
            help="TOML sweep config. Default: [tool.ce-audit] in the nearest pyproject.toml, else the "
            "built-in grid (configs/default.toml).",
        ),
    ] = None,
    distribution: Annotated[
        list[str] | None,
        _grid_option(
            "distributions",
            "--distribution",
            "NAME",
            "normal, uniform, spike, adversarial, ramp; repeatable.",
        ),
    ] = None,
    scale: Annotated[
        list[float] | None,
        _grid_option("scales", "--scale", "S", "Logit scale: logits are offset + S · base; repeatable."),
    ] = None,
    offset: Annotated[
        list[float] | None,
        _grid_option("offsets", "--offset", "O", "Common offset added to every logit; repeatable."),
    ] = None,
    vocab: Annotated[
        list[int] | None, _grid_option("vocabs", "--vocab", "V", "Vocabulary size; repeatable.")
    ] = None,
    batch: Annotated[
        list[int] | None, _grid_option("batches", "--batch", "N", "Rows per case; repeatable.")
    ] = None,
    seed: Annotated[int | None, _grid_option("seed", "--seed", "N", "Seed of the input generator.")] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            metavar="N",
            help="Worker processes for the (case, dtype) units (default: this machine's cores; a small "
            "sweep stays in this process). 1: in this process. Results are the same for any value.",
        ),
    ] = None,  # fmt: skip
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor",
            metavar="local|processes|ray",
            help="local (this process), processes (--jobs workers) or ray (Ray tasks; needs the ray extra).",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="K/N",
            help="Run part K of N of the units (e.g. 2/4), for CI; `ce-audit merge` joins them.",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDRESS",
            help="Ray cluster to run on (default: a local Ray started for the run).",
        ),
    ] = None,
    ray_accelerator_type: Annotated[
        str | None,
        typer.Option(
            "--ray-accelerator-type",
            metavar="TYPE",
            help="Ray accelerator type the CUDA units ask for (e.g. H100, A100).",
        ),
    ] = None,
    *,
    run: RunOptions,
    **loss_options: Any,
) -> None:
    """Run implementations over a grid of cases and report errors against the exact loss.

    With no grid option the built-in default runs: every implementation in the four dtypes over its five
    sub-grids (the failure bands of docs/variants.md). A grid option (--scale, --vocab, a loss option, …)
    replaces the sub-grids; --dtype, --impl and --device apply to every one. Writes summary.csv and
    report.json to --out."""
    execution = Execution(executor, jobs, ray_address, ray_accelerator_type)
    part = Shard.parse(shard) if shard is not None else None
    overrides = run.overrides(
        distributions=distribution, scales=scale, offsets=offset, vocabs=vocab, batches=batch, seed=seed,
        options=loss_options,
    )  # fmt: skip
    reported = sweep_to_report(
        config, overrides, plugins=run.plugin or (), fail_on=run.fail_on, save_failures=run.save_failures,
        execution=execution, shard=part, quiet=run.quiet, show=functools.partial(_show, options=run),
        search_from=Path.cwd(),
    )  # fmt: skip
    _exit(reported, run)


@app.command(
    epilog=_examples(
        "ce-audit replay logits.npy targets.npy",
        "ce-audit replay logits.pt targets.pt --dtype bf16 --reduction mean --label-smoothing 0.1",
        "ce-audit replay logits.npy targets.npy --impl my_ce --plugin my_ce.py --format csv",
    )
)
@_user_errors
@with_loss_options(grid=False)
@with_run_options(
    dtype_help=f"{DTYPE_HELP} Default: the file's dtype (another one rounds the file's values to it).",
    plugin=LoadPluginOption,
    after="targets_key",
    before="seed",
)
def replay(
    logits: Annotated[
        Path,
        typer.Argument(
            metavar="LOGITS", help="(N, V) or (B, T, V) logits: .npy, .pt or .safetensors (memory-mapped)."
        ),
    ],
    targets: Annotated[
        Path | None,
        typer.Argument(
            metavar="[TARGETS]",
            help="(N,) or (B, T) integer targets (ignore_index allowed) or probabilities shaped as the "
            "logits. Leave out when the logits file (.safetensors or a .pt dict) holds both.",
        ),
    ] = None,
    logits_key: Annotated[
        str | None,
        typer.Option("--logits-key", metavar="NAME", help="Name of the logits in a file of named tensors."),
    ] = None,
    targets_key: Annotated[
        str | None,
        typer.Option("--targets-key", metavar="NAME", help="Name of the targets in a file of named tensors."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", metavar="N", help="Seed of the drawn options (weights, masks, ignored rows)."),
    ] = None,
    *,
    run: RunOptions,
    **loss_options: Any,
) -> None:
    """Audit logits dumped from a real model; writes summary.csv, rows.csv and report.json.


    LOGITS is an (N, V) or (B, T, V) array, TARGETS (N,) or (B, T) class indices or probabilities shaped
    as the logits, each a .npy, .pt or .safetensors file (read without running code). Every
    implementation is audited on the rows whose target is not --ignore-index (PyTorch's -100); one that
    cannot ignore rows is called on those rows only. Loss options take one value each."""
    reported = replay_to_report(
        logits, targets, run.overrides(seed=seed, options=loss_options), plugins=run.plugin or (),
        fail_on=run.fail_on, save_failures=run.save_failures, logits_key=logits_key, targets_key=targets_key,
        show=functools.partial(_show, options=run), search_from=Path.cwd(),
    )  # fmt: skip
    _exit(reported, run)


@app.command(
    epilog=_examples(
        "ce-audit sweep --shard 1/2 --out shard-1 && ce-audit sweep --shard 2/2 --out shard-2",
        "ce-audit merge shard-1 shard-2 --out ce-audit-report",
    )
)
@_user_errors
def merge(
    reports: Annotated[
        list[Path],
        typer.Argument(
            metavar="DIR...", help="The report directories of every shard (`ce-audit sweep --shard K/N`)."
        ),
    ],
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Join the reports of a sweep's shards into one, as a single run would have written it."""
    paths = commands.merge_reports(list(reports), out or Path("ce-audit-report"))
    console = terminal_console()
    for path in paths:
        console.print(path if quiet else f"wrote {path}", markup=False, highlight=False)


@app.command(
    "list",
    epilog=_examples("ce-audit list", "ce-audit list --plugin my_kernels/ce_plugin.py"),
)
@_user_errors
def list_implementations(plugin: LoadPluginOption = None) -> None:
    """List the implementations (built-ins and plugins), their origin, the dtypes and the devices here."""
    prepare((), plugin or ())
    commands.print_implementations(terminal_console())


@app.command(
    epilog=_examples(
        "ce-audit report ce-audit-report                    # redraw report.html and plots/",
        "ce-audit report gate-current --markdown plots.md   # + a Markdown section for a CI summary",
    )
)
@_user_errors
def report(
    directory: Annotated[
        Path, typer.Argument(help="A report directory (summary.csv and report.json) or its summary.csv.")
    ],
    markdown: Annotated[
        Path | None,
        typer.Option(
            "--markdown",
            help="Also write the verdict and a section on the plots as Markdown (for a CI job summary).",
        ),
    ] = None,
    inline_images: Annotated[
        bool,
        typer.Option(
            "--inline-images",
            help="In --markdown, embed the PNGs as data: URIs (where the platform shows them; GitHub's "
            "job summary does not).",
        ),
    ] = False,
) -> None:
    """Rebuild report.html and the PNGs in plots/ from a summary.csv and the report.json beside it."""
    written = commands.rebuild_report(directory)
    if markdown is not None:
        written.append(write_atomically(markdown, commands.report_markdown(written[0].parent, inline_images)))
    for path in written:
        typer.echo(f"wrote {path}")


_explain_examples = _examples(
    "ce-audit explain ce-audit-report --impl naive --dtype fp16 --scale 10",
    "ce-audit explain ce-audit-report --row 12          # the 12th data row of summary.csv",
)
app.command(epilog=_explain_examples)(_user_errors(explain))  # declared in ce_audit.cli_explain

_gate_examples = _examples(
    "ce-audit gate precision/baseline --update          # write the baseline",
    "ce-audit gate precision/baseline --markdown gate.md # 0 held, 1 regressed",
    'ce-audit gate precision/baseline --budget "fused:float16:max_ulp<=2"',
)
app.command(epilog=_gate_examples)(_user_errors(gate))  # declared in ce_audit.cli_gate


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage and input errors exit 2 with one line on stderr, never a traceback."""
    try:
        code = app(args=argv, standalone_mode=False)  # returns typer.Exit's code outside standalone mode
    except AuditError as error:
        print(f"ce-audit: error: {printable(str(error))}", file=sys.stderr)
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


def command_line() -> None:
    """The `ce-audit` and `python -m ce_audit` process: ``main`` on sys.argv, then the process ends at
    once with its exit code (ce_audit.fast_exit: no interpreter teardown)."""
    try:
        main()
        code = 0
    except SystemExit as done:
        if done.code is not None and not isinstance(done.code, int):
            raise  # a message for the interpreter to print
        code = done.code or 0
    exit_now(code)

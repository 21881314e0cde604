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
from ce_audit.run.interruption import stop_on_signals

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


def _grid_defaults() -> dict[str, Any]:
    """The top-level keys of the built-in default sweep (ce_audit/default.toml), for --help."""
    import tomllib
    from importlib import resources

    return tomllib.loads(resources.files("ce_audit").joinpath("default.toml").read_text(encoding="utf-8"))


_DEFAULTS = _grid_defaults()


def _default(key: str) -> str:
    values = _DEFAULTS.get(key, [])
    return ", ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)


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
        from ce_audit import __version__

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


DtypeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help="float16 (fp16, half), bfloat16 (bf16), float32 (fp32, float), float64 (fp64, double); "
        f"repeatable. Default: {_default('dtypes')}.",
    ),
]
ReplayDtypeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help="float16 (fp16, half), bfloat16 (bf16), float32 (fp32, float), float64 (fp64, double); "
        "repeatable. Default: the file's dtype (another one rounds the file's values to it).",
    ),
]
DeviceOption = Annotated[
    list[str] | None,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N, mps, auto (cpu + first accelerator), all; repeatable. Default: auto.",
    ),
]
ImplOption = Annotated[
    list[str] | None,
    typer.Option(
        "--impl",
        metavar="NAME",
        help="Implementation name (ce-audit list), or module:attr to audit an undecorated function, loss "
        "class or module, with optional ,key=value settings (backend=numpy, supports=reduction+weight, "
        "arg.NAME=VALUE, returns=mean, ...; docs/adapters.md); repeatable. Default: every one.",
    ),
]
OutOption = Annotated[
    Path | None, typer.Option("--out", metavar="DIR", help="Report directory. Default: ce-audit-report.")
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only the paths written and errors; no progress.")
]
DetailOption = Annotated[
    bool,
    typer.Option(
        "--detail",
        help="Show the per-case grid of each dtype and every finding (shown anyway where the terminal is "
        "wide enough for it).",
    ),
]
FormatOption = Annotated[
    str,
    typer.Option(
        "--format",
        metavar="table|json|csv",
        show_default=False,
        help="The summary on stdout: the terminal report (table), or machine-readable: the report.json "
        "document (json) or summary.csv (csv), with nothing else on stdout. Default: table.",
    ),
]
FailOnOption = Annotated[
    str | None,
    typer.Option(
        "--fail-on",
        metavar="LEVEL",
        help="Exit 1 when a cell reaches this level: inaccurate, nonfinite, error (the worse of loss and "
        "gradient), or worse-than-pytorch. A CI check without a baseline. Default: off.",
    ),
]
GradOption = Annotated[
    bool | None, typer.Option("--grad/--no-grad", help="Audit gradients too. Default: on.")
]
SaveFailuresOption = Annotated[
    Path | None,
    typer.Option(
        "--save-failures",
        metavar="DIR",
        help="Save each failing cell's worst rows (.npy, .pt) and the `ce-audit replay` command that shows "
        "the failure again, one folder per cell under this directory.",
    ),
]
PluginOption = Annotated[
    list[str] | None,
    typer.Option(
        "--plugin",
        metavar="FILE.py|MODULE",
        help="Load user implementations from a .py file or a dotted module; repeatable, adds to the "
        "config's plugins.",
    ),
]
LoadPluginOption = Annotated[
    list[str] | None,
    typer.Option(
        "--plugin",
        metavar="FILE.py|MODULE",
        help="Load user implementations from a .py file or a dotted module; repeatable.",
    ),
]
OUTPUT_FORMATS = ("table", "json", "csv")

IsolationOption = Annotated[
    str | None,
    typer.Option(
        "--isolation",
        metavar="process|none",
        help="process (default): implementations that are not built in run in a worker process, so a crash, "
        "exit or hang costs only their cells; none: in-process (for debugging).",
    ),
]
TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help="Seconds one call of an isolated implementation may take before its cell is an error "
        "(default 120; 0: no limit).",
    ),
]
MaxMemoryOption = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Memory one isolated implementation's worker may hold (512M, 8G; default auto: half of this "
        "machine's; 0: no limit); an allocation past it makes the cell an error.",
    ),
]


def _console(width: int = 100) -> Console:
    """Rich on a terminal; plain text when stdout is a file or a pipe, ``$COLUMNS`` (else ``width``)
    columns wide. Rich leaves colour out under ``NO_COLOR``; the report's marks carry the status."""
    import os

    console = Console(highlight=False)
    if not console.is_terminal:
        columns = os.environ.get("COLUMNS", "")
        console = Console(highlight=False, width=int(columns) if columns.isdigit() else width, no_color=True)
    return console


def _report_directory(out: Path) -> Any:
    """``--out`` created, checked writable and locked before any work (released on leaving the block)."""
    from ce_audit.reports.bundle import ReportDirectory

    return ReportDirectory(out)


def _reproducer_sink(directory: Path | None) -> Any:
    if directory is None:
        return None
    from ce_audit.reproducers import ReproducerSink

    return ReproducerSink()


def _write_reproducers(sink: Any, directory: Path | None) -> list[str]:
    """The command.txt of each reproducer written (one folder per failing cell)."""
    if sink is None or directory is None:
        return []
    return [str(folder / "command.txt") for folder in sink.write(directory).values()]


@app.command(
    epilog=_examples(
        "ce-audit sweep                                  # the default audit",
        "ce-audit sweep --dtype fp16 --impl fused --impl naive",
        "ce-audit sweep --scale 1 --scale 100 --offset 0 --offset 1e4 --vocab 50257",
        "ce-audit sweep --config configs/llm.toml --detail",
        "ce-audit sweep --format json > summary.json     # machine-readable",
    )
)
@_user_errors
@with_loss_options(grid=True)
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
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    impl: ImplOption = None,
    distribution: Annotated[
        list[str] | None,
        typer.Option(
            "--distribution",
            metavar="NAME",
            help="normal, uniform, spike, adversarial, ramp; repeatable. "
            f"Default: {_default('distributions')}.",
        ),
    ] = None,
    scale: Annotated[
        list[float] | None,
        typer.Option(
            "--scale",
            metavar="S",
            help=f"Logit scale: logits are offset + S · base; repeatable. Default: {_default('scales')}.",
        ),
    ] = None,
    offset: Annotated[
        list[float] | None,
        typer.Option(
            "--offset",
            metavar="O",
            help=f"Common offset added to every logit; repeatable. Default: {_default('offsets')}.",
        ),
    ] = None,
    vocab: Annotated[
        list[int] | None,
        typer.Option(
            "--vocab", metavar="V", help=f"Vocabulary size; repeatable. Default: {_default('vocabs')}."
        ),
    ] = None,
    batch: Annotated[
        list[int] | None,
        typer.Option(
            "--batch", metavar="N", help=f"Rows per case; repeatable. Default: {_default('batches')}."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", metavar="N", help=f"Seed of the input generator. Default: {_DEFAULTS.get('seed', 0)}."
        ),
    ] = None,
    grad: GradOption = None,
    plugin: PluginOption = None,
    isolation: IsolationOption = None,
    timeout: TimeoutOption = None,
    max_memory: MaxMemoryOption = None,
    out: OutOption = None,
    quiet: QuietOption = False,
    detail: DetailOption = False,
    output_format: FormatOption = "table",
    fail_on: FailOnOption = None,
    save_failures: SaveFailuresOption = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "-j",
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
            help="Run part K of N of the units (e.g. 2/4), for CI; `ce-audit merge` joins them."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDRESS",
            help="Ray cluster to run on (default: a local Ray started for the run)."
        ),
    ] = None,
    ray_accelerator_type: Annotated[
        str | None,
        typer.Option(
            "--ray-accelerator-type",
            metavar="TYPE",
            help="Ray accelerator type the CUDA units ask for (e.g. H100, A100)."
        ),
    ] = None,
    **loss_options: Any,
) -> None:
    """Run implementations over a grid of cases and report errors against the exact loss.

    With no grid option the built-in default runs: every implementation in the four dtypes over its five
    sub-grids (the failure bands of docs/variants.md). A grid option (--scale, --vocab, a loss option, …)
    replaces the sub-grids; --dtype, --impl and --device apply to every one. Writes summary.csv and
    report.json to --out."""
    from ce_audit.config import load_config
    from ce_audit.run.executors import Execution
    from ce_audit.run.progress import progress_reporter
    from ce_audit.run.shards import Shard
    from ce_audit.run.sweep import run_sweep, sweep_size

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
        "max_memory": max_memory,
        "out": str(out) if out else None,
        **option_overrides(loss_options, grid=True),
    }
    _check_fail_on(fail_on)
    _check_format(output_format)
    execution = Execution(executor, jobs, ray_address, ray_accelerator_type)
    part = Shard.parse(shard) if shard is not None else None
    resolved = _with_plugins(load_config(config, overrides, search_from=Path.cwd()), plugin)
    reproducers = _reproducer_sink(save_failures)
    with _report_directory(Path(resolved.out)) as target, stop_on_signals():  # a signal while the
        # reports are written exits after them
        total = sweep_size(resolved, part, execution.devices_here)
        with progress_reporter(total, quiet=quiet) as advance:
            result = run_sweep(
                resolved, progress=advance, execution=execution, shard=part, reproducers=reproducers
            )
        paths = target.write(result, "sweep")
        paths += _write_reproducers(reproducers, save_failures)
        _print_result(result, paths, "sweep", None, output_format, quiet, detail)
        _exit_if_interrupted(result, Path(resolved.out), _status_console(output_format), quiet)
    _exit_on(result.cells, fail_on)


@app.command(
    epilog=_examples(
        "ce-audit replay logits.npy targets.npy",
        "ce-audit replay logits.pt targets.pt --dtype bf16 --reduction mean --label-smoothing 0.1",
        "ce-audit replay logits.npy targets.npy --impl my_ce --plugin my_ce.py --format csv",
    )
)
@_user_errors
@with_loss_options(grid=False)
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
    dtype: ReplayDtypeOption = None,
    device: DeviceOption = None,
    impl: ImplOption = None,
    grad: GradOption = None,
    plugin: LoadPluginOption = None,
    isolation: IsolationOption = None,
    timeout: TimeoutOption = None,
    max_memory: MaxMemoryOption = None,
    out: OutOption = None,
    quiet: QuietOption = False,
    detail: DetailOption = False,
    output_format: FormatOption = "table",
    fail_on: FailOnOption = None,
    save_failures: SaveFailuresOption = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", metavar="N", help="Seed of the drawn options (weights, masks, ignored rows)."),
    ] = None,
    **loss_options: Any,
) -> None:
    """Audit logits dumped from a real model; writes summary.csv, rows.csv and report.json.


    LOGITS is an (N, V) or (B, T, V) array, TARGETS (N,) or (B, T) class indices or probabilities shaped
    as the logits, each a .npy, .pt or .safetensors file (read without running code). Every
    implementation is audited on the rows whose target is not --ignore-index (PyTorch's -100); one that
    cannot ignore rows is called on those rows only. Loss options take one value each."""
    from ce_audit.config import load_config
    from ce_audit.dtypes import canonical_dtype
    from ce_audit.replay import run_replay

    dtypes = [canonical_dtype(name) for name in dtype] if dtype else None
    overrides = {
        "devices": device or None,
        "impls": impl or None,
        "grad": grad,
        "out": str(out) if out else None,
        "dtypes": dtypes,
        "seed": seed,
        "isolation": isolation,
        "timeout": timeout,
        "max_memory": max_memory,
        **option_overrides(loss_options, grid=False),
    }
    _check_fail_on(fail_on)
    _check_format(output_format)
    resolved = _with_plugins(load_config(None, overrides, search_from=Path.cwd()), plugin)
    inputs = {"logits": str(logits), "targets": str(targets if targets is not None else logits)}
    extra = {"inputs": inputs}
    reproducers = _reproducer_sink(save_failures)
    with _report_directory(Path(resolved.out)) as target, stop_on_signals():
        result = run_replay(
            logits, targets, resolved, dtypes=dtypes, logits_key=logits_key, targets_key=targets_key,
            reproducers=reproducers,
        )  # fmt: skip
        paths = target.write(result, "replay", extra)
        paths += _write_reproducers(reproducers, save_failures)
        _print_result(result, paths, "replay", extra, output_format, quiet, detail)
        _exit_if_interrupted(result, Path(resolved.out), _status_console(output_format), quiet)
    _exit_on(result.cells, fail_on)


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
    from ce_audit.run.merge import merge_reports

    paths = merge_reports(list(reports), out or Path("ce-audit-report"))
    console = _console()
    for path in paths:
        console.print(path if quiet else f"wrote {path}", markup=False, highlight=False)


@app.command(
    "list",
    epilog=_examples("ce-audit list", "ce-audit list --plugin my_kernels/ce_plugin.py"),
)
@_user_errors
def list_implementations(plugin: LoadPluginOption = None) -> None:
    """List the implementations (built-ins and plugins), their origin, the dtypes and the devices here."""
    from ce_audit.plugins import prepare
    from ce_audit.reports.listing import print_implementations

    prepare((), plugin or ())
    print_implementations(_console())


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
        typer.Option("--markdown", help="Also write a Markdown section on the plots (for a CI job summary)."),
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
    from ce_audit.reports.files import write_atomically
    from ce_audit.reports.html import plots_markdown, rebuild_report

    written = rebuild_report(directory)
    if markdown is not None:
        written.append(write_atomically(markdown, plots_markdown(written[0].parent, inline_images)))
    for path in written:
        typer.echo(f"wrote {path}")


@app.command(
    epilog=_examples(
        "ce-audit gate precision/baseline --update          # write the baseline",
        "ce-audit gate precision/baseline --markdown gate.md # 0 held, 1 regressed",
        'ce-audit gate precision/baseline --budget "fused:float16:max_ulp<=2"',
    )
)
@_user_errors
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
            help="Run the fresh sweep with this TOML config, not the baseline's.",
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
        typer.Option("--update", help="Rewrite the baseline from the current audit (atomically), exit 0."),
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
            help="Also import the plugins the baseline's report.json records (off: a baseline cannot run "
            "code; give --plugin instead).",
        ),
    ] = False,
) -> None:
    """Compare the current audit with a baseline: exit 0 held, 1 regressed, 2 bad input."""
    from contextlib import ExitStack

    from ce_audit.errors import AuditError
    from ce_audit.gate import run_gate, summary_path, update_baseline
    from ce_audit.reports.junit import write_gate_junit
    from ce_audit.reports.markdown import write_gate_markdown
    from ce_audit.reports.table import print_gate

    if update and baseline is None:
        raise AuditError("--update needs the BASELINE to write")
    for name, value in (("--ulp-growth", ulp_growth), ("--rel-growth", rel_growth)):
        if value is not None and not (0 <= value < float("inf")):
            raise AuditError(f"{name} must be a finite number ≥ 0")
    console = _console()
    with ExitStack() as held:  # report directories checked writable and locked before any work
        report_target = held.enter_context(_report_directory(out)) if out is not None else None
        baseline_target = None
        if update and baseline is not None and summary_path(baseline).name == "summary.csv":
            baseline_target = held.enter_context(_report_directory(summary_path(baseline).parent))
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
            baseline_plugins=baseline_plugins,
        )
        result = run.result
        written = []
        if report_target is not None and run.fresh is not None:
            written += report_target.write(run.fresh, run.command, run.extra)
        if markdown is not None:
            written.append(str(write_gate_markdown(result, markdown)))
        if junit is not None:
            written.append(str(write_gate_junit(result, junit)))
        if not quiet and not update:
            print_gate(result, console)
        if update:
            assert baseline is not None
            written += [str(path) for path in update_baseline(run, baseline, baseline_target)]
    for path in written:
        console.print(f"wrote {path}" if not quiet else path, highlight=False, markup=False)
    if update:
        cells = len(run.current.cells)
        place = summary_path(baseline) if baseline is not None else ""
        place = place.parent if place and place.name == "summary.csv" else place
        console.print(f"baseline written: {place} ({cells} cells)", highlight=False, markup=False)
        return
    if not result.passed:
        if quiet:
            count = len(result.failures)
            print(f"ce-audit gate: FAILED ({count} failure{'s' if count != 1 else ''})", file=sys.stderr)
        raise typer.Exit(1)


def _check_format(output_format: str) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise AuditError(f"--format takes one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")


def _print_result(
    result: Any,
    paths: list[str],
    command: str,
    extra: dict[str, Any] | None,
    output_format: str,
    quiet: bool,
    detail: bool,
) -> None:
    """The summary on stdout in ``output_format``: the terminal report (or, quiet, the paths written);
    or the report.json document / summary.csv alone, the paths written then going to stderr."""
    if output_format == "table":
        console = _console()
        if quiet:
            for path in paths:
                console.print(path, markup=False, soft_wrap=True)
        else:
            from ce_audit.reports.table import print_report

            print_report(result.cells, console, paths, result.seconds, detail=detail or None)
        return
    if output_format == "csv":
        from ce_audit.reports.csv import summary_text

        sys.stdout.write(summary_text(result.cells))
    else:
        import json

        from ce_audit.reports.json import stdout_document

        document = stdout_document(result, command, extra)
        sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()
    if not quiet:
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)


def _check_fail_on(level: str | None) -> None:
    from ce_audit.verdict import FAIL_LEVELS

    if level is not None and level not in FAIL_LEVELS:
        raise AuditError(f"--fail-on takes one of {', '.join(FAIL_LEVELS)}, got {level!r}")


def _status_console(output_format: str) -> Console:
    """Where status lines go: the terminal report's console, or stderr when stdout holds JSON or CSV."""
    return _console() if output_format == "table" else Console(stderr=True)


def _exit_if_interrupted(result: Any, out: Path, console: Console, quiet: bool) -> None:
    """After SIGINT / SIGTERM (during the run, or while its reports were written): say what the written
    report holds, and exit 130 / 143."""
    from ce_audit.run.interruption import exit_code, received_signal, signal_name

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

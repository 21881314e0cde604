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
    list[str] | None, typer.Option("--impl", help="Implementation name (repeatable; default: every one).")
]
OutOption = Annotated[Path | None, typer.Option("--out", help="Report directory [default: ce-audit-report].")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the paths written and errors.")]
GradOption = Annotated[
    bool | None, typer.Option("--grad/--no-grad", help="Audit gradients too [default: on].")
]

# Loss options (ce_audit.options): repeatable on `sweep` (grid dimensions), single on `replay`.
LossOpt = Annotated[list[str] | None, typer.Option("--loss", help="ce or binary (binary cross-entropy).")]
ReductionOpt = Annotated[list[str] | None, typer.Option("--reduction", help="none, mean or sum.")]
WeightsOpt = Annotated[
    list[str] | None, typer.Option("--weights", help="Class weights: none, random, zero-on-target.")
]
IgnoreFractionOpt = Annotated[
    list[float] | None,
    typer.Option("--ignore-fraction", help="Fraction of rows whose target is ignore_index."),
]
IgnoreIndexOpt = Annotated[
    int | None, typer.Option("--ignore-index", help="The ignored target (default -100).")
]
SmoothingOpt = Annotated[list[float] | None, typer.Option("--label-smoothing", help="Label smoothing ε.")]
TargetsOpt = Annotated[
    list[str] | None, typer.Option("--targets", help="index (class indices) or probs (soft).")
]
SoftcapOpt = Annotated[
    list[float] | None, typer.Option("--softcap", help="Logit softcap C: C·tanh(z/C); 0 = off.")
]
ZLossOpt = Annotated[list[float] | None, typer.Option("--z-loss", help="z-loss λ: λ·lse² per row; 0 = off.")]
MaskOpt = Annotated[
    list[float] | None,
    typer.Option("--mask-fraction", help="Fraction of logits set to −inf (never the target)."),
]
FocalGammaOpt = Annotated[
    list[str] | None, typer.Option("--focal-gamma", help="Focal loss γ, or none (off).")
]
FocalAlphaOpt = Annotated[float | None, typer.Option("--focal-alpha", help="Focal loss α (default 1).")]


def _option_overrides(**values: Any) -> dict[str, Any]:
    """Config keys of the loss options given on the command line (lists; None where not given)."""
    keys = {
        "loss": "losses",
        "reduction": "reductions",
        "weights": "weights",
        "ignore_fraction": "ignore_fractions",
        "label_smoothing": "label_smoothings",
        "targets": "targets",
        "softcap": "softcaps",
        "z_loss": "z_losses",
        "mask_fraction": "mask_fractions",
        "focal_gamma": "focal_gammas",
    }
    overrides: dict[str, Any] = {keys[name]: value or None for name, value in values.items() if name in keys}
    overrides["ignore_index"] = values.get("ignore_index")
    overrides["focal_alpha"] = values.get("focal_alpha")
    return overrides


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
    loss: LossOpt = None,
    reduction: ReductionOpt = None,
    weights: WeightsOpt = None,
    ignore_fraction: IgnoreFractionOpt = None,
    ignore_index: IgnoreIndexOpt = None,
    label_smoothing: SmoothingOpt = None,
    targets: TargetsOpt = None,
    softcap: SoftcapOpt = None,
    z_loss: ZLossOpt = None,
    mask_fraction: MaskOpt = None,
    focal_gamma: FocalGammaOpt = None,
    focal_alpha: FocalAlphaOpt = None,
    margin: Annotated[
        list[str] | None,
        typer.Option(
            "--margin", help="Target logit set M above (M < 0: below) the row's other max, or none."
        ),
    ] = None,
    target_position: Annotated[
        list[str] | None, typer.Option("--target-position", help="random, first, last or block-edge.")
    ] = None,
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
        "margins": margin or None,
        "target_positions": target_position or None,
        **_option_overrides(
            loss=loss,
            reduction=reduction,
            weights=weights,
            ignore_fraction=ignore_fraction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            targets=targets,
            softcap=softcap,
            z_loss=z_loss,
            mask_fraction=mask_fraction,
            focal_gamma=focal_gamma,
            focal_alpha=focal_alpha,
        ),
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
    targets: Annotated[
        Path, typer.Argument(help="(N,) integer targets (ignore_index allowed) or (N, V) probabilities.")
    ],
    dtype: DtypeOption = None,
    device: DeviceOption = None,
    impl: ImplOption = None,
    reduction: Annotated[str | None, typer.Option("--reduction", help="none, mean or sum.")] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="Class weights: none, random, zero-on-target.")
    ] = None,
    ignore_fraction: Annotated[
        float | None,
        typer.Option("--ignore-fraction", help="Fraction of rows to ignore besides the file's own."),
    ] = None,
    ignore_index: IgnoreIndexOpt = None,
    label_smoothing: Annotated[
        float | None, typer.Option("--label-smoothing", help="Label smoothing ε.")
    ] = None,
    softcap: Annotated[float | None, typer.Option("--softcap", help="Logit softcap C; 0 = off.")] = None,
    z_loss: Annotated[float | None, typer.Option("--z-loss", help="z-loss λ; 0 = off.")] = None,
    mask_fraction: Annotated[
        float | None,
        typer.Option("--mask-fraction", help="Fraction of logits set to −inf (never the target)."),
    ] = None,
    focal_gamma: Annotated[str | None, typer.Option("--focal-gamma", help="Focal loss γ, or none.")] = None,
    focal_alpha: FocalAlphaOpt = None,
    grad: GradOption = None,
    out: OutOption = None,
    quiet: QuietOption = False,
) -> None:
    """Audit logits dumped from a real model; writes summary.csv, rows.csv and report.json."""
    from ce_audit.config import load_config
    from ce_audit.replay import run_replay
    from ce_audit.reports.table import print_report

    def one(value: Any) -> list[Any] | None:
        return None if value is None else [value]

    resolved = load_config(
        None,
        {
            "devices": device or None,
            "impls": impl or None,
            "grad": grad,
            "out": str(out) if out else None,
            "dtypes": dtype or None,
            **_option_overrides(
                reduction=one(reduction),
                weights=one(weights),
                ignore_fraction=one(ignore_fraction),
                ignore_index=ignore_index,
                label_smoothing=one(label_smoothing),
                softcap=one(softcap),
                z_loss=one(z_loss),
                mask_fraction=one(mask_fraction),
                focal_gamma=one(focal_gamma),
                focal_alpha=focal_alpha,
            ),
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
    for column in ("name", "backend", "what it computes", "origin", "dtypes", "loss", "options"):
        table.add_column(column)
    for entry in REGISTRY.values():
        dtypes = "all" if entry.dtypes == DTYPE_NAMES else ", ".join(entry.dtypes)
        supports = ", ".join(sorted(entry.supports)) or "—"
        table.add_row(
            entry.name, entry.backend, entry.description, entry.origin, dtypes, entry.family, supports
        )
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
    except (typer.Exit, *_CLICK_EXIT) as done:
        sys.exit(done.exit_code)
    except (typer.Abort, *_CLICK_ABORT):
        print("ce-audit: aborted", file=sys.stderr)
        sys.exit(130)
    except click_exceptions.ClickException as error:
        print(f"ce-audit: error: {error.format_message()}", file=sys.stderr)
        sys.exit(error.exit_code)

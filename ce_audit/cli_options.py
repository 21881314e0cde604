"""Options more than one command takes, each declared once with its help text.

The loss options: one Typer option per entry of the option table (ce_audit.options.OPTION_SPECS), added
to a command's signature (``with_loss_options``), and their values as config keys. The 14 options
`sweep` and `replay` share (``with_run_options``), handed to the command as one ``RunOptions``; and the
ones other commands reuse (``OutOption``, ``QuietOption``, ``PluginOption``, ``LoadPluginOption``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ce_audit.errors import AuditError
from ce_audit.options import OPTION_SPECS
from ce_audit.overrides import config_overrides, loss_option_overrides
from ce_audit.reports.stdout import OUTPUT_FORMATS
from ce_audit.verdict import check_fail_level

F = TypeVar("F", bound=Callable[..., Any])


def with_loss_options(grid: bool) -> Callable[[F], F]:
    """Add one CLI option per entry of the option table (ce_audit.options.OPTION_SPECS) to a command.

    ``grid``: repeatable flags for the grid options (`sweep`); otherwise one value each, for the options
    `replay` takes. The command receives them as keyword arguments named after the options.
    """
    python_types = {"str": str, "int": int, "float": float, "optional float": str}

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        added = []
        for spec in OPTION_SPECS:
            if not (grid or spec.replay):
                continue
            kind = python_types[spec.kind]
            annotation = list[kind] | None if grid and spec.grid else kind | None  # type: ignore[valid-type]
            help_text = (spec.help if grid else spec.replay_help or spec.help).rstrip(".")
            if grid and spec.grid:
                help_text += "; repeatable"
            if "default" not in help_text:
                help_text += f". Default: {_default_text(spec.default)}"
            option = typer.Option(spec.flag, metavar=_metavar(spec), help=help_text + ".")
            added.append(
                inspect.Parameter(
                    spec.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[annotation, option],
                )
            )
        params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
        at = next(i for i, p in enumerate(params) if p.name == "grad")  # the loss options come before --grad
        params = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD and i >= at
            else p
            for i, p in enumerate(params)
        ]
        params = [*params[:at], *added, *params[at:]]
        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def _metavar(spec: Any) -> str:
    """What the option takes, for --help: its choices, or N (int), X (float), X|none."""
    if spec.choices:
        return "|".join(spec.choices)
    return {"int": "N", "float": "X", "optional float": "X|none"}.get(spec.kind, "TEXT")


def _default_text(value: Any) -> str:
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_overrides(values: dict[str, Any], grid: bool) -> dict[str, Any]:
    """Config keys of the loss options given on the command line (None where not given): one value or a
    list of them, as `sweep` (``grid``) and `replay` take them (ce_audit.overrides.loss_option_overrides)."""
    return loss_option_overrides(values, front_door="the command line")


DTYPE_HELP = (
    "float16 (fp16, half), bfloat16 (bf16), float32 (fp32, float), float64 (fp64, double); repeatable."
)
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
TraceOption = Annotated[
    str | None,
    typer.Option(
        "--trace",
        metavar="plugins|all|none",
        help="Trace the worst rows of each flagged cell op by op: where a value first went non-finite and "
        "where the error entered, with the line (docs/trace.md). plugins (default): the implementations "
        "that are not built in; all: the built-ins too (the default sweep then takes about 1.5× as long); "
        "none: nothing.",
    ),
]
GradOption = Annotated[
    bool | None, typer.Option("--grad/--no-grad", help="Audit gradients too. Default: on.")
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
        help="Show the per-case table of each dtype and every finding (shown anyway where the terminal is "
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
SaveFailuresOption = Annotated[
    Path | None,
    typer.Option(
        "--save-failures",
        metavar="DIR",
        help="Save each failing cell's worst rows (.npy, .pt) and the `ce-audit replay` command that shows "
        "the failure again, one folder per cell under this directory.",
    ),
]


@dataclass(frozen=True)
class RunOptions:
    """The options `sweep` and `replay` share, as given (None: not given); a bad --fail-on or --format
    is an AuditError (in that order, before anything else is read)."""

    dtype: list[str] | None = None
    device: list[str] | None = None
    impl: list[str] | None = None
    grad: bool | None = None
    trace: str | None = None
    plugin: list[str] | None = None
    isolation: str | None = None
    timeout: float | None = None
    max_memory: str | None = None
    out: Path | None = None
    quiet: bool = False
    detail: bool = False
    output_format: str = "table"
    fail_on: str | None = None
    save_failures: Path | None = None

    def __post_init__(self) -> None:
        check_fail_level(self.fail_on)
        if self.output_format not in OUTPUT_FORMATS:
            formats = ", ".join(OUTPUT_FORMATS)
            raise AuditError(f"--format takes one of {formats}, got {self.output_format!r}")

    def overrides(self, **values: Any) -> dict[str, Any]:
        """The config overrides of these options and of the command's own ``values``
        (ce_audit.overrides.config_overrides)."""
        return config_overrides(
            dtypes=self.dtype, devices=self.device, impls=self.impl, grad=self.grad, trace=self.trace,
            isolation=self.isolation,
            timeout=self.timeout, max_memory=self.max_memory, out=self.out,
            front_door="the command line", **values,
        )  # fmt: skip


def _parameters(group: dict[str, tuple[Any, Any]]) -> list[inspect.Parameter]:
    """Keyword parameters from ``{name: (Annotated option, default)}``, in order."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [inspect.Parameter(name, keyword, default=default, annotation=annotation)
            for name, (annotation, default) in group.items()]  # fmt: skip


def _run_parameters(dtype_help: str, plugin: Any) -> tuple[list[inspect.Parameter], list[inspect.Parameter]]:
    """The shared options as parameters, in the order --help lists them: what runs (--dtype, --device,
    --impl), then how it runs and what is written (--grad … --save-failures)."""
    dtype = Annotated[list[str] | None, typer.Option("--dtype", metavar="DTYPE", help=dtype_help)]
    which = {"dtype": (dtype, None), "device": (DeviceOption, None), "impl": (ImplOption, None)}
    how = {
        "grad": (GradOption, None),
        "trace": (TraceOption, None),
        "plugin": (plugin, None),
        "isolation": (IsolationOption, None),
        "timeout": (TimeoutOption, None),
        "max_memory": (MaxMemoryOption, None),
        "out": (OutOption, None),
        "quiet": (QuietOption, False),
        "detail": (DetailOption, False),
        "output_format": (FormatOption, "table"),
        "fail_on": (FailOnOption, None),
        "save_failures": (SaveFailuresOption, None),
    }
    return _parameters(which), _parameters(how)


def with_run_options(*, dtype_help: str, plugin: Any, after: str, before: str) -> Callable[[F], F]:
    """Add the options `sweep` and `replay` share to a command: --dtype (with ``dtype_help``), --device
    and --impl after its parameter ``after``; --grad … --save-failures (--plugin declared by ``plugin``)
    before its parameter ``before``. The command receives them as one ``RunOptions``, ``run=``."""

    def decorate(command: F) -> F:
        own = [
            parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for parameter in inspect.signature(command, eval_str=True).parameters.values()
            if parameter.name != "run" and parameter.kind != inspect.Parameter.VAR_KEYWORD
        ]
        names = [parameter.name for parameter in own]
        which, how = _run_parameters(dtype_help, plugin)
        first, second = names.index(after) + 1, names.index(before)
        params = [*own[:first], *which, *own[first:second], *how, *own[second:]]
        shared = [parameter.name for parameter in (*which, *how)]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            run = RunOptions(**{name: values.pop(name) for name in shared})
            return command(**values, run=run)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in params}
        return wrapper  # type: ignore[return-value]

    return decorate

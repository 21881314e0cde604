"""The loss options on the command line: one Typer option per entry of the option table
(ce_audit.options.OPTION_SPECS), added to a command's signature, and their values as config keys."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from ce_audit.options import OPTION_SPECS
from ce_audit.overrides import loss_option_overrides

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

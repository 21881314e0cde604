"""What a front door (the command line, ``ce_audit.check``, the gate) changes in a config.

``config_overrides`` turns the values it was given into config keys (None: not given, the config's value
stands); ``front_door_config`` loads the config under them; ``with_added`` puts the plugins and budgets
it names after the config's own (they add, they do not replace), each once (``merged``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ce_audit.config import SweepConfig, load_config
from ce_audit.errors import AuditError
from ce_audit.options import SPECS_BY_NAME


def _as_list(value: Any) -> list[Any] | None:
    """None stays None (not given); one value becomes a list of one; any other iterable, a list."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def loss_option_overrides(values: Mapping[str, Any], front_door: str = "check()") -> dict[str, Any]:
    """Config keys of the loss options given by their names in the option table
    (ce_audit.options.OPTION_SPECS): a grid option as a list (one value → [value]), the others as given."""
    overrides: dict[str, Any] = {}
    for name, value in values.items():
        spec = SPECS_BY_NAME.get(name)
        if spec is None:
            known = ", ".join(SPECS_BY_NAME)
            raise AuditError(f"{front_door} got an unknown loss option {name!r}; choose from {known}")
        overrides[spec.config_key] = _as_list(value) if spec.grid else value
    return overrides


def config_overrides(
    *,
    dtypes: Any = None,
    devices: Any = None,
    impls: Any = None,
    distributions: Any = None,
    scales: Any = None,
    offsets: Any = None,
    vocabs: Any = None,
    batches: Any = None,
    seed: int | None = None,
    grad: bool | None = None,
    isolation: str | None = None,
    trace: str | None = None,
    timeout: float | None = None,
    max_memory: str | None = None,
    out: str | Path | None = None,
    tolerances: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    front_door: str = "check()",
) -> dict[str, Any]:
    """The config keys of a front door's values: the grid dimensions as lists (one value → [value]),
    ``out`` as text, the loss ``options`` by their config keys; None where a value was not given."""
    return {
        "dtypes": _as_list(dtypes),
        "devices": _as_list(devices),
        "impls": _as_list(impls),
        "distributions": _as_list(distributions),
        "scales": _as_list(scales),
        "offsets": _as_list(offsets),
        "vocabs": _as_list(vocabs),
        "batches": _as_list(batches),
        "seed": seed,
        "grad": grad,
        "isolation": isolation,
        "trace": trace,
        "timeout": timeout,
        "max_memory": max_memory,
        "out": None if out is None else str(out),
        "tolerances": tolerances,
        **loss_option_overrides(options or {}, front_door),
    }


def merged(*groups: Iterable[str], skip_blank: bool = False) -> tuple[str, ...]:
    """The entries of the groups in order, each once (``skip_blank``: empty ones left out)."""
    return tuple(dict.fromkeys(item for group in groups for item in group if item or not skip_blank))


def with_added(config: SweepConfig, plugins: Sequence[str] = (), budgets: Sequence[str] = ()) -> SweepConfig:
    """The config with ``plugins`` (in each of its [[grids]] too) and ``budgets`` after its own, each once."""
    return replace(config.with_plugins(plugins), budgets=merged(config.budgets, budgets))


def front_door_config(
    path: str | Path | None,
    overrides: Mapping[str, Any],
    *,
    plugins: Sequence[str] = (),
    budgets: Sequence[str] = (),
    search_from: str | Path | None = None,
) -> SweepConfig:
    """The config a front door runs: the default, updated by the file at ``path`` (or the nearest
    [tool.ce-audit] from ``search_from``), then by ``overrides`` (ce_audit.config.load_config); then
    ``plugins`` and ``budgets`` added to its own (``with_added``)."""
    config = load_config(path, dict(overrides), search_from=search_from)
    return with_added(config, plugins, budgets)

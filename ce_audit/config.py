"""Sweep configuration: TOML file → validated, frozen dataclass; the command line overrides the file."""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ce_audit.budgets import parse_budget
from ce_audit.dtypes import DTYPE_ALIASES, DTYPE_NAMES, FORMATS, canonical_dtype
from ce_audit.errors import AuditError
from ce_audit.metrics import Tolerance
from ce_audit.options import INPUT_SPECS, LOSS_OPTION_SPECS, OPTION_SPECS, LossOptions, validate_options
from ce_audit.plan.cases import DISTRIBUTIONS
from ce_audit.run.isolation import DEFAULT_TIMEOUT_S, ISOLATION_MODES
from ce_audit.run.memory_limit import DEFAULT_MAX_MEMORY, parse_memory
from ce_audit.trace import TRACE_SCOPES

DEFAULT_CONFIG_NAME = "default.toml"
_KINDS: dict[str, Any] = {"str": str, "int": int, "float": float, "optional float": "optional float"}


@dataclass(frozen=True)
class SweepConfig:
    """Everything that determines a sweep's numbers (with the package versions)."""

    dtypes: tuple[str, ...] = DTYPE_NAMES
    devices: tuple[str, ...] = ("auto",)
    impls: tuple[str, ...] = ()
    distributions: tuple[str, ...] = ("normal",)
    scales: tuple[float, ...] = (1.0,)
    offsets: tuple[float, ...] = (0.0,)
    vocabs: tuple[int, ...] = (1000,)
    batches: tuple[int, ...] = (32,)
    seed: int = 0
    grad: bool = True
    out: str = "ce-audit-report"
    chunk_size: int = 4096
    block_size: int = 1024
    block_mib: int = 256
    # whose flagged cells' worst rows are traced (where a value went non-finite, where the error entered):
    # plugins (not the built-ins), all, none
    trace: str = "plugins"
    isolation: str = "process"  # non-built-in implementations run in a worker process ("none": in-process)
    timeout: float = DEFAULT_TIMEOUT_S  # seconds an isolated implementation's call may take (0: no limit)
    max_memory: str = DEFAULT_MAX_MEMORY  # memory cap of an isolated implementation's worker ("8G"; 0: none)
    plugins: tuple[str, ...] = ()  # plugin files / modules loaded before the implementations resolve
    budgets: tuple[str, ...] = ()  # "impl:dtype:metric<=value", checked by `ce-audit gate`
    ulp_growth: float = 1.0  # gate: max_ulp regresses when it grows by more than this many ULPs …
    rel_growth: float = 0.1  # … and by more than this fraction (grad_max_rel_err: 1 ULP = machine epsilon)
    tolerances: dict[str, Tolerance] = field(
        default_factory=lambda: {name: Tolerance(f.rtol, f.atol) for name, f in FORMATS.items()}
    )
    # the values of every loss option and input dimension (ce_audit.options.OPTION_SPECS), by option name:
    # a grid dimension's list, or the one value of a single option (ignore_index, focal_alpha) alone
    option_grid: dict[str, tuple[Any, ...]] = field(
        default_factory=lambda: {spec.name: (spec.default,) for spec in OPTION_SPECS}
    )
    # [[grids]]: the sub-grids, parsed at load over this config (each with no grids of its own); a sweep
    # runs them in turn
    grids: tuple[Grid, ...] = ()

    def expanded(self) -> list[SweepConfig]:
        """The grids a sweep runs: this config alone, or its ``[[grids]]`` (parsed once, at load)."""
        return list(self.grids) or [self]

    def updated(self, **keys: Any) -> SweepConfig:
        """This config with ``keys`` changed, named as in a TOML config (``reductions=("mean",)``,
        ``ignore_index=-1``, ``dtypes=…``), in every one of its [[grids]] too; values already typed, not
        validated (``dataclasses.replace`` with the config's names)."""
        option_grid = dict(self.option_grid)
        fields_only = dict(keys)
        for key in [key for key in keys if key in _SPECS_BY_KEY]:
            spec, value = _SPECS_BY_KEY[key], fields_only.pop(key)
            option_grid[spec.name] = tuple(value) if spec.grid else (value,)
        grids = tuple(grid.updated(**keys) for grid in self.grids)
        return replace(self, **fields_only, option_grid=option_grid, grids=grids)

    def with_plugins(self, plugins: Iterable[str]) -> SweepConfig:
        """This config with ``plugins`` loaded after its own, in each of its [[grids]] too."""
        plugins = tuple(plugins)
        grids = tuple(grid.with_plugins(plugins) for grid in self.grids)
        return replace(self, plugins=tuple(dict.fromkeys([*self.plugins, *plugins])), grids=grids)

    def values(self, option: str) -> tuple[Any, ...]:
        """The values an option or input dimension takes in this grid (by its name)."""
        return self.option_grid[option]

    def loss_options(self) -> list[LossOptions]:
        """The option grid, in a fixed order (the option table's)."""
        names = [spec.name for spec in LOSS_OPTION_SPECS]
        return [
            LossOptions(**dict(zip(names, combination, strict=True)))
            for combination in itertools.product(*(self.option_grid[name] for name in names))
        ]

    def implementation_settings(self) -> dict[str, Any]:
        """Tunables passed to implementations that declare them."""
        return {"chunk_size": self.chunk_size, "block_size": self.block_size}

    def to_dict(self) -> dict[str, Any]:
        """The config under its TOML keys (a [[grids]] table: the keys where it differs from this config)."""
        data: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "option_grid":
                for spec in (*LOSS_OPTION_SPECS, *INPUT_SPECS):  # report.json's order of old
                    values = self.option_grid[spec.name]
                    data[spec.config_key] = values if spec.grid else values[0]
            elif f.name == "grids":
                own = [grid.to_dict() for grid in self.grids]
                data["grids"] = [
                    {k: v for k, v in table.items() if k not in ("grids", "out") and v != data.get(k)}
                    for table in own
                ]
            elif f.name == "tolerances":
                data["tolerances"] = {name: asdict(tol) for name, tol in self.tolerances.items()}
            else:
                value = getattr(self, f.name)
                data[f.name] = value
        return data


Grid = SweepConfig
"""One grid a sweep runs: a [[grids]] table parsed over its config (any key may differ from one grid to the
next, so a grid is a config without grids of its own), or the config itself when it has none."""


_LIST_KEYS: dict[str, Any] = {
    "dtypes": str,
    "devices": str,
    "impls": str,
    "distributions": str,
    "scales": float,
    "offsets": float,
    "vocabs": int,
    "batches": int,
    "plugins": str,
    "budgets": str,
}
_SCALAR_KEYS: dict[str, Any] = {
    "seed": int,
    "grad": bool,
    "out": str,
    "chunk_size": int,
    "block_size": int,
    "block_mib": int,
    "isolation": str,
    "trace": str,
    "timeout": float,
    "max_memory": str,
    "ulp_growth": float,
    "rel_growth": float,
}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    if kind == "optional float":  # a number, or "none" (the dimension is off)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise AuditError(f"config key {key!r} takes numbers or 'none', got {value!r}") from None
        return _coerce(key, value, float)
    if kind is bool:
        if not isinstance(value, bool):
            raise AuditError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise AuditError(f"config key {key!r} must be a number, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise AuditError(f"config key {key!r} must be a whole number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise AuditError(f"config key {key!r} must be a string, got {value!r}")
    return kind(value)


_SPECS_BY_KEY = {spec.config_key: spec for spec in OPTION_SPECS}


def _from_mapping(data: dict[str, Any], base: SweepConfig) -> SweepConfig:
    values: dict[str, Any] = {}
    option_grid = dict(base.option_grid)
    for key, raw in data.items():
        if key in _SPECS_BY_KEY:
            spec = _SPECS_BY_KEY[key]
            items = raw if spec.grid and isinstance(raw, (list, tuple)) else [raw]
            option_grid[spec.name] = tuple(_coerce(key, item, _KINDS[spec.kind]) for item in items)
        elif key in _LIST_KEYS:
            items = raw if isinstance(raw, (list, tuple)) else [raw]
            values[key] = tuple(_coerce(key, item, _LIST_KEYS[key]) for item in items)
            if key == "dtypes":  # aliases (fp16, bf16, double, …) become the canonical names
                values[key] = tuple(canonical_dtype(name) for name in values[key])
        elif key in _SCALAR_KEYS:
            if key == "max_memory" and isinstance(raw, int) and not isinstance(raw, bool):
                raw = str(raw)  # max_memory = 0: no cap
            values[key] = _coerce(key, raw, _SCALAR_KEYS[key])
        elif key == "tolerances":
            if not isinstance(raw, dict):
                raise AuditError("config key 'tolerances' must be a table of dtype = {rtol, atol}")
            tolerances = dict(base.tolerances)
            for alias, entry in raw.items():
                dtype = canonical_dtype(alias) if alias.lower() in DTYPE_ALIASES else alias
                if dtype not in FORMATS or not isinstance(entry, dict) or set(entry) - {"rtol", "atol"}:
                    raise AuditError(f"tolerances.{dtype}: expected a float dtype with keys rtol and atol")
                current = tolerances[dtype]
                tolerances[dtype] = Tolerance(
                    _coerce(f"tolerances.{dtype}.rtol", entry.get("rtol", current.rtol), float),
                    _coerce(f"tolerances.{dtype}.atol", entry.get("atol", current.atol), float),
                )
            values["tolerances"] = tolerances
        elif key == "grids":
            if not isinstance(raw, (list, tuple)) or not all(isinstance(grid, dict) for grid in raw):
                raise AuditError("config key 'grids' must be an array of tables ([[grids]])")
            for grid in raw:
                if "grids" in grid or "out" in grid:
                    raise AuditError("a [[grids]] table cannot set 'grids' or 'out'")
            values["grids"] = tuple(dict(grid) for grid in raw)  # parsed below, over this config
        else:
            known = ", ".join([*_LIST_KEYS, *_SCALAR_KEYS, *_SPECS_BY_KEY, "tolerances", "grids"])
            raise AuditError(f"unknown config key {key!r}; known keys: {known}")
    tables = values.pop("grids", None)
    config = validate(replace(base, **values, option_grid=option_grid))
    if tables is not None:
        config = replace(config, grids=_parse_grids(tables, config))
    return config


def _parse_grids(tables: Iterable[dict[str, Any]], base: SweepConfig) -> tuple[SweepConfig, ...]:
    """Each [[grids]] table parsed over ``base`` (the config it belongs to, without its grids)."""
    base = replace(base, grids=())
    grids = []
    for index, table in enumerate(tables):
        try:
            grids.append(_from_mapping(dict(table), base))
        except AuditError as error:
            raise AuditError(f"grids[{index}]: {error}") from None
    return tuple(grids)


def validate(config: SweepConfig) -> SweepConfig:
    """Check every value; raise AuditError with a one-line message on the first problem."""
    if config.seed < 0:
        raise AuditError(f"seed must be a non-negative integer, got {config.seed}")
    if any(s < 0 for s in config.scales):
        raise AuditError("scales must not be negative (use the adversarial distribution for low targets)")
    for dtype in config.dtypes:
        if dtype not in FORMATS:
            raise AuditError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_NAMES)}")
    for name in config.distributions:
        if name not in DISTRIBUTIONS:
            raise AuditError(f"unknown distribution {name!r}; choose from {', '.join(DISTRIBUTIONS)}")
    for key in (
        "dtypes",
        "devices",
        "distributions",
        "scales",
        "offsets",
        "vocabs",
        "batches",
    ):
        if not getattr(config, key):
            raise AuditError(f"{key} must not be empty")
    for spec in OPTION_SPECS:
        if not config.values(spec.name):
            raise AuditError(f"{spec.config_key} must not be empty")
        if not spec.owned:  # input dimensions; loss options are checked as LossOptions below
            for value in config.values(spec.name):
                problem = spec.validate(value)
                if problem:
                    raise AuditError(problem)
    for options in config.loss_options():
        try:
            validate_options(options)
        except ValueError as error:
            raise AuditError(str(error)) from None
    if any(v < 1 for v in config.vocabs):
        raise AuditError("every vocab size must be at least 1")
    if any(b < 0 for b in config.batches):
        raise AuditError("batch sizes must not be negative")
    if any(not (s == s and abs(s) != float("inf")) for s in (*config.scales, *config.offsets)):
        raise AuditError("scales and offsets must be finite numbers")
    for key in ("chunk_size", "block_size", "block_mib"):
        if getattr(config, key) < 1:
            raise AuditError(f"{key} must be at least 1")
    if config.trace not in TRACE_SCOPES:
        raise AuditError(f"trace must be {', '.join(TRACE_SCOPES)}, got {config.trace!r}")
    if config.isolation not in ISOLATION_MODES:
        choices = " or ".join(ISOLATION_MODES)
        raise AuditError(f"isolation must be {choices}, got {config.isolation!r}")
    if not (config.timeout >= 0 and config.timeout != float("inf")):
        raise AuditError(f"timeout must be a finite number of seconds ≥ 0 (0: none), got {config.timeout!r}")
    parse_memory(config.max_memory)
    for key in ("ulp_growth", "rel_growth"):
        value = getattr(config, key)
        if not (value >= 0 and value != float("inf")):
            raise AuditError(f"{key} must be a finite number ≥ 0, got {value!r}")
    for dtype, tolerance in config.tolerances.items():
        for name in ("rtol", "atol"):
            value = getattr(tolerance, name)
            if not (0 <= value < float("inf")):
                raise AuditError(f"tolerances.{dtype}.{name} must be a finite number ≥ 0, got {value!r}")
    for text in config.budgets:
        parse_budget(text)
    return config


_OPTION_KEYS = tuple(spec.config_key for spec in OPTION_SPECS if spec.grid)
_NARROWING_KEYS = frozenset({"distributions", "scales", "offsets", "vocabs", "batches", *_OPTION_KEYS})


MAX_NESTING = 16  # arrays and tables inside one another; a config needs 3 ([[grids]] of tables of lists)


def _nesting(value: Any) -> int:
    """How deep arrays and tables lie inside one another in ``value`` (counted without recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        deepest = max(deepest, depth)
    return deepest


def _refuse_deep(data: Any, origin: str) -> None:
    if _nesting(data) > MAX_NESTING:
        raise AuditError(f"{origin}: arrays or tables nested too deeply (at most {MAX_NESTING})")


def _read_toml(text: str, origin: str, *, whole: bool = True) -> dict[str, Any]:
    """The TOML document; invalid TOML, or arrays and tables nested deeper than MAX_NESTING (which would
    exhaust Python's recursion while parsing or validating), raise AuditError. ``whole=False``: the
    caller checks the nesting of the part it uses (a pyproject.toml's other tools' tables are theirs)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise AuditError(f"{origin}: invalid TOML: {error}") from None
    except RecursionError:
        raise AuditError(f"{origin}: arrays or tables nested too deeply (at most {MAX_NESTING})") from None
    if whole:
        _refuse_deep(data, origin)
    return data


def default_config_text() -> str:
    """The built-in default sweep (identical to configs/default.toml)."""
    return resources.files("ce_audit").joinpath(DEFAULT_CONFIG_NAME).read_text(encoding="utf-8")


def default_help_text(key: str) -> str:
    """A top-level key of the built-in default sweep as --help gives it: its values joined by ", "
    (floats as %g: "1, 10, 100, 1000", "0, 10000"); empty where the default does not set it."""
    value = _read_toml(default_config_text(), "built-in default").get(key, [])
    values = value if isinstance(value, list) else [value]
    return ", ".join(f"{item:g}" if isinstance(item, float) else str(item) for item in values)


PROJECT_FILE = "pyproject.toml"
PROJECT_TABLE = "ce-audit"  # [tool.ce-audit]


def find_project_config(start: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The ``[tool.ce-audit]`` table of the nearest pyproject.toml that has one, in ``start`` or a parent
    directory, with that file's path; None when there is none."""
    start = Path(start).resolve()
    for directory in (start, *start.parents):
        candidate = directory / PROJECT_FILE
        if not candidate.is_file():
            continue
        try:
            text = candidate.read_text(encoding="utf-8")
        except OSError:
            continue
        table = _read_toml(text, str(candidate), whole=False).get("tool", {}).get(PROJECT_TABLE)
        if table is not None:
            if not isinstance(table, dict):
                raise AuditError(f"{candidate}: [tool.{PROJECT_TABLE}] must be a table")
            _refuse_deep(table, f"{candidate} [tool.{PROJECT_TABLE}]")
            return candidate, table
    return None


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    search_from: str | Path | None = None,
) -> SweepConfig:
    """The default sweep, updated by the TOML file at ``path`` (if any), then by ``overrides``.

    With no ``path`` and a ``search_from`` directory, the ``[tool.ce-audit]`` table of the nearest
    pyproject.toml there or above (``find_project_config``) stands in for the file; an explicit ``path``
    wins over it, and the overrides (the command line) over both.

    The default's [[grids]] (its failure bands) run unless a config file is given (it is one grid unless it
    has [[grids]] of its own) or the overrides narrow the grid (distributions, scales, offsets, vocabularies,
    batches or loss options); overrides of other keys (dtypes, devices, impls, …) apply to every grid."""
    config = _from_mapping(_read_toml(default_config_text(), "built-in default"), SweepConfig())
    data: dict[str, Any] | None = None
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise AuditError(f"cannot read config {path}: {error.strerror or error}") from None
        except UnicodeDecodeError as error:
            raise AuditError(f"config {path} is not UTF-8 text (byte {error.start})") from None
        data = _read_toml(text, str(path))
        config = _from_mapping(data, config)
    elif search_from is not None:
        found = find_project_config(search_from)
        if found is not None:
            origin, data = found
            try:
                config = _from_mapping(data, config)
            except AuditError as error:
                raise AuditError(f"{origin} [tool.{PROJECT_TABLE}]: {error}") from None
    if data is not None and "grids" not in data:  # a config file is one grid unless it has [[grids]]
        config = replace(config, grids=())
    if overrides:
        given = {k: v for k, v in overrides.items() if v is not None}
        if data is None and "grids" not in given and set(given) & _NARROWING_KEYS:
            # a grid chosen on the command line (or by check()) replaces the default's sub-grids
            config = replace(config, grids=())
        config = _from_mapping(given, config)
        grid_keys = {k: v for k, v in given.items() if k != "out"}
        if config.grids and grid_keys:  # the command line has the last word in every grid too
            grids = tuple(_from_mapping(grid_keys, grid) for grid in config.grids)
            config = validate(replace(config, grids=grids))
    return config


def config_from_dict(data: dict[str, Any]) -> SweepConfig:
    """Rebuild a config from SweepConfig.to_dict() output (as stored in report.json)."""
    known = {f.name for f in fields(SweepConfig)} - {"option_grid"} | set(_SPECS_BY_KEY)
    _refuse_deep(data, "config")
    return _from_mapping({k: v for k, v in data.items() if k in known}, SweepConfig())

"""The structure the code relies on: each extension point declared once, and kept in step.

- a loss option is declared once, as a LossOptions field carrying its OptionSpec: the option table, the
  summary.csv columns, the config keys, the CLI flags, SUPPORTABLE and the report's legend derive from it;
- every Cell field is marked key or measurement, and the summary.csv columns follow the Cell's fields;
- no module imports another in a cycle, counting every import (at the top, inside functions, under
  TYPE_CHECKING, relative); no module outside ce_audit/backends.py branches on a backend name.
"""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ce_audit.backends import BACKEND_CLASSES, BACKEND_NAMES, backend_skip_reason, uses_accelerators
from ce_audit.cli import app
from ce_audit.config import SweepConfig, load_config
from ce_audit.dtypes import float_format
from ce_audit.options import (
    GENERIC_SUPPORTS,
    OPTION_SPECS,
    SPECS_BY_NAME,
    SUPPORTABLE,
    LossOptions,
    call_keywords,
)
from ce_audit.reports.csv import SUMMARY_COLUMNS
from ce_audit.reports.table import LABEL_MEANINGS
from ce_audit.results import (
    CELL_COLUMNS,
    KEY,
    KEY_COLUMNS,
    MEASUREMENT,
    MEASUREMENT_COLUMNS,
    Cell,
    cell_from_columns,
    column_value,
    measurements,
    unit_of,
)

PACKAGE = Path(__file__).resolve().parents[1] / "ce_audit"


def test_the_option_columns_are_the_cell_keys_in_the_tables_order():
    cell_keys = [name for name in KEY_COLUMNS if name in SPECS_BY_NAME]
    assert cell_keys == [spec.name for spec in OPTION_SPECS]
    assert [spec.name for spec in OPTION_SPECS if spec.owned] == [f.name for f in fields(LossOptions)]


def test_option_defaults_reach_the_config_and_the_cell():
    config = SweepConfig()
    cell = cell_from_columns(
        {"impl": "fused", "dtype": "float32", "device": "cpu", "distribution": "normal", "scale": 1.0,
         "offset": 0.0, "batch": 1, "vocab": 1, "seed": 0}
    )  # fmt: skip
    assert config.loss_options() == [LossOptions()]
    for spec in OPTION_SPECS:
        assert config.values(spec.name) == (spec.default,), spec.name
        assert column_value(cell, spec.name) == spec.default, spec.name
    assert config.to_dict()["reductions"] == ("none",) and config.to_dict()["ignore_index"] == -100


def test_supportable_names_and_the_legend_come_from_the_specs():
    assert SUPPORTABLE == (
        "reduction", "weight", "ignore_index", "label_smoothing", "probs", "softcap", "z_loss",
    )  # fmt: skip
    assert {"reduction", "softcap", "z_loss"} == GENERIC_SUPPORTS
    legend = ["w=", "ignore=", "ls=", "cap=", "z=", "mask=", "M=", "y=", "up=", "mean", "sum"]
    assert list(LABEL_MEANINGS) == ["s=", "+", "-", *legend]


def test_every_cell_field_is_key_or_measurement():
    roles = {f.name: f.metadata.get("role") for f in fields(Cell)}
    assert set(roles.values()) == {KEY, MEASUREMENT}
    assert set(KEY_COLUMNS) | set(MEASUREMENT_COLUMNS) == set(CELL_COLUMNS)
    assert not set(KEY_COLUMNS) & set(MEASUREMENT_COLUMNS)
    assert SUMMARY_COLUMNS == CELL_COLUMNS
    assert {"impl", "dtype", "device", "scale", "offset", "vocab"} <= set(KEY_COLUMNS)
    assert {"status", "max_ulp", "grad_status", "error"} <= set(MEASUREMENT_COLUMNS)


def test_gate_and_budget_groups_come_from_the_fields():
    assert measurements(gate="status") == ("status", "grad_status")
    assert set(measurements(gate="count")) == {
        "nan_rows",
        "inf_rows",
        "grad_nan",
        "grad_inf",
        "finite_where_infinite",
        "worse_rows",  # rows newly worse than PyTorch's: a regression the saturating max_ulp can hide
    }
    assert measurements(gate="growth") == ("max_ulp", "grad_max_rel_err")
    assert (unit_of("max_ulp"), unit_of("grad_max_rel_err")) == ("ulp", "eps")
    assert "max_ulp" in measurements(budget="loss") and "grad_max_rel_err" in measurements(budget="grad")


def test_loss_options_reach_implementations_through_the_table():
    options = LossOptions(reduction="mean", ignore_fraction=0.1, label_smoothing=0.1, softcap=30.0)
    assert call_keywords(options) == {
        "reduction": "mean",
        "ignore_index": -100,
        "label_smoothing": 0.1,
        "softcap": 30.0,
    }
    assert options.required() == {"reduction", "ignore_index", "label_smoothing", "softcap"}
    assert call_keywords(LossOptions()) == {} and LossOptions().required() == frozenset()


@pytest.mark.parametrize("spec", OPTION_SPECS, ids=lambda spec: spec.name)
def test_every_option_has_its_flag_and_config_key(spec):
    runner = CliRunner()
    sweep_help = runner.invoke(app, ["sweep", "--help"], env={"COLUMNS": "200"}).output
    replay_help = runner.invoke(app, ["replay", "--help"], env={"COLUMNS": "200"}).output
    assert spec.flag in sweep_help
    flag = re.compile(re.escape(spec.flag) + r"(?![\w-])")  # --targets, not --targets-key
    assert bool(flag.search(replay_help)) == spec.replay
    config = load_config(None, {spec.config_key: [spec.default] if spec.grid else spec.default})
    assert config.values(spec.name) == (spec.default,)
    assert config.to_dict()[spec.config_key] == ((spec.default,) if spec.grid else spec.default)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("reductions", ["avg"], "unknown reduction 'avg'"),
        ("label_smoothings", [1.5], "label_smoothing must lie in [0, 1]"),
        ("softcaps", [-1.0], "softcap must be a finite number"),
        ("target_positions", ["middle"], "unknown target_position 'middle'"),
    ],
)
def test_the_table_validates_config_values(option, value, message):
    from ce_audit.errors import AuditError

    with pytest.raises(AuditError, match=re.escape(message)):
        load_config(None, {option: value})


def _module_names() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, not ``__init__``)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        names[name] = path
    return names


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The dotted names an import statement may load: ``from a.b import c`` loads a.b and, where c is a
    module, a.b.c; a relative import is resolved against ``package``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        module = f"{base}.{module}" if module else base
    return [module, *(f"{module}.{alias.name}" for alias in node.names)]


def _import_graph() -> dict[str, dict[str, int]]:
    """For each module, the package modules it imports and the line of the first such import: every
    import counts, at the top, inside a function or under ``TYPE_CHECKING``."""
    names = _module_names()
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for dep in _imported(node, package):
                    if dep in names and dep != name:
                        deps.setdefault(dep, node.lineno)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm), as a path that
    returns to its first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for dep in sorted(graph[name]):
            if dep not in index:
                connect(dep)
                low[name] = min(low[name], low[dep])
            elif dep in stack:
                low[name] = min(low[name], index[dep])
        if low[name] == index[name]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == name:
                    break
            if len(group) > 1:
                groups.append(group)

    for name in sorted(graph):
        if name not in index:
            connect(name)
    cycles = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start}
        while True:  # walk inside the group until a module repeats
            nxt = min(dep for dep in graph[path[-1]] if dep in group)
            if nxt in seen:
                cycles.append([*path[path.index(nxt) :], nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def _shown(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*steps, cycle[-1]])


def test_the_import_graph_counts_every_kind_of_import():
    graph = _import_graph()
    assert len(graph) > 20  # the walk found the package
    assert "ce_audit.errors" in graph["ce_audit.config"]  # a top-level import
    assert _imported(ast.parse("from . import csv").body[0], "ce_audit.reports") == [
        "ce_audit.reports",
        "ce_audit.reports.csv",
    ]
    assert _imported(ast.parse("from ..results import Cell").body[0], "ce_audit.reports") == [
        "ce_audit.results",
        "ce_audit.results.Cell",
    ]
    inner = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert _cycles(inner) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    graph = _import_graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_shown(cycle, graph) for cycle in cycles)


def test_only_the_backend_registry_branches_on_backend_names():
    pattern = re.compile(r"backend\s*(==|!=|in)\s*\(?[\"'](torch|numpy|jax)[\"']")
    offenders = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "backends.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders


def test_backend_registry_answers_without_importing_frameworks():
    assert set(BACKEND_NAMES) == set(BACKEND_CLASSES) >= {"torch", "numpy"}
    assert uses_accelerators("torch") and not uses_accelerators("numpy")
    assert backend_skip_reason("numpy", float_format("float32"), "cuda:0") == (
        "NumPy implementations run on the CPU only"
    )
    assert backend_skip_reason("torch", float_format("float64"), "mps") == "MPS has no float64"
    assert backend_skip_reason("torch", float_format("float16"), "cpu") is None

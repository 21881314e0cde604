"""The Python API for test suites: ``ce_audit.check(fn_or_name, ...)`` → a report to assert on.

    report = ce_audit.check(my_ce, dtypes=["float16", "float32"], scales=[1, 10, 100])
    report.assert_ok()   # AssertionError listing every failing cell
    report.cells         # the cells of summary.csv (ce_audit.results.Cell)

A cell fails when its loss status is inaccurate, nonfinite or error, when its gradient is nonfinite or
error (also inaccurate with ``strict_grad=True``: the elementwise rtol/atol test of gradients fails even
PyTorch's own kernel by a few ULPs in float16, so it is opt-in; a budget on grad_max_rel_err is the finer
tool), or when it breaks a budget. Skipped cells (e.g. a dtype the implementation does not declare) do
not fail. The sweep starts from the built-in default config (or ``config``), updated by the arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ce_audit.adapters import make_adapter
from ce_audit.budgets import parse_budget
from ce_audit.config import SweepConfig
from ce_audit.errors import AuditError
from ce_audit.implementations import REGISTRY, Implementation, remove
from ce_audit.options import options_label
from ce_audit.overrides import config_overrides, front_door_config
from ce_audit.plugins import ATTRIBUTE, add_function
from ce_audit.printable import plural
from ce_audit.reproducers import ReproducerSink, check_destination
from ce_audit.results import Cell
from ce_audit.run.sweep import run_sweep
from ce_audit.statuses import FAILING, Status

Target = str | Callable[..., Any]


@dataclass(frozen=True)
class CheckReport:
    """The cells of one check, and a message per failing cell or broken budget."""

    cells: list[Cell]
    failures: list[str]
    config: SweepConfig
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failures

    def assert_ok(self) -> None:
        """Raise AssertionError listing every failing cell (one per line); nothing when all held."""
        if self.failures:
            lines = "\n".join(f"  {line}" for line in self.failures)
            failing = plural(len(self.failures), "failing cell")
            raise AssertionError(f"{failing} of {len(self.cells)}:\n{lines}")

    def __str__(self) -> str:
        head = f"{plural(len(self.cells), 'cell')}, {len(self.failures)} failing"
        return "\n".join([head, *(f"  {line}" for line in self.failures)])


def _where(cell: Cell) -> str:
    """The cell as a failure line names it: impl, dtype, device, distribution, scale, offset, vocab, batch."""
    where = f"{cell.impl} {cell.dtype} {cell.device} {cell.distribution} scale={cell.scale:g}"
    if cell.offset:
        where += f" offset={cell.offset:g}"
    label = options_label(cell)
    return where + f" vocab={cell.vocab} batch={cell.batch}" + (f" {label}" if label else "")


def failing_cells(
    cells: list[Cell],
    budgets: Sequence[str] = (),
    strict_grad: bool = False,
    reproducers: dict[Cell, Path] | None = None,
) -> list[str]:
    """One line per failing cell (see the module docstring), then one per broken budget; a cell with a
    saved reproducer names its folder."""
    lines = []
    for cell in cells:
        problems = []
        if cell.status in FAILING:
            detail = cell.error if cell.status == Status.ERROR else f"max {cell.max_ulp:.3g} ULP"
            if cell.status == Status.NONFINITE:
                detail = f"NaN rows {cell.nan_rows}, Inf rows {cell.inf_rows}"
            if cell.status != Status.ERROR:
                detail += f", worst row {cell.worst_row}" if cell.worst_row >= 0 else ", the reduced value"
            problems.append(f"loss {cell.status} ({detail})")
        grad_failing = FAILING if strict_grad else (Status.NONFINITE, Status.ERROR)
        if cell.grad_status in grad_failing and cell.status != Status.ERROR:
            detail = (
                cell.error if cell.grad_status == Status.ERROR else f"max rel err {cell.grad_max_rel_err:.3g}"
            )
            problems.append(f"gradient {cell.grad_status} ({detail})")
        saved = (reproducers or {}).get(cell)
        if saved is not None:
            problems.append(f"reproducer: {saved / 'command.txt'}")
        if problems:
            lines.append(f"{_where(cell)}: {'; '.join(problems)}")
    for budget in (parse_budget(text) for text in budgets):
        for cell in cells:
            message = budget.fails(None, cell)
            if message:
                lines.append(f"{_where(cell)}: {message}")
        if not any(budget.matches(cell) and cell.status != Status.SKIPPED for cell in cells):
            lines.append(f"budget {budget.text} matches no measured cell")
    return lines


def _register_callable(
    function: Callable[..., Any], backend: str, supports: Sequence[str], adapter: Mapping[str, Any] | None
) -> tuple[str, bool]:
    """The registry name of a callable, registering it for this check if needed (True: remove after)."""
    registered = getattr(function, ATTRIBUTE, None)
    if isinstance(registered, Implementation) and REGISTRY.get(registered.name) is registered:
        if supports or adapter:
            raise AuditError(
                f"{registered.name} is registered already: declare supports and the adapter in its register()"
            )
        return registered.name, False
    name = getattr(function, "__name__", "") or type(function).__name__
    if name in REGISTRY or not name.isidentifier():
        name = f"{getattr(function, '__module__', 'user')}.{getattr(function, '__qualname__', name)}"
        name = "".join(c if c.isalnum() or c in "._+-" else "_" for c in name)
    if name in REGISTRY:
        raise AuditError(f"cannot register {function!r}: the name {name!r} is taken; decorate it with a name")
    add_function(
        function, name, backend=backend, origin="ce_audit.check", supports=tuple(supports),
        adapter=make_adapter(**(adapter or {})),
    )  # fmt: skip
    return name, True


def check(
    impl: Target | Sequence[Target],
    *,
    dtypes: Sequence[str] | str | None = None,
    scales: Sequence[float] | float | None = None,
    offsets: Sequence[float] | float | None = None,
    distributions: Sequence[str] | str | None = None,
    vocabs: Sequence[int] | int | None = None,
    batches: Sequence[int] | int | None = None,
    devices: Sequence[str] | str | None = None,
    seed: int | None = None,
    grad: bool | None = None,
    budgets: Sequence[str] = (),
    tolerances: dict[str, dict[str, float]] | None = None,
    backend: str = "torch",
    config: str | Path | None = None,
    plugins: Sequence[str] = (),
    strict_grad: bool = False,
    supports: Sequence[str] = (),
    adapter: Mapping[str, Any] | None = None,
    save_failures: str | Path | None = None,
    isolation: str | None = None,
    timeout: float | None = None,
    max_memory: str | None = None,
    **options: Any,
) -> CheckReport:
    """Audit one or more implementations (functions or registered names) and return a CheckReport.

    Unset arguments keep the config's values (the built-in default sweep when ``config`` is None).
    A function (or loss class, or module) that is not registered is registered for the duration of the
    call, with ``backend``, ``supports`` (the options it takes, as in ``ce_audit.register``) and
    ``adapter``: the adapter settings of ``ce_audit.register`` by name (``{"returns": "mean",
    "sequence": 128, "shifted": True, "kwargs": {...}}``; ce_audit.adapters.ADAPTER_KEYS). A failing cell's
    line names the cell and its worst row (the first non-finite one, else the largest ULP error).
    ``options``: loss options by their names in the option table (``reduction="mean"``,
    ``label_smoothing=[0.0, 0.1]``, ``softcap=30``, ``margin=4``, ``ignore_index=-1``, …); a single value or
    a list for the grid options, as on the command line. ``save_failures``: a directory where each failing
    cell's worst rows and its `ce-audit replay` command are saved; its failure line names the file.
    ``isolation`` ("process", the default, or "none"), ``timeout`` and ``max_memory`` ("8G"; "auto": half
    the machine's): how implementations that are not built in run (ce_audit.run.isolation); "none" lets a
    test see what its function recorded in this process.
    """
    overrides = config_overrides(
        dtypes=dtypes, scales=scales, offsets=offsets, distributions=distributions, vocabs=vocabs,
        batches=batches, devices=devices, seed=seed, grad=grad, tolerances=tolerances, isolation=isolation,
        timeout=timeout, max_memory=max_memory, options=options,
    )  # fmt: skip
    targets = [impl] if isinstance(impl, str) or callable(impl) else list(impl)
    if not targets:
        raise AuditError("check() needs at least one implementation")
    names, temporary = [], []
    try:
        for target in targets:
            if isinstance(target, str):
                names.append(target)
            else:
                name, added = _register_callable(target, backend, supports, adapter)
                names.append(name)
                if added:
                    temporary.append(name)
        overrides["impls"] = names
        resolved = front_door_config(config, overrides, plugins=plugins, budgets=budgets)
        for text in resolved.budgets:
            parse_budget(text)  # a bad budget is an AuditError before the sweep, not after
        if save_failures is not None:
            check_destination(save_failures)  # before the sweep, not after it
        sink = ReproducerSink() if save_failures is not None else None
        result = run_sweep(resolved, reproducers=sink)
    finally:
        for name in temporary:
            remove(name)
    saved = sink.write(save_failures) if sink is not None and save_failures is not None else None
    failures = failing_cells(result.cells, resolved.budgets, strict_grad, saved)
    return CheckReport(result.cells, failures, resolved, result.seconds)

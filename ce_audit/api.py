"""The Python API for test suites: ``ce_audit.check(fn_or_name, ...)`` → a report to assert on.

    report = ce_audit.check(my_ce, dtypes=["float16", "float32"], scales=[1, 10, 100])
    report.assert_ok()   # AssertionError listing every failing cell
    report.rows          # the rows of summary.csv (SummaryRow)

A cell fails when its loss status is inaccurate, nonfinite or error, when its gradient is nonfinite or
error (also inaccurate with ``strict_grad=True``: the elementwise rtol/atol test of gradients fails even
PyTorch's own kernel by a few ULPs in float16, so it is opt-in; a budget on grad_max_rel_err is the finer
tool), or when it breaks a budget. Skipped cells (e.g. a dtype the implementation does not declare) do
not fail. The sweep starts from the built-in default config (or ``config``), updated by the arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ce_audit.budgets import parse_budget
from ce_audit.config import SweepConfig, load_config
from ce_audit.engine import SummaryRow, run_sweep
from ce_audit.errors import AuditError
from ce_audit.implementations import REGISTRY, Implementation, remove
from ce_audit.plugins import ATTRIBUTE, add_function

Target = str | Callable[..., Any]
FAILING = ("inaccurate", "nonfinite", "error")


@dataclass(frozen=True)
class CheckReport:
    """The rows of one check, and a message per failing cell or broken budget."""

    rows: list[SummaryRow]
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
            raise AssertionError(f"{len(self.failures)} failing cells of {len(self.rows)}:\n{lines}")

    def __str__(self) -> str:
        head = f"{len(self.rows)} cells, {len(self.failures)} failing"
        return "\n".join([head, *(f"  {line}" for line in self.failures)])


def _cell(row: SummaryRow) -> str:
    where = f"{row.impl} {row.dtype} {row.device} {row.distribution} scale={row.scale:g}"
    if row.offset:
        where += f" offset={row.offset:g}"
    return where + f" vocab={row.vocab} batch={row.batch}"


def failing_cells(
    rows: list[SummaryRow], budgets: Sequence[str] = (), strict_grad: bool = False
) -> list[str]:
    """One line per failing cell (see the module docstring), then one per broken budget."""
    from ce_audit.reports.csv import summary_records

    lines = []
    for row in rows:
        problems = []
        if row.status in FAILING:
            detail = row.error if row.status == "error" else f"max {row.max_ulp:.3g} ULP"
            if row.status == "nonfinite":
                detail = f"NaN rows {row.nan_rows}, Inf rows {row.inf_rows}"
            problems.append(f"loss {row.status} ({detail})")
        grad_failing = FAILING if strict_grad else ("nonfinite", "error")
        if row.grad_status in grad_failing and row.status != "error":
            detail = row.error if row.grad_status == "error" else f"max rel err {row.grad_max_rel_err:.3g}"
            problems.append(f"gradient {row.grad_status} ({detail})")
        if problems:
            lines.append(f"{_cell(row)}: {'; '.join(problems)}")
    parsed = [parse_budget(text) for text in budgets]
    records = summary_records(rows)
    for budget in parsed:
        for row, record in zip(rows, records, strict=True):
            message = budget.fails(None, record)
            if message:
                lines.append(f"{_cell(row)}: {message}")
        if not any(budget.matches(record) and record["status"] != "skipped" for record in records):
            lines.append(f"budget {budget.text} matches no measured cell")
    return lines


def _as_tuple(value: Any) -> tuple[Any, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float)):
        return (value,)
    return tuple(value)


def _register_callable(function: Callable[..., Any], backend: str) -> tuple[str, bool]:
    """The registry name of a callable, registering it for this check if needed (True: remove after)."""
    registered = getattr(function, ATTRIBUTE, None)
    if isinstance(registered, Implementation) and REGISTRY.get(registered.name) is registered:
        return registered.name, False
    name = getattr(function, "__name__", "") or "user_impl"
    if name in REGISTRY or not name.isidentifier():
        name = f"{getattr(function, '__module__', 'user')}.{getattr(function, '__qualname__', name)}"
        name = "".join(c if c.isalnum() or c in "._+-" else "_" for c in name)
    if name in REGISTRY:
        raise AuditError(f"cannot register {function!r}: the name {name!r} is taken; decorate it with a name")
    add_function(function, name, backend=backend, origin="ce_audit.check")
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
) -> CheckReport:
    """Audit one or more implementations (functions or registered names) and return a CheckReport.

    Unset arguments keep the config's values (the built-in default sweep when ``config`` is None).
    A function that is not registered is registered for the duration of the call, with ``backend``.
    """
    targets = [impl] if isinstance(impl, str) or callable(impl) else list(impl)
    if not targets:
        raise AuditError("check() needs at least one implementation")
    names, temporary = [], []
    try:
        for target in targets:
            if isinstance(target, str):
                names.append(target)
            else:
                name, added = _register_callable(target, backend)
                names.append(name)
                if added:
                    temporary.append(name)
        overrides = {
            "impls": names,
            "dtypes": _as_tuple(dtypes),
            "scales": _as_tuple(scales),
            "offsets": _as_tuple(offsets),
            "distributions": _as_tuple(distributions),
            "vocabs": _as_tuple(vocabs),
            "batches": _as_tuple(batches),
            "devices": _as_tuple(devices),
            "seed": seed,
            "grad": grad,
            "tolerances": tolerances,
        }
        resolved = load_config(
            config, {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
        )
        resolved = replace(
            resolved,
            plugins=tuple(dict.fromkeys([*resolved.plugins, *plugins])),
            budgets=tuple(dict.fromkeys([*resolved.budgets, *budgets])),
        )
        for text in resolved.budgets:
            parse_budget(text)  # a bad budget is an AuditError before the sweep, not after
        result = run_sweep(resolved)
    finally:
        for name in temporary:
            remove(name)
    failures = failing_cells(result.rows, resolved.budgets, strict_grad)
    return CheckReport(result.rows, failures, resolved, result.seconds)

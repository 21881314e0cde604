"""The Python API for test suites: ``ce_audit.check(fn_or_name, ...)`` → a report to assert on.

    report = ce_audit.check(my_ce, dtypes=["float16", "float32"], scales=[1, 10, 100])
    report.assert_ok()   # AssertionError: a count, then one line per failing cell with its cause
    report.cells         # the cells of summary.csv (ce_audit.results.Cell); report.failing: those failing

A cell fails when it reaches ``fail_on``, a ``--fail-on`` level (ce_audit.verdict.FAIL_LEVELS):
``"inaccurate"`` (the default) fails a loss that is inaccurate, nonfinite or error and a gradient that is
nonfinite or error (also inaccurate with ``strict_grad=True``: the elementwise rtol/atol test of
gradients fails even PyTorch's own kernel by a few ULPs in float16, so it is opt-in; a budget on
grad_max_rel_err is the finer tool); ``"nonfinite"`` and ``"error"`` only from those statuses on;
``"worse-than-pytorch"`` only the cells flagged worse than PyTorch's kernel on the same inputs (the
``flag`` column). A broken budget fails at every level. Skipped cells (e.g. a dtype the implementation
does not declare) never fail. The sweep starts from the built-in default config (or ``config``), updated
by the arguments. The report is ce_audit.check_report.CheckReport.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ce_audit.adapters import make_adapter
from ce_audit.budgets import parse_budget
from ce_audit.check_report import DEFAULT_FAIL_ON, CheckReport, check_fail_on, failure_lines, reaching
from ce_audit.errors import AuditError
from ce_audit.implementations import REGISTRY, Implementation, remove
from ce_audit.overrides import config_overrides, front_door_config
from ce_audit.plugins import ATTRIBUTE, add_function, check_family
from ce_audit.reproducers import ReproducerSink, check_destination
from ce_audit.run.sweep import run_sweep

Target = str | Callable[..., Any]


# the loss options that make a sweep audit each family, where check() is not given them
FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "binary": {"loss": "binary"},
    "linear_ce": {"loss": "linear_ce"},
    "focal": {"focal_gamma": [0.0, 0.5, 2.0]},  # γ = 0 (plain CE's gradient), below 1, the common 2
}


def _register_callable(
    function: Callable[..., Any],
    backend: str,
    supports: Sequence[str],
    adapter: Mapping[str, Any] | None,
    family: str = "ce",
) -> tuple[str, bool]:
    """The registry name of a callable, registering it for this check if needed (True: remove after)."""
    registered = getattr(function, ATTRIBUTE, None)
    if isinstance(registered, Implementation) and REGISTRY.get(registered.name) is registered:
        if supports or adapter or family != "ce":
            raise AuditError(
                f"{registered.name} is registered already: declare supports, the family and the adapter "
                "in its register()"
            )
        return registered.name, False
    name = getattr(function, "__name__", "") or type(function).__name__
    if name in REGISTRY or not name.isidentifier():
        name = f"{getattr(function, '__module__', 'user')}.{getattr(function, '__qualname__', name)}"
        name = "".join(c if c.isalnum() or c in "._+-" else "_" for c in name)
    if name in REGISTRY:
        raise AuditError(f"cannot register {function!r}: the name {name!r} is taken; decorate it with a name")
    add_function(
        function, name, backend=backend, family=family, origin="ce_audit.check", supports=tuple(supports),
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
    family: str = "ce",
    config: str | Path | None = None,
    plugins: Sequence[str] = (),
    strict_grad: bool = False,
    fail_on: str = DEFAULT_FAIL_ON,
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
    "sequence": 128, "shifted": True, "kwargs": {...}}``; ce_audit.adapters.ADAPTER_KEYS), and ``family``
    (``"ce"``, ``"binary"``, ``"focal"`` or ``"linear_ce"``, as in ``ce_audit.register``): a binary, focal or
    linear function is audited with ``loss="binary"``, ``focal_gamma=[0, 0.5, 2]`` or ``loss="linear_ce"``
    (``fn(hidden, classifier, targets)``), unless those options are given
    (``FAMILY_OPTIONS``). A failing cell's
    line names the cell and its worst row (the first non-finite one, else the largest ULP error).
    ``options``: loss options by their names in the option table (``reduction="mean"``,
    ``label_smoothing=[0.0, 0.1]``, ``softcap=30``, ``margin=4``, ``ignore_index=-1``, …); a single value or
    a list for the grid options, as on the command line. ``save_failures``: a directory where each failing
    cell's worst rows and its `ce-audit replay` command are saved; its failure line names the file.
    ``isolation`` ("process", the default, or "none"), ``timeout`` and ``max_memory`` ("8G"; "auto": half
    the machine's): how implementations that are not built in run (ce_audit.run.isolation); "none" lets a
    test see what its function recorded in this process. ``fail_on``: the level a cell fails at, as
    ``--fail-on`` takes it (see the module docstring; anything else is an AuditError, before the sweep).
    """
    check_fail_on(fail_on)
    family = check_family(family, "check()")
    defaults = FAMILY_OPTIONS.get(family, {})
    options = {**{k: v for k, v in defaults.items() if k not in options}, **options}
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
                name, added = _register_callable(target, backend, supports, adapter, family)
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
    failures = failure_lines(result.cells, fail_on, resolved.budgets, strict_grad, saved)
    failing = reaching(result.cells, fail_on, strict_grad)
    return CheckReport(result.cells, failures, resolved, result.seconds, fail_on, failing, strict_grad)

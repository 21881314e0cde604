"""The CI precision gate: a current audit against a committed baseline, and absolute budgets.

A cell is identified by every summary.csv column that is not a measurement (impl, dtype, device and
the case columns), so columns a later version adds to the case join the key by themselves. Each
check is a small object whose ``fails(baseline_row, current_row)`` returns a message or None; every
failure is collected, then the caller exits once: 0 held, 1 regressed, 2 bad input (AuditError).

Regression rules, per cell present in both audits:
* status or grad_status worse, in the order ok < inaccurate < nonfinite < error (or no longer measured);
* more NaN/Inf rows in loss or gradient (nan_rows, inf_rows, grad_nan, grad_inf);
* max_ulp grows by more than ``ulp_growth`` ULPs and by more than ``rel_growth`` (a fraction);
  grad_max_rel_err likewise, one ULP there being the dtype's machine epsilon 2^(1−p);
* value_kind changes (per-row losses ↔ a mean).
A baseline cell missing now fails; a new cell is reported, and fails only when ``strict``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ce_audit.budgets import Budget, number, parse_budget, status_rank
from ce_audit.config import SweepConfig, config_from_dict, load_config
from ce_audit.dtypes import FORMATS
from ce_audit.errors import AuditError

Row = Mapping[str, str]

# Columns that hold measurements, not the identity of a cell. A new measurement column must be added here;
# any other new column becomes part of the cell key.
MEASUREMENT_COLUMNS = frozenset(
    {
        "status",
        "rows",
        "nan_rows",
        "inf_rows",
        "max_abs_err",
        "max_rel_err",
        "max_ulp",
        "mean_bits",
        "grad_status",
        "grad_nan",
        "grad_inf",
        "grad_max_abs_err",
        "grad_max_rel_err",
        "error",
        "max_logit",
        "max_reference",
        "max_value",
        "value_kind",
        "wrote_input",
        "grad_true_max_rel_err",
        "grad_rowsum_max",
        "notes",
    }
)
UNMEASURED = ("error", "skipped")


def key_columns(header: Sequence[str]) -> tuple[str, ...]:
    """The identity of a cell: every column of the header that is not a measurement, in header order."""
    return tuple(column for column in header if column not in MEASUREMENT_COLUMNS)


def _short(text: str) -> str:
    """A number as %g (10.0 → 10, 10000.0 → 1e+04); anything else unchanged."""
    value = number(text)
    return text if math.isnan(value) and text.lower() != "nan" else f"{value:.4g}"


class Check(Protocol):
    """One regression rule: a message when the current cell fails it against the baseline, else None."""

    @property
    def metric(self) -> str: ...

    def fails(self, baseline: Row | None, current: Row | None) -> str | None: ...


def _measured(row: Row | None) -> bool:
    return row is not None and row.get("status", "") not in UNMEASURED


def _both_measured(baseline: Row | None, current: Row | None, metric: str) -> tuple[Row, Row] | None:
    """Both cells, when both were measured and both have the metric's column; otherwise None."""
    if baseline is None or current is None or not (_measured(baseline) and _measured(current)):
        return None
    if metric not in baseline or metric not in current:
        return None
    return baseline, current


@dataclass(frozen=True)
class Present:
    """A baseline cell must still be audited; a new cell fails only in strict mode."""

    strict: bool = False
    metric: str = "cell"

    def fails(self, baseline: Row | None, current: Row | None) -> str | None:
        if baseline is not None and current is None:
            return "missing from the current audit"
        if baseline is None and current is not None and self.strict:
            return "new cell, not in the baseline (--strict)"
        return None


@dataclass(frozen=True)
class StatusHeld:
    """status / grad_status may not get worse: ok < inaccurate < nonfinite < error."""

    metric: str = "status"

    def fails(self, baseline: Row | None, current: Row | None) -> str | None:
        if baseline is None or current is None or self.metric not in baseline or self.metric not in current:
            return None
        if self.metric != "status" and not _measured(current):
            return None  # the status check already says it
        before, now = baseline[self.metric], current[self.metric]
        rank_before, rank_now = status_rank(before), status_rank(now)
        if rank_before is None:
            return None
        if rank_now is None:
            reason = f": {current.get('error')}" if current.get("error") else ""
            return f"no longer audited ({now or 'absent'}{reason})"
        if rank_now > rank_before:
            reason = f": {current.get('error')}" if now == "error" and current.get("error") else ""
            return f"{self.metric} got worse{reason}"
        return None


@dataclass(frozen=True)
class CountHeld:
    """No more NaN/Inf rows than the baseline had."""

    metric: str

    def fails(self, baseline: Row | None, current: Row | None) -> str | None:
        pair = _both_measured(baseline, current, self.metric)
        if pair is None:
            return None
        baseline, current = pair
        before, now = number(baseline[self.metric]), number(current[self.metric])
        if now > before or (math.isnan(now) and not math.isnan(before)):
            kind = "NaN" if "nan" in self.metric else "Inf"
            where = "gradient rows" if self.metric.startswith("grad") else "rows"
            return f"{kind} {where} appeared"
        return None


@dataclass(frozen=True)
class GrowthHeld:
    """A metric may not grow by more than ``ulps`` ULPs *and* more than ``fraction`` of its baseline value.

    For a relative error (``relative=True``) one ULP is the dtype's machine epsilon 2^(1−p).
    """

    metric: str
    ulps: float = 1.0
    fraction: float = 0.1
    relative: bool = False

    def fails(self, baseline: Row | None, current: Row | None) -> str | None:
        pair = _both_measured(baseline, current, self.metric)
        if pair is None:
            return None
        baseline, current = pair
        if self.relative and not all(
            status_rank(row.get("grad_status", "")) not in (None, 3) for row in (baseline, current)
        ):
            return None  # no gradient measured on one side; the grad_status check covers it
        before, now = number(baseline[self.metric]), number(current[self.metric])
        if math.isnan(now):
            return None if math.isnan(before) else "became NaN"
        unit = 1.0
        if self.relative:
            fmt = FORMATS.get(current.get("dtype", ""))
            unit = 2.0 ** (1 - fmt.precision) if fmt else 0.0
        if now - before > self.ulps * unit and now > before * (1 + self.fraction):
            allowed = f"{self.ulps:g} ULP" + (" (relative)" if self.relative else "")
            return f"grew by more than {allowed} and {self.fraction:.0%}"
        return None


@dataclass(frozen=True)
class KindHeld:
    """An implementation that returned per-row losses keeps doing so (and a mean stays a mean)."""

    metric: str = "value_kind"

    def fails(self, baseline: Row | None, current: Row | None) -> str | None:
        if baseline is None or current is None or not (_measured(baseline) and _measured(current)):
            return None
        before, now = baseline.get(self.metric, ""), current.get(self.metric, "")
        if before and now and before != now:
            return "now returns a mean (0-d)" if now == "mean" else "now returns per-row losses"
        return None


def default_checks(ulp_growth: float = 1.0, rel_growth: float = 0.1, strict: bool = False) -> list[Check]:
    """The regression rules of the gate, in the order their failures are listed."""
    return [
        Present(strict),
        StatusHeld("status"),
        StatusHeld("grad_status"),
        CountHeld("nan_rows"),
        CountHeld("inf_rows"),
        CountHeld("grad_nan"),
        CountHeld("grad_inf"),
        GrowthHeld("max_ulp", ulp_growth, rel_growth),
        GrowthHeld("grad_max_rel_err", ulp_growth, rel_growth, relative=True),
        KindHeld(),
    ]


@dataclass(frozen=True)
class Audit:
    """One side of the comparison: a summary.csv's header and rows, and the report.json beside it."""

    header: tuple[str, ...]
    rows: list[dict[str, str]]
    source: str
    report: dict[str, Any] | None = None


@dataclass(frozen=True)
class Failure:
    """One failed check: where, which metric, baseline → current, and why."""

    cell: str
    metric: str
    baseline: str
    current: str
    message: str


@dataclass(frozen=True)
class CellOutcome:
    """The verdict of one cell (one JUnit test case)."""

    key: tuple[str, ...]
    impl: str
    dtype: str
    label: str  # short: impl, dtype and the key columns that vary
    name: str  # full: every key column but impl and dtype
    state: str  # "compared", "new" or "missing"
    failures: tuple[Failure, ...]
    skipped: str = ""  # why the cell was not measured, if it was not


@dataclass(frozen=True)
class GateResult:
    """Every cell's verdict, every failure (cells first, then budgets that match nothing), and notes."""

    cells: list[CellOutcome]
    failures: list[Failure]
    new: list[str]
    missing: list[str]
    budgets: list[str]
    notes: list[str]
    baseline_source: str | None
    current_source: str
    key_columns: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.failures


def _index(audit: Audit, columns: tuple[str, ...], what: str) -> dict[tuple[str, ...], dict[str, str]]:
    index: dict[tuple[str, ...], dict[str, str]] = {}
    for row in audit.rows:
        key = tuple(row.get(column, "") for column in columns)
        if key in index:
            shown = ", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True))
            raise AuditError(f"{what} {audit.source} has two rows for the cell {shown}")
        index[key] = row
    return index


def _labels(keys: list[tuple[str, ...]], columns: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Short labels (impl, dtype and the key columns that vary) and full names (every other key column)."""
    varying = {column for i, column in enumerate(columns) if len({key[i] for key in keys}) > 1}
    short, full = [], []
    for key in keys:
        values = dict(zip(columns, key, strict=True))
        head = [values[c] for c in ("impl", "dtype") if c in values]
        rest = [(c, v) for c, v in values.items() if c not in ("impl", "dtype")]
        short.append(" ".join([*head, *(f"{c}={_short(v)}" for c, v in rest if c in varying)]))
        full.append(" ".join(f"{c}={_short(v)}" for c, v in rest))
    return short, full


def _shown(row: Row | None, metric: str) -> str:
    if row is None:
        return "—"
    if metric == "cell":
        return "present"
    value = row.get(metric, "")
    return _short(value) if value else "—"


def compare(
    baseline: Audit | None,
    current: Audit,
    *,
    checks: list[Check] | None = None,
    budgets: Sequence[Budget] = (),
    strict: bool = False,
) -> GateResult:
    """Run every check on every cell and every budget on every current cell; collect all failures."""
    checks = default_checks(strict=strict) if checks is None else checks
    notes: list[str] = []
    columns = key_columns(current.header)
    if baseline is not None:
        base_columns = key_columns(baseline.header)
        if set(base_columns) != set(columns):
            differ = sorted(set(base_columns) ^ set(columns))
            notes.append(f"case columns differ ({', '.join(differ)}): cells are matched on the common ones")
            columns = tuple(c for c in columns if c in base_columns)
    base_index = _index(baseline, columns, "baseline") if baseline is not None else {}
    current_index = _index(current, columns, "current audit")
    keys = list(base_index) + [key for key in current_index if key not in base_index]
    short, full = _labels(keys, columns)

    cells: list[CellOutcome] = []
    failures: list[Failure] = []
    new, missing = [], []
    matched = {budget.text: False for budget in budgets}
    for key, label, name in zip(keys, short, full, strict=True):
        before, now = base_index.get(key), current_index.get(key)
        row = now if now is not None else before
        assert row is not None
        cell_failures = []
        if baseline is not None:
            for check in checks:
                message = check.fails(before, now)
                if message:
                    shown_now = "missing" if now is None else _shown(now, check.metric)
                    cell_failures.append(
                        Failure(label, check.metric, _shown(before, check.metric), shown_now, message)
                    )
        for budget in budgets:
            if now is not None and budget.matches(now):
                matched[budget.text] = matched[budget.text] or now.get("status") != "skipped"
            message = budget.fails(before, now)
            if message:
                limit = budget.limit if isinstance(budget.limit, str) else f"{budget.limit:g}"
                cell_failures.append(
                    Failure(
                        label,
                        budget.metric,
                        f"budget {budget.op} {limit}",
                        _shown(now, budget.metric),
                        message,
                    )
                )
        state = (
            "missing" if now is None else ("new" if before is None and baseline is not None else "compared")
        )
        if state == "new":
            new.append(label)
        elif state == "missing":
            missing.append(label)
        skipped = row.get("error", "") if row.get("status") == "skipped" else ""
        cells.append(
            CellOutcome(
                key,
                row.get("impl", ""),
                row.get("dtype", ""),
                label,
                name,
                state,
                tuple(cell_failures),
                skipped,
            )
        )
        failures += cell_failures
    for budget in budgets:
        if not matched[budget.text]:
            failures.append(
                Failure("(no cell)", budget.metric, budget.text, "—", "budget matches no measured cell")
            )
    return GateResult(
        cells=cells,
        failures=failures,
        new=new,
        missing=missing,
        budgets=[budget.text for budget in budgets],
        notes=notes,
        baseline_source=baseline.source if baseline is not None else None,
        current_source=current.source,
        key_columns=columns,
    )


# ---------------------------------------------------------------- reading audits and running the gate


def summary_path(path: str | Path) -> Path:
    """A summary.csv, or a report directory holding one."""
    path = Path(path)
    if path.is_dir() or (not path.exists() and path.suffix.lower() != ".csv"):
        return path / "summary.csv"
    return path


def _read_report(path: Path) -> dict[str, Any] | None:
    report = path.with_name("report.json")
    if not report.is_file():
        return None
    try:
        document = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AuditError(f"cannot read {report}: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("config", {}), dict):
        raise AuditError(f"{report} is not a ce-audit report.json")
    return document


def read_audit(path: str | Path, what: str) -> Audit:
    """A summary.csv (or a directory holding one) with its report.json, if present."""
    from ce_audit.reports.csv import read_summary_csv

    path = summary_path(path)
    header, rows = read_summary_csv(path, what)
    return Audit(tuple(header), rows, str(path), _read_report(path))


def audit_from_result(
    result: Any, source: str, command: str = "sweep", extra: dict[str, Any] | None = None
) -> Audit:
    """A fresh AuditResult as the gate sees it (the same text summary.csv would hold)."""
    from ce_audit.reports.csv import SUMMARY_COLUMNS, summary_records
    from ce_audit.reports.json import report_document

    return Audit(
        SUMMARY_COLUMNS, summary_records(result.rows), source, report_document(result, command, extra)
    )


def _recorded_config(report: dict[str, Any] | None, source: str) -> SweepConfig:
    if report is None:
        raise AuditError(
            f"{source} has no report.json beside it, so the sweep cannot be re-run; "
            "give --current or --config"
        )
    try:
        return config_from_dict(report.get("config") or {})
    except AuditError as error:
        raise AuditError(f"config recorded in report.json beside {source}: {error}") from None


@dataclass(frozen=True)
class GateRun:
    """A gate evaluation: the verdict, both audits, and the fresh result (None with --current)."""

    result: GateResult
    baseline: Audit | None
    current: Audit
    fresh: Any = None  # AuditResult of a fresh sweep or replay
    command: str = "sweep"
    extra: dict[str, Any] | None = None


def _dedupe(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for item in items if item))


def run_gate(
    baseline_path: str | Path | None,
    *,
    current_path: str | Path | None = None,
    config_path: str | Path | None = None,
    plugins: Sequence[str] = (),
    budgets: Sequence[str] = (),
    ulp_growth: float | None = None,
    rel_growth: float | None = None,
    strict: bool = False,
    allow_missing_baseline: bool = False,
    progress: Any = None,
) -> GateRun:
    """Read the baseline, obtain the current audit (``current_path`` or a fresh run), compare.

    The fresh run uses ``config_path`` if given, else the config recorded in the baseline's report.json
    (plugins included; a recorded replay re-reads its logits files). Budgets come from ``budgets`` and
    from every config involved; growth tolerances from the arguments, else the config, else 1 ULP / 10%.
    """
    baseline = None
    if baseline_path is not None:
        path = summary_path(baseline_path)
        if path.exists() or not allow_missing_baseline:
            baseline = read_audit(path, "baseline")
    run_config: SweepConfig | None = None
    fresh, command, extra = None, "sweep", None
    if current_path is not None:
        current = read_audit(current_path, "current audit")
    else:
        if config_path is not None:
            run_config = load_config(config_path)
        elif baseline is not None:
            run_config = _recorded_config(baseline.report, baseline.source)
            command = str(baseline.report.get("command", "sweep")) if baseline.report else "sweep"
        else:
            raise AuditError("nothing to audit: give a BASELINE with its report.json, --current or --config")
        run_config = replace(run_config, plugins=_dedupe([*run_config.plugins, *plugins]))
        if command == "replay":
            fresh, extra = _rerun_replay(run_config, baseline)
        else:
            from ce_audit.engine import run_sweep

            fresh = run_sweep(run_config, progress=progress)
        current = audit_from_result(fresh, f"a fresh {command}", command, extra)

    configs = [run_config] if run_config is not None else []
    if baseline is not None and baseline.report is not None:
        configs.append(_recorded_config(baseline.report, baseline.source))
    if current_path is not None and current.report is not None:
        configs.append(_recorded_config(current.report, current.source))
    budget_texts = _dedupe([*budgets, *(text for config in configs for text in config.budgets)])
    parsed = [parse_budget(text) for text in budget_texts]
    reference = configs[0] if configs else SweepConfig()
    checks = default_checks(
        reference.ulp_growth if ulp_growth is None else ulp_growth,
        reference.rel_growth if rel_growth is None else rel_growth,
        strict,
    )
    result = compare(baseline, current, checks=checks, budgets=parsed, strict=strict)
    notes = _version_notes(baseline, current)
    if notes:
        result = replace(result, notes=[*result.notes, *notes])
    return GateRun(result, baseline, current, fresh, command, extra)


def _rerun_replay(config: SweepConfig, baseline: Audit | None) -> tuple[Any, dict[str, Any]]:
    from ce_audit.replay import run_replay

    assert baseline is not None and baseline.report is not None
    inputs = baseline.report.get("inputs") or {}
    if not isinstance(inputs, dict) or not inputs.get("logits") or not inputs.get("targets"):
        raise AuditError(f"report.json beside {baseline.source} records a replay without its input files")
    dtypes = list(dict.fromkeys(row["dtype"] for row in baseline.rows)) or None
    result = run_replay(inputs["logits"], inputs["targets"], config, dtypes=dtypes)
    return result, {"inputs": inputs}


def _version_notes(baseline: Audit | None, current: Audit) -> list[str]:
    if baseline is None or baseline.report is None or current.report is None:
        return []
    before = baseline.report.get("versions") or {}
    now = current.report.get("versions") or {}
    changed = [
        f"{name} {before[name]} → {now[name]}" for name in before if name in now and before[name] != now[name]
    ]
    return [f"versions differ from the baseline's: {', '.join(changed)}"] if changed else []


def update_baseline(run: GateRun, baseline_path: str | Path) -> list[Path]:
    """Rewrite the baseline (summary.csv and report.json beside it) from the current audit, atomically."""
    from ce_audit.reports.files import write_atomically

    path = summary_path(baseline_path)
    if path.suffix.lower() != ".csv":
        raise AuditError(f"baseline {path} must be a .csv file or a directory")
    report_path = path.with_name("report.json")
    written = []
    if run.fresh is not None:
        from ce_audit.reports.csv import write_summary_csv
        from ce_audit.reports.json import write_report_json

        written.append(write_report_json(run.fresh, report_path, run.command, run.extra))
        written.append(write_summary_csv(run.fresh.rows, path))
        return written
    source = Path(run.current.source)
    if run.current.report is not None:
        text = json.dumps(run.current.report, indent=2, allow_nan=False) + "\n"
        written.append(write_atomically(report_path, text))
    try:
        csv_text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise AuditError(f"cannot read {source}: {error.strerror or error}") from None
    written.append(write_atomically(path, csv_text))
    return written

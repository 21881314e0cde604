"""What ``ce-audit gate`` does around the comparison: read the baseline (summary.csv and the report.json
beside it), obtain the current audit (a summary.csv, or a fresh run of the recorded sweep or replay),
compare, and on ``--update`` rewrite the baseline. Exit codes are the caller's: 0 held, 1 regressed,
2 bad input (AuditError).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ce_audit.audit_result import AuditResult
from ce_audit.budgets import parse_budget
from ce_audit.config import SweepConfig, config_from_dict, load_config
from ce_audit.errors import AuditError
from ce_audit.gate.checks import default_checks
from ce_audit.gate.compare import Audit, GateResult, compare, refuse_malformed_audit
from ce_audit.overrides import merged
from ce_audit.printable import printable
from ce_audit.replay import run_replay
from ce_audit.reports.bundle import ReportDirectory, ReportFile, check_member
from ce_audit.reports.csv import SUMMARY_COLUMNS, read_cells, write_summary_csv
from ce_audit.reports.files import write_atomically
from ce_audit.reports.json import report_document, write_report_json
from ce_audit.run.sweep import run_sweep
from ce_audit.statuses import message_line


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
    except RecursionError:
        raise AuditError(f"{report} is not a ce-audit report.json (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AuditError(f"cannot read {report}: {message_line(error)}") from None
    if not isinstance(document, dict) or not isinstance(document.get("config", {}), dict):
        raise AuditError(f"{report} is not a ce-audit report.json")
    check_member(path, document)
    return document


def read_audit(path: str | Path, what: str) -> Audit:
    """A summary.csv (or a directory holding one), read into typed cells, with its report.json if present."""
    path = summary_path(path)
    summary = read_cells(path, what)
    return Audit(summary.header, summary.cells, str(path), _read_report(path), summary.unknown)


def audit_from_result(
    result: AuditResult, source: str, command: str = "sweep", extra: dict[str, Any] | None = None
) -> Audit:
    """A fresh AuditResult as the gate sees it: its cells as summary.csv holds them (``summary_cells``: the
    measurements rounded the same way, so the verdict on a fresh run is the verdict on its written report),
    and the report.json it would write."""
    return Audit(SUMMARY_COLUMNS, result.summary_cells, source, report_document(result, command, extra))


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


def checkout_file(spec: str) -> Path | None:
    """The file a plugin spec names, where it is a path inside the working directory (a module name, or a
    path outside it or leading out of it by a link: None)."""
    if not (spec.endswith(".py") or "/" in spec or "\\" in spec):
        return None
    here = Path.cwd().resolve()
    place = (here / spec).resolve()
    return place if here in place.parents else None


def recorded_plugins(
    recorded: Sequence[str], given: Sequence[str], source: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Which of the plugins a baseline recorded a re-run imports without --baseline-plugins: (loaded,
    ignored). A plugin file inside the working directory (the checkout, whose code CI runs anyway) is
    loaded; a module name or a file outside it is not (a baseline from elsewhere must not make the gate
    import code from outside the project), unless given again with --plugin. A recorded file that is gone
    is an error, unless --plugin gives the plugins instead."""
    loaded, ignored = [], []
    for spec in recorded:
        if spec in given:
            continue  # --plugin adds it anyway
        place = checkout_file(spec)
        if place is None:
            ignored.append(spec)
        elif place.is_file():
            loaded.append(spec)
        elif not any(text.strip() for text in given):
            raise AuditError(
                f"the baseline {source} was written with the plugin {printable(spec)}, and there is no such "
                "file here: run the gate where the baseline was written, restore the file, or give the "
                "plugin with --plugin"
            )
    return tuple(loaded), tuple(ignored)


@dataclass(frozen=True)
class GateRun:
    """A gate evaluation: the verdict, both audits, and the fresh result (None with --current)."""

    result: GateResult
    baseline: Audit | None
    current: Audit
    fresh: AuditResult | None = None  # of a fresh sweep or replay
    command: str = "sweep"
    extra: dict[str, Any] | None = None


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
    baseline_plugins: bool = False,
) -> GateRun:
    """Read the baseline, obtain the current audit (``current_path`` or a fresh run), compare.

    The fresh run uses ``config_path`` if given, else the config recorded in the baseline's report.json (a
    recorded replay re-reads its logits files), else (``allow_missing_baseline``, no baseline yet) the
    config ``ce-audit sweep`` runs here. Plugins are imported from ``plugins``, and of the baseline's
    recorded ones the files inside the working directory (``recorded_plugins``); all of them with
    ``baseline_plugins``.
    Budgets come from ``budgets`` and from every config involved; growth tolerances from the arguments,
    else the config, else 1 ULP / 10%. Fails closed: a baseline without cells, or a comparison in which no
    cell was compared and nothing failed, raises AuditError (unless ``allow_missing_baseline``: --update).
    """
    baseline = None
    if baseline_path is not None:
        path = summary_path(baseline_path)
        if path.exists() or not allow_missing_baseline:
            baseline = read_audit(path, "baseline")
    if baseline is not None and not baseline.cells and not allow_missing_baseline:
        raise AuditError(f"baseline {baseline.source} has no cells, so nothing can be compared")
    if baseline is not None and not allow_missing_baseline:
        refuse_malformed_audit(baseline, "baseline")  # before any fresh run
    ignored_plugins: tuple[str, ...] = ()
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
            if not baseline_plugins:
                loaded, ignored_plugins = recorded_plugins(run_config.plugins, plugins, baseline.source)
                run_config = run_config.updated(plugins=loaded)
        elif allow_missing_baseline:  # a new baseline: what `ce-audit sweep` runs here
            run_config = load_config(None, {}, search_from=Path.cwd())
        else:
            raise AuditError("nothing to audit: give a BASELINE with its report.json, --current or --config")
        # --plugin adds to the plugins (its [[grids]] too); a blank one (an unset CI variable) is left out
        run_config = run_config.with_plugins(merged(plugins, skip_blank=True))
        try:
            if command == "replay":
                fresh, extra = _rerun_replay(run_config, baseline)
            else:
                fresh = run_sweep(run_config, progress=progress)
        except AuditError as error:
            if not ignored_plugins:
                raise
            raise AuditError(
                f"{error} (the baseline was recorded with --plugin {' '.join(ignored_plugins)}: give them "
                "with --plugin, or --baseline-plugins to load the recorded ones)"
            ) from None
        current = audit_from_result(fresh, f"a fresh {command}", command, extra)

    configs = [run_config] if run_config is not None else []
    if baseline is not None and baseline.report is not None:
        configs.append(_recorded_config(baseline.report, baseline.source))
    if current_path is not None and current.report is not None:
        configs.append(_recorded_config(current.report, current.source))
    budget_texts = merged(budgets, *(config.budgets for config in configs), skip_blank=True)
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
    if baseline is not None and not allow_missing_baseline and not result.compared and result.passed:
        raise AuditError(
            f"nothing was compared: none of the {len(baseline.cells)} baseline cells was measured in "
            f"{current.source} ({len(result.new)} new, {len(result.missing)} missing, the rest not measured)"
        )
    return GateRun(result, baseline, current, fresh, command, extra)


def _rerun_replay(config: SweepConfig, baseline: Audit | None) -> tuple[AuditResult, dict[str, Any]]:
    """The recorded replay run again on the input files its report.json names, for the baseline's dtypes."""
    assert baseline is not None and baseline.report is not None
    inputs = baseline.report.get("inputs") or {}
    if not isinstance(inputs, dict) or not inputs.get("logits") or not inputs.get("targets"):
        raise AuditError(f"report.json beside {baseline.source} records a replay without its input files")
    dtypes = list(dict.fromkeys(cell.dtype for cell in baseline.cells)) or None
    result = run_replay(inputs["logits"], inputs["targets"], config, dtypes=dtypes)
    return result, {"inputs": inputs}


def _version_notes(baseline: Audit | None, current: Audit) -> list[str]:
    if baseline is None or baseline.report is None or current.report is None:
        return []
    before = baseline.report.get("versions") or {}
    now = current.report.get("versions") or {}
    changed = [  # a report.json is a file anyone may edit: its text is printed with escapes shown
        printable(f"{name} {before[name]} → {now[name]}")
        for name in before
        if name in now and before[name] != now[name]
    ]
    return [f"versions differ from the baseline's: {', '.join(changed)}"] if changed else []


def update_baseline(
    run: GateRun, baseline_path: str | Path, target: ReportDirectory | None = None
) -> list[Path]:
    """Rewrite the baseline from the current audit: a directory's summary.csv and report.json as one set
    (``target``: the directory already opened and locked), a named .csv and the report.json beside it
    file by file."""
    path = summary_path(baseline_path)
    if path.suffix.lower() != ".csv":
        raise AuditError(f"baseline {path} must be a .csv file or a directory")
    if path.name == "summary.csv":
        if target is None:
            with ReportDirectory(path.parent) as opened:
                return update_baseline(run, baseline_path, opened)
        if run.fresh is not None:
            written = target.write(run.fresh, run.command, run.extra, run_record=False)
        else:
            text = _read_current_text(run)
            member = ReportFile("summary.csv", lambda staged: write_atomically(staged, text))
            written = target.write_set([member], dict(run.current.report or {}))
        return [Path(name) for name in written]
    report_path = path.with_name("report.json")
    written = []
    if run.fresh is not None:
        written.append(write_report_json(run.fresh, report_path, run.command, run.extra))
        written.append(write_summary_csv(run.fresh.cells, path))
        return written
    if run.current.report is not None:
        document = {k: v for k, v in run.current.report.items() if k not in ("files", "run_id")}
        text = json.dumps(document, indent=1, allow_nan=False) + "\n"
        written.append(write_atomically(report_path, text))
    written.append(write_atomically(path, _read_current_text(run)))
    return written


def _read_current_text(run: GateRun) -> str:
    source = Path(run.current.source)
    try:
        return source.read_text(encoding="utf-8")
    except OSError as error:
        raise AuditError(f"cannot read {source}: {error.strerror or error}") from None

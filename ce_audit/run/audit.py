"""A sweep or a replay as `ce-audit sweep` and `ce-audit replay` run it, from the values the command was
given to its written report.

The config is loaded under the front door's overrides (ce_audit.overrides); the report directory is
created, checked writable and locked before any work; SIGINT and SIGTERM stop the run between units
(ce_audit.run.interruption); the reports and each failing cell's reproducer are written. What the command
prints is its ``show`` callback's (called with the directory still locked and signals still caught);
how it exits is in the returned ``ReportedRun``: 130 / 143 after a signal, else 1 when a cell reaches
the ``--fail-on`` level (ce_audit.verdict.fail_on_verdict), else 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ce_audit import collector
from ce_audit.audit_result import AuditResult
from ce_audit.dtypes import canonical_dtype
from ce_audit.overrides import front_door_config
from ce_audit.replay import run_replay
from ce_audit.reports.bundle import ReportDirectory
from ce_audit.reports.figure_painter import draw_ahead, painter_ahead
from ce_audit.reproducers import ReproducerSink, check_destination
from ce_audit.run.executors import Execution
from ce_audit.run.interruption import Interruption, interruption_of, stop_on_signals
from ce_audit.run.progress import progress_reporter
from ce_audit.run.shards import Shard
from ce_audit.run.sweep import (
    painters_wanted,
    run_sweep,
    start_workers_early,
    sweep_cells,
    workers_forked_early,
)
from ce_audit.verdict import check_fail_level, fail_on_verdict


@dataclass(frozen=True)
class ReportedRun:
    """A run and its written report: the paths written (the reports, then each reproducer's
    command.txt), and how the command ends (``interruption``, else the ``--fail-on`` line, else neither)."""

    result: AuditResult
    paths: list[str]
    command: str  # "sweep" or "replay", as report.json records it
    extra: dict[str, Any] | None = None  # report.json's extra keys (a replay's input files)
    interruption: Interruption | None = None
    fail_on: str | None = None  # the --fail-on verdict line, when a cell reaches the level


Show = Callable[[ReportedRun], None]


def sweep_to_report(
    config_path: str | Path | None,
    overrides: Mapping[str, Any],
    *,
    plugins: Sequence[str] = (),
    fail_on: str | None = None,
    save_failures: Path | None = None,
    execution: Execution | None = None,
    shard: Shard | None = None,
    quiet: bool = False,
    show: Show | None = None,
    search_from: str | Path | None = None,
) -> ReportedRun:
    """Run the sweep of the config (``config_path``, else [tool.ce-audit] from ``search_from``, else the
    built-in default) under ``overrides`` and ``plugins``, with progress on stderr unless ``quiet``, and
    write its report to the config's ``out``."""
    check_fail_level(fail_on)
    execution = execution if execution is not None else Execution()
    config = front_door_config(config_path, overrides, plugins=plugins, search_from=search_from)
    if save_failures is not None:
        check_destination(save_failures)  # before the run, not after it
    sink = ReproducerSink() if save_failures is not None else None
    with (
        ReportDirectory(Path(config.out)) as target,
        stop_on_signals(),  # a signal while the reports are written exits after them
        painter_ahead(painters_wanted(config, shard)),  # report.html's figures drawn beside the audit
    ):
        if sink is None:  # reproducers are collected in this process
            start_workers_early(config, execution, shard)  # their imports while this one counts cells
        total = sweep_cells(config, shard, execution.devices_here)  # imports torch where units need it
        forked = workers_forked_early(config, execution, shard) if sink is None else contextlib.nullcontext()
        with forked, progress_reporter(total, quiet=quiet) as advance:  # forked before progress's thread
            collector.resume()  # the command's start-up is over (ce_audit.collector; the cli's `sweep`)
            rtols = {dtype: tolerance.rtol for dtype, tolerance in config.tolerances.items()}
            result = run_sweep(
                config, progress=advance, execution=execution, shard=shard, reproducers=sink,
                audited=lambda cells: draw_ahead(cells, rtols),  # the figures start before the traces
            )  # fmt: skip
        run = ReportedRun(result, target.write(result, "sweep"), "sweep")
        return _finish(run, Path(config.out), sink, save_failures, fail_on, show)


def replay_to_report(
    logits: Path,
    targets: Path | None,
    overrides: Mapping[str, Any],
    *,
    plugins: Sequence[str] = (),
    fail_on: str | None = None,
    save_failures: Path | None = None,
    logits_key: str | None = None,
    targets_key: str | None = None,
    show: Show | None = None,
    search_from: str | Path | None = None,
) -> ReportedRun:
    """Audit the dumped ``logits`` and ``targets`` (ce_audit.replay.run_replay) in the dtypes of
    ``overrides`` (default: the file's), and write the report, rows.csv included, to the config's ``out``."""
    dtypes = [canonical_dtype(name) for name in overrides["dtypes"]] if overrides.get("dtypes") else None
    check_fail_level(fail_on)
    overrides = {**overrides, "dtypes": dtypes}
    config = front_door_config(None, overrides, plugins=plugins, search_from=search_from)
    extra = {"inputs": {"logits": str(logits), "targets": str(targets if targets is not None else logits)}}
    if save_failures is not None:
        check_destination(save_failures)  # before the run, not after it
    sink = ReproducerSink() if save_failures is not None else None
    with ReportDirectory(Path(config.out)) as target, stop_on_signals():
        result = run_replay(
            logits, targets, config, dtypes=dtypes, logits_key=logits_key, targets_key=targets_key,
            reproducers=sink,
        )  # fmt: skip
        run = ReportedRun(result, target.write(result, "replay", extra), "replay", extra)
        return _finish(run, Path(config.out), sink, save_failures, fail_on, show)


def _finish(
    run: ReportedRun,
    out: Path,
    sink: ReproducerSink | None,
    save_failures: Path | None,
    fail_on: str | None,
    show: Show | None,
) -> ReportedRun:
    """Write the reproducers, show the run, and decide how the command ends (within the lock and the
    signal handling: a signal received while the report was written or shown still counts)."""
    if sink is not None and save_failures is not None:
        written = sink.write(save_failures).values()
        run = replace(run, paths=[*run.paths, *(str(folder / "command.txt") for folder in written)])
    if show is not None:
        show(run)
    interruption = interruption_of(run.result, out)
    if interruption is not None:
        return replace(run, interruption=interruption)
    return replace(run, fail_on=fail_on_verdict(run.result.cells, fail_on))

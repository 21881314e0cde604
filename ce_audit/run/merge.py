"""``ce-audit merge``: the report directories of a sweep's shards (``--shard K/N``) as one report.

The merged summary.csv is byte for byte the one a single run writes: each shard's lines are put back in
the sweep's unit order (report.json records, per shard, which units it ran and how many cells each gave).
The merged report.json equals a single run's apart from ``config.out``; run.json holds the earliest
shard's timestamp and the shards' summed seconds. report.html and its plots are drawn from the merged
cells, and the set is written as one unit (ce_audit.reports.bundle). Each shard is verified first, as the
gate verifies a baseline: every file its report.json lists must have the recorded digest. Shards of
different configs, seeds, package versions or plugin code (``plugin_sha256``), the same shard twice,
overlapping units and missing shards are refused with one line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ce_audit.config import config_from_dict
from ce_audit.errors import AuditError
from ce_audit.printable import plural
from ce_audit.reports.bundle import RUN_NAME, STAGING_PREFIX, ReportDirectory, digest, run_id
from ce_audit.reports.csv import read_cells, summary_text
from ce_audit.reports.files import ReportFile
from ce_audit.reports.html import html_files
from ce_audit.reports.json import json_safe
from ce_audit.run.sweep import case_source
from ce_audit.statuses import message_line
from ce_audit.trace.shown import trace_shown
from ce_audit.verdict_story import verdict_document

# report.json keys that may differ between the shards of one sweep
_PER_RUN_KEYS = frozenset({"shard", "implementations", "cells", "files", "run_id", "units", "verdict"})


def _read_shard(directory: Path) -> tuple[dict[str, Any], list[str], list[list[str]]]:
    """A shard's report.json, its summary.csv header and lines."""
    report_path, summary_path = directory / "report.json", directory / "summary.csv"
    for path in (report_path, summary_path):
        if not path.is_file():
            raise AuditError(f"{directory} is not a report directory (no {path.name})")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        lines = list(csv.reader(io.StringIO(summary_path.read_text(encoding="utf-8"))))
    except RecursionError:
        raise AuditError(f"{report_path} is not a ce-audit report.json (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise AuditError(f"cannot read the report in {directory}: {message_line(error)}") from None
    if not isinstance(report, dict) or not isinstance(report.get("shard"), dict):
        raise AuditError(f"{directory} holds no shard of a sweep (run `ce-audit sweep --shard K/N`)")
    _verify_files(directory, report)
    if report.get("partial"):
        raise AuditError(f"{directory} is a partial report (an interrupted shard): run that shard again")
    shard = report["shard"]
    if not (
        all(isinstance(shard.get(key), int) for key in ("index", "count", "total_units"))
        and isinstance(shard.get("units"), list)
        and all(isinstance(unit, list) and len(unit) == 2 for unit in shard["units"])
    ):
        raise AuditError(f"{directory}/report.json has a malformed shard record")
    if not lines:
        raise AuditError(f"{directory}/summary.csv is empty")
    return report, lines[0], [line for line in lines[1:] if line]


def _verify_files(directory: Path, report: dict[str, Any]) -> None:
    """Fail closed, as the gate does: every file a shard's report.json lists (summary.csv among them) must
    have the digest it records, and the set its run_id; an edited or swapped file is refused."""
    listed = report.get("files")
    if not isinstance(listed, dict) or not isinstance(listed.get("summary.csv"), str):
        raise AuditError(f"{directory}/report.json records no digest of summary.csv: run that shard again")
    if report.get("run_id") != run_id(listed):
        raise AuditError(f"{directory}/report.json: its run_id is not that of the files it lists (edited)")
    for name, recorded in listed.items():
        if recorded is None:
            continue  # a directory (plots/): not digested
        path = directory / str(name)
        if "/" in str(name) or "\\" in str(name) or str(name) in (".", ".."):
            raise AuditError(f"{directory}/report.json lists {name!r}, which is not a file of the directory")
        try:
            found = digest(path) if path.exists() else None
        except OSError as error:
            raise AuditError(f"cannot read {path}: {error.strerror or error}") from None
        if found != recorded:
            why = "is missing" if found is None else "is not the one its report.json describes (edited?)"
            raise AuditError(f"{path} {why}: run that shard again")


def _refuse_other_plugin_code(
    directory: Path, report: dict[str, Any], first_dir: Path, first: dict[str, Any]
) -> None:
    """Shards of one sweep ran the same plugin code: the SHA-256 of each plugin's source must agree."""
    mine, theirs = report.get("plugin_sha256") or {}, first.get("plugin_sha256") or {}
    if not isinstance(mine, dict) or not isinstance(theirs, dict):
        raise AuditError(f"{directory}/report.json has a malformed plugin_sha256 record")
    for spec in sorted(set(mine) | set(theirs)):
        if mine.get(spec) != theirs.get(spec):
            raise AuditError(
                f"{directory} and {first_dir} ran different code for plugin {spec} (its SHA-256 differs): "
                "run every shard with the same plugin files"
            )


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    """What must be equal across the shards of one sweep (the config without its output directory)."""
    same = {key: value for key, value in report.items() if key not in _PER_RUN_KEYS}
    same["config"] = {key: value for key, value in report.get("config", {}).items() if key != "out"}
    return same


def _first_difference(first: dict[str, Any], other: dict[str, Any]) -> str:
    for key in sorted(set(first) | set(other)):
        if first.get(key) != other.get(key):
            if isinstance(first.get(key), dict) and isinstance(other.get(key), dict):
                return f"{key}.{_first_difference(first[key], other[key])}"
            return key
    return "?"


def merge_reports(directories: list[Path], out: Path) -> list[str]:
    """Merge the shard report directories into ``out``; the paths written."""
    if not directories:
        raise AuditError("merge needs the report directories of the shards")
    shards = [(directory, *_read_shard(directory)) for directory in directories]
    first_dir, first_report, header, _ = shards[0]
    count, total = first_report["shard"]["count"], first_report["shard"]["total_units"]
    seen: dict[int, Path] = {}
    owner: dict[int, Path] = {}
    pieces: dict[int, list[list[str]]] = {}
    for directory, report, shard_header, lines in shards:
        shard = report["shard"]
        if report.get("seed") != first_report.get("seed"):
            raise AuditError(
                f"{directory} was run with seed {report.get('seed')}, "
                f"{first_dir} with {first_report.get('seed')}"
            )
        _refuse_other_plugin_code(directory, report, first_dir, first_report)
        if _comparable(report) != _comparable(first_report):
            differ = _first_difference(_comparable(first_report), _comparable(report))
            raise AuditError(f"{directory} and {first_dir} are not shards of one sweep ({differ} differs)")
        if (shard["count"], shard["total_units"]) != (count, total) or shard_header != header:
            first = first_report["shard"]
            raise AuditError(
                f"{directory} is shard {shard['index']}/{shard['count']}, {first_dir} shard "
                f"{first['index']}/{count}: they split the sweep differently"
            )
        if shard["index"] in seen:
            raise AuditError(
                f"shard {shard['index']}/{count} given twice: {seen[shard['index']]} and {directory}"
            )
        seen[shard["index"]] = directory
        position = 0
        for index, cells in shard["units"]:
            if index in owner:
                raise AuditError(f"{directory} and {owner[index]} overlap (both ran unit {index})")
            owner[index] = directory
            pieces[index] = lines[position : position + cells]
            position += cells
        if position != len(lines):
            raise AuditError(
                f"{directory}: summary.csv has {plural(len(lines), 'row')}, "
                f"report.json accounts for {position}"
            )
    missing = [str(k) for k in range(1, count + 1) if k not in seen]
    if missing:
        raise AuditError(
            f"shard {', '.join(f'{k}/{count}' for k in missing)} missing: merge needs all {count}"
        )
    if sorted(owner) != list(range(total)):
        raise AuditError(f"the shards ran {len(owner)} of the sweep's {plural(total, 'unit')}")
    return _write_merged(shards, pieces, header, out)


def _read_run(directory: Path) -> dict[str, Any]:
    """A shard's run.json (timing, host, devices); empty where it has none."""
    try:
        run = json.loads((directory / RUN_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return run if isinstance(run, dict) else {}


def _write_merged(
    shards: list[tuple[Path, dict[str, Any], list[str], list[list[str]]]],
    pieces: dict[int, list[list[str]]],
    header: list[str],
    out: Path,
) -> list[str]:
    ordered = sorted(shards, key=lambda shard: shard[1]["shard"]["index"])
    lines = [line for index in sorted(pieces) for line in pieces[index]]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(lines)
    text = buffer.getvalue()
    described: dict[str, Any] = {}
    for _, report, _, _ in ordered:
        described.update(report.get("implementations", {}))
    impl_column = header.index("impl")
    names = dict.fromkeys(line[impl_column] for line in lines)
    document = {key: value for key, value in ordered[0][1].items() if key not in ("shard", "files", "run_id")}
    document["config"] = {**document["config"], "out": str(out)}
    document["implementations"] = {name: described[name] for name in names if name in described}
    document["cells"] = len(lines)
    total = ordered[0][1]["shard"]["total_units"]
    document["units"] = {"completed": total, "total": total}
    runs = [_read_run(directory) for directory, *_ in ordered]
    devices: dict[str, Any] = {}
    for run in runs:
        devices.update({k: v for k, v in (run.get("devices") or {}).items() if k not in devices})
    stamps = [run["timestamp"] for run in runs if isinstance(run.get("timestamp"), str)]
    seconds = sum(float(run.get("seconds") or 0.0) for run in runs)

    def write_summary(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    def run_record(identity: str) -> dict[str, Any]:
        return {
            "run_id": identity,
            "timestamp": min(stamps) if stamps else None,
            "seconds": round(seconds, 3),
            "merged_from": [str(directory) for directory, *_ in ordered],
            "devices": devices,
        }

    with ReportDirectory(out) as target:
        staged = target.out / f"{STAGING_PREFIX}merged-summary.csv"  # a killed run's is cleaned
        staged.write_text(text, encoding="utf-8")
        try:
            cells = read_cells(staged).cells
        finally:
            staged.unlink(missing_ok=True)
        config = config_from_dict(document["config"])
        shown = trace_shown(cells, config, case_source(config))  # as one run does, on every cell
        if shown != cells:
            cells, text = shown, summary_text(shown)
        document["verdict"] = json_safe(verdict_document(cells))  # the merged cells', not the first shard's
        members = [ReportFile("summary.csv", write_summary), *html_files(cells, document)]
        return target.write_set(members, document, run_record)

"""report.json: what was audited (command, resolved config, seed, versions, reference precision, what each
implementation was, the SHA-256 of each plugin's source in ``plugin_sha256``) — the results themselves
are in summary.csv, listed with a digest in ``files`` by the
report bundle. run.json: what differs between two runs of one audit (timestamp, seconds, host, devices).

Both are small and stable: no timestamp or absolute path in report.json (plugin origins under the working
directory are written relative to it), so a committed baseline diffs only where its results change.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ce_audit.audit_result import AuditResult
from ce_audit.dtypes import reference_precision
from ce_audit.implementations import Implementation
from ce_audit.reports.files import write_atomically
from ce_audit.verdict_story import verdict_document

REPORT_FORMAT = 2  # 2: the rows left to summary.csv; timing and host moved to run.json


def package_versions() -> dict[str, str]:
    """Versions of ce-audit, Python, NumPy, ml_dtypes and torch, read without importing torch."""
    versions = {"python": platform.python_version()}
    for name, dist in (
        ("ce-audit", "ce-audit"),
        ("numpy", "numpy"),
        ("ml_dtypes", "ml_dtypes"),
        ("torch", "torch"),
    ):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def json_safe(value: Any) -> Any:
    """JSON has no NaN or Infinity: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _portable(text: str) -> str:
    """Absolute paths under the working directory inside ``text``, written relative to it."""
    root = os.getcwd().rstrip(os.sep) + os.sep
    return text.replace(root, "") if root != os.sep else text


def _portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its paths (out, plugin files) relative to the working directory where under it."""
    config["out"] = _portable(str(config.get("out", "")))
    config["plugins"] = [_portable(str(plugin)) for plugin in config.get("plugins", ())]
    return config


def implementations(entries: Iterable[Implementation]) -> dict[str, dict[str, Any]]:
    """What each audited name was: backend, built-in or not, origin, the options it supports and (for
    plugins) its source and the adapter settings that differ from the defaults."""
    return {
        entry.name: {
            "backend": entry.backend,
            "builtin": entry.builtin,
            "origin": _portable(entry.origin),
            "supports": sorted(entry.supports),
            **({"source": _portable(entry.extra["source"])} if "source" in entry.extra else {}),
            **({"adapter": entry.adapter.declared()} if entry.adapter is not None else {}),
        }
        for entry in entries
    }


def _source_file(spec: str) -> Path | None:
    """The Python file a plugin spec (a path or a dotted module) was loaded from, where there is one."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
    else:
        module = sys.modules.get(spec)
        path = Path(module.__file__) if module is not None and getattr(module, "__file__", None) else None
    return path if path is not None and path.is_file() else None


def plugin_digests(plugins: Sequence[str], impls: Sequence[str]) -> dict[str, str]:
    """The SHA-256 of the content of each plugin file or module (``--plugin``) and of the module of each
    ``--impl module:attr`` (where it is a source file), by spec: two runs of different plugin code differ
    here, so ``ce-audit merge`` refuses to join their shards."""
    specs = [*plugins, *(impl.split(",")[0].rpartition(":")[0] for impl in impls if ":" in impl)]
    digests = {}
    for spec in dict.fromkeys(spec.strip() for spec in specs if spec.strip()):
        path = _source_file(spec)
        if path is not None:
            digests[_portable(spec)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def report_document(result: AuditResult, command: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    document = {
        "format": REPORT_FORMAT,
        "command": command,
        "seed": result.config.seed,
        "config": _portable_config(result.config.to_dict()),
        "versions": package_versions(),
        "reference_precision": reference_precision(),
        "partial": result.partial,  # stopped early (interrupted): the rows are the completed units'
        "units": {"completed": result.units_done, "total": result.units_total},
        **({"interrupted": result.interrupted} if result.interrupted else {}),
        "implementations": implementations(result.implementations),
        "cells": len(result.cells),
        "verdict": verdict_document(result.summary_cells),
    }
    plugins = plugin_digests(result.config.plugins, result.config.impls)
    if plugins:  # only where plugins ran: a report of built-ins alone stays as it was
        document["plugin_sha256"] = plugins
    if result.shard is not None:
        document["shard"] = result.shard
    document.update(extra or {})
    return json_safe(document)


def stdout_document(result: AuditResult, command: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``--format json``: the report.json document plus ``rows``, every cell as summary.csv holds it."""
    from ce_audit.results import cell_columns

    rows = json_safe([cell_columns(cell) for cell in result.summary_cells])
    return {**report_document(result, command, extra), "rows": rows}


def run_document(result: AuditResult, run_id: str) -> dict[str, Any]:
    """run.json: when, how long, where (host and device names); the run_id of the set it belongs to."""
    return json_safe(
        {
            "run_id": run_id,
            "timestamp": dt.datetime.fromtimestamp(result.started, dt.UTC).isoformat(),
            "seconds": round(result.seconds, 3),
            "host": {"node": platform.node(), "machine": platform.machine(), "system": platform.system()},
            "devices": result.devices,
        }
    )


def write_report_json(
    result: AuditResult, path: str | Path, command: str, extra: dict[str, Any] | None = None
) -> Path:
    """report.json alone (no ``files`` digests: the report bundle writes the checked set)."""
    text = json.dumps(report_document(result, command, extra), indent=1, allow_nan=False) + "\n"
    return write_atomically(path, text)

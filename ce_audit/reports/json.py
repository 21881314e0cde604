"""report.json: resolved config, seed, versions, device names, timestamp and every summary row."""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from ce_audit.dtypes import reference_precision
from ce_audit.implementations import REGISTRY
from ce_audit.reports.files import write_atomically
from ce_audit.results import CELL_COLUMNS, AuditResult

REPORT_FORMAT = 1


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


def _plain(value: Any) -> Any:
    """JSON has no NaN or Infinity: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def implementations(rows: list[Any]) -> dict[str, dict[str, Any]]:
    """What each audited name was: backend, built-in or not, origin and (for plugins) its source."""
    described = {}
    for name in dict.fromkeys(row.impl for row in rows):
        entry = REGISTRY.get(name)
        if entry is not None:
            described[name] = {
                "backend": entry.backend,
                "builtin": entry.builtin,
                "origin": entry.origin,
                **({"source": entry.extra["source"]} if "source" in entry.extra else {}),
            }
    return described


def report_document(result: AuditResult, command: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    document = {
        "format": REPORT_FORMAT,
        "command": command,
        "timestamp": dt.datetime.fromtimestamp(result.started, dt.UTC).isoformat(),
        "seconds": round(result.seconds, 3),
        "seed": result.config.seed,
        "config": result.config.to_dict(),
        "versions": package_versions(),
        "devices": result.devices,
        "reference_precision": reference_precision(),
        "partial": result.partial,  # stopped early (interrupted): the rows are the completed units'
        "units": {"completed": result.units_done, "total": result.units_total},
        **({"interrupted": result.interrupted} if result.interrupted else {}),
        "implementations": implementations(result.cells),
        "rows": [{name: getattr(cell, name) for name in CELL_COLUMNS} for cell in result.cells],
    }
    document.update(extra or {})
    return _plain(document)


def write_report_json(
    result: AuditResult, path: str | Path, command: str, extra: dict[str, Any] | None = None
) -> Path:
    text = json.dumps(report_document(result, command, extra), indent=2, allow_nan=False) + "\n"
    return write_atomically(path, text)

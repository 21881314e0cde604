"""The report directory of one audit, written as one unit.

Every file of a run (summary.csv, rows.csv for a replay or when rows were kept, report.html and its plots/,
then report.json) is written into a staging directory inside ``--out`` and moved in only when all of them
were written; a failed write leaves the previous run's set as it was. report.json is moved in last and
records a digest of every file of its set (``files``) and a ``run_id`` derived from them, so a reader can
tell a summary.csv of another run (``check_member``). Files of an older run that this run does not write
are removed. A lock (fcntl.flock on the directory itself) refuses a second run into the same directory; the
staging directories and temporary files of killed runs are removed when the next run takes the lock.

``run.json`` holds what differs between two runs of the same audit (timestamp, seconds, host, devices):
it is not part of the compared set and not digested, so a baseline directory diffs only where results do.

To add a report file: a ``ReportFile(name, write)`` in ``report_files`` (``write(path)`` creates the file or
directory ``path``); it is staged, moved in and digested with the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ce_audit.audit_result import AuditResult
from ce_audit.errors import AuditError
from ce_audit.reports.files import ReportFile

STAGING_PREFIX = ".ce-audit-staging-"
REPORT_NAME = "report.json"
RUN_NAME = "run.json"
# Files an older version wrote without listing them in report.json's "files", and run.json (never listed):
# removed when this run does not rewrite them.
LEGACY_NAMES = ("summary.csv", "rows.csv", RUN_NAME)


def report_files(result: AuditResult, document: dict[str, Any] | None = None) -> list[ReportFile]:
    """The files every audit writes beside report.json (the extension point for new report formats);
    ``document`` is the report.json content that the HTML page shows."""
    from ce_audit.reports.csv import write_rows_csv, write_summary_csv
    from ce_audit.reports.html import html_files

    files = [ReportFile("summary.csv", lambda path: write_summary_csv(result.summary_cells, path))]
    if result.row_results or (document or {}).get("command") == "replay":  # a replay's always
        files.append(ReportFile("rows.csv", lambda path: write_rows_csv(result.row_results, path)))
    return [*files, *html_files(result.summary_cells, document)]


def digest(path: Path) -> str | None:
    """The first 16 hex digits of the SHA-256 of a file's bytes; None for a directory."""
    if path.is_dir():
        return None
    sha = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def run_id(files: dict[str, str | None]) -> str:
    """The identity of a report set: a digest of its members' names and digests (the same results give
    the same id, so a rewritten baseline does not change where nothing changed)."""
    text = json.dumps(files, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class ReportDirectory:
    """``--out`` held for one run: created, checked writable and locked on entry (before any work), so a
    run that could not write its reports, or a second run into the same directory, stops at once."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self._lock: int | None = None
        self._created: list[Path] = []  # the directories open() made, deepest first

    def __enter__(self) -> ReportDirectory:
        self.open()
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        self.close()
        if kind is not None:  # the run failed before writing: leave no empty directory behind
            self._remove_created()

    def _remove_created(self) -> None:
        for made in self._created:
            try:
                made.rmdir()
            except OSError:
                break

    def open(self) -> None:
        import fcntl

        out = self.out
        if out.exists() and not out.is_dir():
            raise AuditError(f"cannot write reports to {out}: it is a file, not a directory")
        missing = [p for p in (out, *out.parents) if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AuditError(f"cannot write reports to {out}: {_reason(error)}") from None
        self._created = missing
        try:
            handle = os.open(out, os.O_RDONLY)
        except OSError as error:
            raise AuditError(f"cannot open report directory {out}: {_reason(error)}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(handle)
            raise AuditError(
                f"another ce-audit run is writing to {out}; wait for it or give another --out"
            ) from None
        self._lock = handle
        self._clean_stale()
        for name in (*LEGACY_NAMES, REPORT_NAME):
            if (out / name).is_dir() and not (out / name).is_symlink():
                self.close()
                raise AuditError(f"cannot write {out / name}: it is a directory")
        try:  # writable: a probe file created and removed
            with tempfile.NamedTemporaryFile(prefix=STAGING_PREFIX, suffix=".probe", dir=out):
                pass
        except OSError as error:
            self.close()
            self._remove_created()
            raise AuditError(f"cannot write to report directory {out}: {_reason(error)}") from None

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def _clean_stale(self) -> None:
        """Staging directories and temporary files left by killed runs (the lock says none is running)."""
        for entry in self.out.iterdir():
            name = entry.name
            if name.startswith(STAGING_PREFIX) or (name.startswith(".") and name.endswith(".tmp")):
                _remove(entry)

    def _previous_files(self) -> list[str]:
        """The members of the set already here: report.json's list, else the names older versions wrote."""
        names = list(LEGACY_NAMES)
        try:
            document = json.loads((self.out / REPORT_NAME).read_text(encoding="utf-8"))
            listed = document.get("files") if isinstance(document, dict) else None
            if isinstance(listed, dict):
                names += [name for name in listed if isinstance(name, str)]
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            pass
        return [name for name in dict.fromkeys(names) if _plain_name(name)]

    def write(
        self,
        result: AuditResult,
        command: str,
        extra: dict[str, Any] | None = None,
        files: Sequence[ReportFile] | None = None,
        run_record: bool = True,
    ) -> list[str]:
        """Write the run's set and move it in; the paths of its files (report.json last). ``run_record``:
        also write run.json (timing and host; a baseline leaves it out)."""
        from ce_audit.reports.json import report_document, run_document

        document = report_document(result, command, extra)
        members = list(report_files(result, document) if files is None else files)
        return self.write_set(
            members,
            document,
            (lambda identity: run_document(result, identity)) if run_record else None,
        )

    def write_set(
        self,
        members: Sequence[ReportFile],
        document: dict[str, Any],
        run_record: Callable[[str], dict[str, Any]] | None = None,
    ) -> list[str]:
        """Stage ``members``, then report.json (``document`` with the members' digests and run_id) and
        run.json (``run_record(run_id)``, if given), and move the set in; the paths of its files."""
        if self._lock is None:
            raise RuntimeError("ReportDirectory.write outside its with block")
        names = [member.name for member in members]
        if len(set(names)) != len(names) or not all(map(_plain_name, names)) or REPORT_NAME in names:
            raise ValueError(f"report file names must be distinct plain names: {names}")
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
        except OSError as error:
            raise AuditError(f"cannot write to report directory {self.out}: {_reason(error)}") from None
        try:
            for member in members:
                member.write(staging / member.name)
            recorded = {name: digest(staging / name) for name in names}
            document = {**document, "files": recorded, "run_id": run_id(recorded)}
            _write_json(staging / REPORT_NAME, document)
            moved = names
            if run_record is not None:
                _write_json(staging / RUN_NAME, run_record(document["run_id"]))
                moved = [*names, RUN_NAME]
            self._move_in(staging, moved)
        except OSError as error:
            raise AuditError(f"cannot write reports to {self.out}: {_reason(error)}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        files = [name for name in names if recorded[name] is not None]  # directories (plots/) aside
        return [str(self.out / name) for name in [*files, REPORT_NAME]]

    def _move_in(self, staging: Path, names: list[str]) -> None:
        """Replace the old set by the staged one: the old report.json goes first (an interrupted move
        leaves files that no report.json vouches for), then the files, then the new report.json."""
        previous = self._previous_files()
        (self.out / REPORT_NAME).unlink(missing_ok=True)
        for name in previous:
            if name not in names:
                _remove(self.out / name)
        for name in names:
            target = self.out / name
            if (staging / name).is_dir() and target.exists():
                _remove(target)
            os.replace(staging / name, target)
        os.replace(staging / REPORT_NAME, self.out / REPORT_NAME)
        _sync_directory(self.out)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def _sync_directory(path: Path) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_reports(
    result: AuditResult,
    out: str | Path,
    command: str,
    extra: dict[str, Any] | None = None,
    files: Sequence[ReportFile] | None = None,
) -> list[str]:
    """Write the audit's report set into ``out`` as one unit (taking the directory's lock for the write);
    the paths of its files."""
    with ReportDirectory(out) as target:
        return target.write(result, command, extra, files)


def check_member(summary: Path, document: dict[str, Any] | None) -> None:
    """A summary.csv must be the one its report.json describes: same digest (when report.json lists it)."""
    if document is None:
        return
    listed = document.get("files")
    if not isinstance(listed, dict) or summary.name not in listed:
        if isinstance(listed, dict):
            raise AuditError(f"{summary} is not part of the report set its report.json describes")
        return  # written by a version that did not record its files
    try:
        found = digest(summary)
    except OSError as error:
        raise AuditError(f"cannot read {summary}: {_reason(error)}") from None
    if found != listed[summary.name]:
        raise AuditError(
            f"{summary} is not the one report.json beside it describes (another run's, or edited): "
            f"rerun the audit or --update the baseline"
        )

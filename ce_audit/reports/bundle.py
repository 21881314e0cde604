"""The report directory of one audit, written as one unit.

Every file of a run (summary.csv, rows.csv for a replay or when rows were kept, report.html and its plots/,
then report.json) is written into a staging directory inside ``--out`` and moved in only when all of them
were written; a failed write leaves the previous run's set as it was. report.json is moved in last and
records a digest of every file of its set (``files``) and a ``run_id`` derived from them, so a reader can
tell a summary.csv of another run (``check_member``). Files of an older run that this run does not write
are removed. A lock (fcntl.flock on the directory itself) refuses a second run into the same directory; the
staging directories and temporary files of killed runs are removed when the next run takes the lock.

What a set may replace or remove is this version's own list (``MEMBER_FILES``, and in ``MEMBER_FOLDERS`` the
entries it writes there), never a name read from a file: a report.json from elsewhere names nothing that is
removed. Nothing is written or removed through a symbolic link: a link named as a member is replaced or
removed as a link, and a member folder (plots/) that is a link is refused before any work.

``run.json`` holds what differs between two runs of the same audit (timestamp, seconds, host, devices):
it is not part of the compared set and not digested, so a baseline directory diffs only where results do.

To add a report file: a ``ReportFile(name, write)`` in ``report_files`` (``write(path)`` creates the file or
directory ``path``), its name in ``MEMBER_FILES`` (or ``MEMBER_FOLDERS``, with the entries it writes there);
it is staged, moved in and digested with the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ce_audit.audit_result import AuditResult
from ce_audit.errors import AuditError
from ce_audit.reports.files import ReportFile
from ce_audit.reports.plots import is_figure_name

STAGING_PREFIX = ".ce-audit-staging-"
REPORT_NAME = "report.json"
RUN_NAME = "run.json"
# What this version writes into a report directory: the only names a set replaces or removes.
MEMBER_FILES = ("summary.csv", "rows.csv", "report.html", RUN_NAME, REPORT_NAME)
# Folders of the set, and which of their entries this version writes (the others are never touched).
MEMBER_FOLDERS: dict[str, Callable[[str], bool]] = {"plots": is_figure_name}
# Temporary files of this version's writers (files.write_bytes_atomically) that a killed run leaves.
_TEMPORARY = re.compile(r"\.(?:" + "|".join(map(re.escape, MEMBER_FILES)) + r")\.\w+\.tmp")
# The lock descriptors this process holds: a forked child closes its copies (a flock is shared by every
# descriptor of the open file, so a child of a plugin would otherwise keep the directory locked).
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for handle in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(handle)  # this copy only: the parent's lock stays
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def report_files(result: AuditResult, document: dict[str, Any] | None = None) -> list[ReportFile]:
    """The files every audit writes beside report.json (the extension point for new report formats);
    ``document`` is the report.json content that the HTML page shows."""
    from ce_audit.reports.csv import write_rows_csv, write_summary_csv
    from ce_audit.reports.html import html_files

    summary = result.summary_cells  # already to the file's significant digits
    files = [ReportFile("summary.csv", lambda path: write_summary_csv(summary, path, rounded=True))]
    if result.row_results or (document or {}).get("command") == "replay":  # a replay's always
        files.append(ReportFile("rows.csv", lambda path: write_rows_csv(result.row_results, path)))
    return [*files, *html_files(summary, document)]


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


def _is_folder(path: Path) -> bool:
    """A real directory (not a symbolic link to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove(path: Path) -> None:
    """A file, or a link as a link; a directory with everything in it (only for ce-audit's own staging)."""
    if _is_folder(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_member(out: Path, name: str, keep: Callable[[str], bool] = lambda entry: False) -> None:
    """Remove a member of the set in ``out``: a file (a link as a link), or of a member folder the entries
    this version writes there (but those ``keep`` names), then the folder if nothing else is in it."""
    path = out / name
    if name not in MEMBER_FOLDERS:
        if not _is_folder(path):
            path.unlink(missing_ok=True)
        return
    if not _is_folder(path):
        return  # a link or a file of that name is not a folder this version wrote
    for entry in os.listdir(path):
        if MEMBER_FOLDERS[name](entry) and not keep(entry) and not _is_folder(path / entry):
            (path / entry).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()  # fails where other files are in it: not ours to remove


def _check_member_paths(out: Path) -> None:
    """Members must be replaceable without writing through a link: a member file's name may not be a
    directory, a member folder's name may be only a real directory."""
    for name in MEMBER_FILES:
        if _is_folder(out / name):
            raise AuditError(f"cannot write {out / name}: it is a directory")
    for name in MEMBER_FOLDERS:
        path = out / name
        if path.is_symlink():
            raise AuditError(
                f"cannot write {path}: it is a symbolic link (ce-audit writes only inside {out}); "
                "remove it or give another directory"
            )
        if os.path.lexists(path) and not _is_folder(path):
            raise AuditError(f"cannot write {path}: it is a file, not a directory")


class ReportDirectory:
    """``--out`` held for one run: created, checked writable and locked on entry (before any work), so a
    run that could not write its reports, or a second run into the same directory, stops at once."""

    def __init__(self, out: str | Path, create: bool = True) -> None:
        self.out = Path(out)
        self.create = create  # False: the directory must exist (a set rewritten in place)
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
        if not self.create and not out.is_dir():
            raise AuditError(f"report directory {out} does not exist")
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
        _HELD_LOCKS.add(handle)
        try:
            _check_member_paths(out)
        except AuditError:
            self.close()
            self._remove_created()
            raise
        self._clean_stale()
        try:  # writable: a probe file created and removed
            with tempfile.NamedTemporaryFile(prefix=STAGING_PREFIX, suffix=".probe", dir=out):
                pass
        except OSError as error:
            self.close()
            self._remove_created()
            raise AuditError(f"cannot write to report directory {out}: {_reason(error)}") from None

    def close(self) -> None:
        if self._lock is not None:
            _HELD_LOCKS.discard(self._lock)
            os.close(self._lock)  # releases the flock
            self._lock = None

    def _clean_stale(self) -> None:
        """Staging directories and temporary files left by killed runs (the lock says none is running): only
        the names this version's writers give them."""
        for entry in self.out.iterdir():
            if entry.name.startswith(STAGING_PREFIX) or _TEMPORARY.fullmatch(entry.name):
                _remove(entry)

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
        _check_names(names)
        staging = self._staging()
        try:
            for member in members:
                _stage(member, staging)
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

    def _staging(self) -> Path:
        """A fresh staging folder inside the directory (removed by the caller)."""
        try:
            return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out))
        except OSError as error:
            raise AuditError(f"cannot write to report directory {self.out}: {_reason(error)}") from None

    def rewrite_members(self, members: Sequence[ReportFile], document: dict[str, Any] | None) -> list[Path]:
        """Replace some members of the set in place (``ce-audit report``: the page and its figures) and
        leave the others; a member folder not among them loses its figures. ``document`` is the set's
        report.json (None: there is none): its ``files`` and ``run_id``, and run.json's ``run_id``, follow
        the new members. The paths written (a folder's files, in name order)."""
        if self._lock is None:
            raise RuntimeError("ReportDirectory.rewrite_members outside its with block")
        names = [member.name for member in members]
        _check_names(names)
        dropped = [name for name in MEMBER_FOLDERS if name not in names]
        staging = self._staging()
        try:
            for member in members:
                _stage(member, staging)
            moved = list(names)
            listed = (document or {}).get("files")
            if isinstance(listed, dict):  # format 1 (no digests) is left as it is
                files = {name: value for name, value in listed.items() if name not in dropped}
                files.update({name: digest(staging / name) for name in names})
                identity = run_id(files)
                _write_json(staging / REPORT_NAME, {**(document or {}), "files": files, "run_id": identity})
                record = _read_object(self.out / RUN_NAME)
                if record is not None and record.get("run_id") == (document or {}).get("run_id") != identity:
                    _write_json(staging / RUN_NAME, {**record, "run_id": identity})
                    moved.append(RUN_NAME)
            written = [
                self.out / name / entry if name in MEMBER_FOLDERS else self.out / name
                for name in names
                for entry in (sorted(os.listdir(staging / name)) if name in MEMBER_FOLDERS else [""])
            ]
            self._move_in(staging, moved, removed=dropped)
        except OSError as error:
            raise AuditError(f"cannot write reports to {self.out}: {_reason(error)}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return written

    def _move_in(self, staging: Path, names: list[str], removed: Sequence[str] | None = None) -> None:
        """Replace the old set by the staged one: the old report.json goes first (an interrupted move
        leaves files that no report.json vouches for), then the members this version writes that the new
        set lacks (``removed``; default: all of them), then the files, then the new report.json (when
        staged)."""
        _check_member_paths(self.out)  # nothing was turned into a link meanwhile
        if (staging / REPORT_NAME).exists():
            (self.out / REPORT_NAME).unlink(missing_ok=True)
        if removed is None:
            removed = [name for name in (*MEMBER_FILES, *MEMBER_FOLDERS) if name not in names]
        for name in removed:
            if name != REPORT_NAME:
                _remove_member(self.out, name)
        for name in names:
            target = self.out / name
            if name in MEMBER_FOLDERS and _is_folder(target):
                staged = set(os.listdir(staging / name))
                _remove_member(self.out, name, keep=staged.__contains__)  # the old set's other figures
                for entry in sorted(staged):
                    os.replace(staging / name / entry, target / entry)
            else:
                os.replace(staging / name, target)
        if (staging / REPORT_NAME).exists():
            os.replace(staging / REPORT_NAME, self.out / REPORT_NAME)  # last: it vouches for the rest
        _sync_directory(self.out)


def _check_names(names: list[str]) -> None:
    """Members are distinct and declared (what this version writes is what a later run may remove)."""
    known = (*MEMBER_FILES, *MEMBER_FOLDERS)
    if len(set(names)) != len(names) or any(n not in known or n in (REPORT_NAME, RUN_NAME) for n in names):
        raise ValueError(f"report members must be distinct names of MEMBER_FILES or MEMBER_FOLDERS: {names}")


def _stage(member: ReportFile, staging: Path) -> None:
    """Write one member into the staging directory; a folder may hold only the entries declared for it."""
    member.write(staging / member.name)
    if member.name in MEMBER_FOLDERS:
        if not _is_folder(staging / member.name):
            raise ValueError(f"report member {member.name} must be written as a folder")
        for entry in os.listdir(staging / member.name):
            if not MEMBER_FOLDERS[member.name](entry):
                raise ValueError(f"{member.name}/{entry} is not an entry declared in MEMBER_FOLDERS")


def _read_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file; None where there is none (missing, unreadable, not an object)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


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

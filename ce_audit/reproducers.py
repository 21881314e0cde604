"""Failing inputs saved as reproducers: for each failing cell, its worst rows and the replay command.

While a cell is scored, ``WorstRows`` keeps its k worst rows (the largest loss error in ULPs; a non-finite
value where the exact loss is finite, a finite one where it is infinite, or a non-finite gradient row
counts as infinitely bad) in O(k·V) memory. A reduction (or a 0-d mean) has no per-row error: its whole
batch is the reproducer, when it holds at most ``WHOLE_BATCH_LIMIT`` values. ``ReproducerSink.write``
puts each failing cell's rows in a folder of their own:

    logits.npy, targets.npy   the rows in the audited dtype (bfloat16 as float32, which holds it exactly)
    logits.pt, targets.pt     the same as tensors of the audited dtype (when torch is installed)
    command.txt               the `ce-audit replay` command that shows the failure again, and the rows

``check_destination`` refuses, before the sweep, a destination that is a file, cannot be written, or holds a
symbolic link in place of a reproducer folder. Each folder is written into a staging directory beside it and
renamed into place, so a failed write (a full disk) leaves no half folder; an earlier run's folder of the same
name has its files replaced as files (a link among them is replaced, never written through).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ce_audit.dtypes import FORMATS
from ce_audit.errors import AuditError
from ce_audit.options import LOSS_OPTION_SPECS, LossOptions
from ce_audit.results import Cell
from ce_audit.statuses import FAILING, Status

DEFAULT_ROWS = 8
WHOLE_BATCH_LIMIT = 1 << 24  # values (logits) of a reduction's batch saved whole
# What a reproducer folder holds: the only names a later run replaces there.
REPRODUCER_FILES = ("logits.npy", "targets.npy", "logits.pt", "targets.pt", "command.txt")
FOLDER_NAME = re.compile(r"\d{3,}-[A-Za-z0-9_.+\-]+")  # _folder_name's
STAGING_PREFIX = ".ce-audit-staging-"


def row_badness(errors: Any, grad: np.ndarray | None = None) -> np.ndarray:
    """How bad each row's result is: its loss error in ULPs, +inf where the value is wrongly non-finite
    (or finite where the exact loss is infinite) or the gradient row holds NaN or ±inf."""
    ulps = np.nan_to_num(np.asarray(errors.ulp_err, dtype=np.float64), nan=0.0, posinf=np.inf)
    wrong = np.asarray(errors.nonfinite_mismatch) | np.asarray(errors.finite_where_infinite)
    if grad is not None and grad.ndim == 2 and grad.shape[0] == ulps.shape[0]:
        wrong = wrong | ~np.isfinite(grad).all(axis=1)
    return np.where(wrong, np.inf, ulps)


@dataclass
class WorstRows:
    """The ``k`` worst rows of one cell seen so far: their row numbers, badness, logits and targets."""

    k: int = DEFAULT_ROWS
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    badness: np.ndarray = field(default_factory=lambda: np.zeros(0))
    logits: np.ndarray | None = None
    targets: np.ndarray | None = None
    whole: bool = False  # the rows are a reduction's whole batch

    def offer(self, rows: np.ndarray, badness: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        """Rows of one block (their numbers, badness, logits, targets): keep the k worst of all seen."""
        if not rows.size:
            return
        take = np.argsort(-badness, kind="stable")[: self.k]  # only the block's k worst are copied
        rows, badness = np.concatenate([self.rows, rows[take]]), np.concatenate([self.badness, badness[take]])
        logits_new, targets_new = logits[take], targets[take]
        if self.logits is not None and self.targets is not None:
            logits_new = np.concatenate([self.logits, logits_new])
            targets_new = np.concatenate([self.targets, targets_new])
        keep = np.argsort(-badness, kind="stable")[: self.k]
        keep = keep[np.argsort(rows[keep], kind="stable")]  # in row order
        self.rows, self.badness = rows[keep], badness[keep]
        self.logits, self.targets = logits_new[keep], targets_new[keep]

    def offer_batch(self, logits: np.ndarray, targets: np.ndarray, badness: float) -> None:
        """A reduction's whole batch (kept when small enough)."""
        if logits.size <= WHOLE_BATCH_LIMIT:
            self.rows = np.arange(logits.shape[0])
            self.badness = np.full(logits.shape[0], badness)
            self.logits, self.targets, self.whole = logits.copy(), targets.copy(), True

    def offer_error(self, first_row: int, logits: np.ndarray, targets: np.ndarray, reduced: bool) -> None:
        """A call that raised: any rows show it; the first k of the block (a reduction: the batch)."""
        if self.logits is not None:
            return
        if reduced:
            self.offer_batch(logits, targets, np.inf)
        else:
            count = min(self.k, logits.shape[0])
            self.offer(first_row + np.arange(count), np.full(count, np.inf), logits[:count], targets[:count])


@dataclass(frozen=True)
class Reproducer:
    """One failing cell and the rows that show it."""

    cell: Cell
    rows: WorstRows
    implementation: Any  # ce_audit.implementations.Implementation
    options: LossOptions
    seed: int


def cell_fails(cell: Cell) -> bool:
    """A loss status that fails, or a gradient that is non-finite or raised."""
    return cell.status in FAILING or cell.grad_status in (Status.NONFINITE, Status.ERROR)


def _plugin_flags(implementation: Any) -> list[str]:
    """What `ce-audit replay` needs to load the implementation again: its plugin file or module (built-ins,
    module:function specs and entry points need nothing)."""
    origin = implementation.origin or ""
    from_spec = ":" in implementation.extra.get("spec", implementation.name)
    if implementation.builtin or from_spec or not origin.startswith("plugin "):
        return []
    return [] if origin == "plugin file" else ["--plugin", origin.removeprefix("plugin ")]


def _impl_spec(implementation: Any) -> str:
    """The --impl value: the registry name, or module:function for a function registered by check()."""
    if implementation.extra.get("spec"):
        return implementation.extra["spec"]  # the --impl spec it came from (it may go by a name= of its own)
    if implementation.builtin or ":" in implementation.name or implementation.origin.startswith("plugin "):
        return implementation.name
    function = implementation.target if callable(implementation.target) else None
    module = getattr(function, "__module__", "") or ""
    qualname = getattr(function, "__qualname__", "") or ""
    if module and module != "__main__" and "<" not in qualname and not module.startswith("ce_audit_plugin_"):
        return f"{module}:{qualname}"
    return implementation.name


def option_flags(options: LossOptions, seed: int) -> list[str]:
    """Replay flags of the loss options that differ from the default (rows already ignored and masks
    already applied are in the saved files; weights are drawn again from the seed)."""
    flags: list[str] = []
    defaults = LossOptions()
    for spec in LOSS_OPTION_SPECS:
        if not spec.replay or spec.name in ("ignore_fraction", "mask_fraction"):
            continue
        value = getattr(options, spec.name)
        if value != getattr(defaults, spec.name):
            flags += [spec.flag, "none" if value is None else str(value)]  # str(float) is repr: exact
    if options.weights != "none":
        flags += ["--seed", str(seed)]
    return flags


def replay_command(folder: Path, reproducer: Reproducer) -> list[str]:
    """The `ce-audit replay` command line that audits this cell on its saved rows."""
    cell = reproducer.cell
    command = ["ce-audit", "replay", str(folder / "logits.npy"), str(folder / "targets.npy")]
    command += ["--impl", _impl_spec(reproducer.implementation), *_plugin_flags(reproducer.implementation)]
    command += ["--dtype", cell.dtype, "--device", cell.device]
    return command + option_flags(reproducer.options, reproducer.seed)


def _folder_name(index: int, cell: Cell) -> str:
    text = f"{index:03d}-{cell.impl}-{cell.dtype}-{cell.device}-{cell.distribution}-scale{cell.scale:g}"
    return re.sub(r"[^A-Za-z0-9_.+\-]", "_", text)


class ReproducerSink:
    """Collects the failing cells' worst rows during an audit; ``write`` saves them."""

    def __init__(self, rows: int = DEFAULT_ROWS) -> None:
        self.rows = rows
        self.found: list[Reproducer] = []

    def tracker(self) -> WorstRows:
        return WorstRows(self.rows)

    def add(self, cell: Cell, rows: WorstRows, implementation: Any, options: LossOptions, seed: int) -> None:
        if cell_fails(cell) and rows.logits is not None and options.family not in ("binary", "linear_ce"):
            self.found.append(Reproducer(cell, rows, implementation, options, seed))

    def write(self, directory: str | Path) -> dict[Cell, Path]:
        """One folder per failing cell under ``directory``; the folder of each cell. A folder is written
        whole or not at all; a failed write raises AuditError."""
        directory = Path(directory)
        check_destination(directory)
        written: dict[Cell, Path] = {}
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for index, reproducer in enumerate(self.found):
                folder = directory / _folder_name(index, reproducer.cell)
                _write_folder(folder, reproducer)
                written[reproducer.cell] = folder
        except OSError as error:
            raise AuditError(f"cannot save reproducers to {directory}: {error.strerror or error}") from None
        return written


def check_destination(directory: str | Path) -> None:
    """``--save-failures DIR`` before any work: a directory (or one that can be made) this user can write
    in, holding no symbolic link where a reproducer folder goes; AuditError otherwise."""
    directory = Path(directory)
    where = f"cannot save reproducers to {directory}"
    if directory.exists() and not directory.is_dir():
        raise AuditError(f"{where}: it is a file, not a directory")
    existing = next((path for path in (directory, *directory.parents) if path.exists()), directory)
    if not existing.is_dir():
        raise AuditError(f"{where}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AuditError(f"{where}: {existing} is not writable")
    if existing == directory:
        with os.scandir(directory) as entries:
            links = sorted(e.name for e in entries if FOLDER_NAME.fullmatch(e.name) and e.is_symlink())
        if links:
            raise AuditError(
                f"{where}: {links[0]} there is a symbolic link (reproducers are written only inside "
                f"{directory}); remove it or give another directory"
            )


def _write_folder(folder: Path, reproducer: Reproducer) -> None:
    """Write the reproducer in a staging directory beside ``folder``, then move it in: renamed whole, or
    into an earlier run's real folder file by file (its other files left as they are)."""
    staging = folder.parent / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
    staging.mkdir()  # a new name (never an existing one), with the umask's mode: an ordinary folder
    try:
        _save_arrays(staging, reproducer)
        _write_command(staging, folder, reproducer)
        if folder.is_symlink() or (os.path.lexists(folder) and not folder.is_dir()):
            kind = "a symbolic link" if folder.is_symlink() else "a file"
            raise AuditError(f"cannot save reproducers to {folder}: it is {kind}")
        if not os.path.lexists(folder):
            os.replace(staging, folder)
            return
        staged = os.listdir(staging)
        for name in REPRODUCER_FILES:
            if name not in staged and not (folder / name).is_dir():
                (folder / name).unlink(missing_ok=True)  # a link as a link
        for name in staged:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_arrays(folder: Path, reproducer: Reproducer) -> None:
    rows = reproducer.rows
    assert rows.logits is not None and rows.targets is not None
    logits, targets = rows.logits, rows.targets
    stored = logits.astype(np.float32) if logits.dtype == FORMATS["bfloat16"].numpy_dtype else logits
    np.save(folder / "logits.npy", stored)
    np.save(folder / "targets.npy", targets.astype(np.float32) if targets.dtype.kind == "f" else targets)
    try:
        import torch
    except ImportError:
        return
    tensor = torch.from_numpy(np.ascontiguousarray(stored))
    if logits.dtype == FORMATS["bfloat16"].numpy_dtype:
        tensor = tensor.to(torch.bfloat16)
    torch.save(tensor, folder / "logits.pt")
    torch.save(torch.from_numpy(np.ascontiguousarray(targets)), folder / "targets.pt")


def _write_command(staging: Path, folder: Path, reproducer: Reproducer) -> None:
    """command.txt in ``staging``, naming the files where they will be: in ``folder``."""
    cell, rows = reproducer.cell, reproducer.rows
    command = shlex.join(replay_command(folder, reproducer))
    what = "the whole batch (a reduction)" if rows.whole else f"its {rows.rows.size} worst rows"
    lines = [
        f"# {cell.impl} {cell.dtype} {cell.device}: loss {cell.status}, gradient {cell.grad_status}",
        f"# case: {cell.distribution} scale={cell.scale:g} offset={cell.offset:g} vocab={cell.vocab} "
        f"batch={cell.batch} seed={cell.seed}; saved: {what}",
        "# shows the failure again:",
        command,
        "# row (in the audited batch), error in ULPs (inf: non-finite where the exact value is finite):",
        *(f"# {row} {bad:.6g}" for row, bad in zip(rows.rows.tolist(), rows.badness.tolist(), strict=True)),
    ]
    (staging / "command.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

"""Audit logits dumped from a real model: load, validate, and run every implementation on them (a file of
hidden states and a classifier: the linear_ce family, ce_audit.replay_linear).

Loss options apply as in a sweep, one value each: targets are class indices (ignore_index allowed) or,
when the targets file is (N, V) floating point, probabilities; ``ignore_fraction`` and ``mask_fraction``
ignore rows and mask logits (never the target) on top of the file's own, drawn from the seed; weights
are drawn from the seed as in a sweep. A reduction is computed over all rows in one call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ce_audit.audit_result import AuditResult
from ce_audit.config import SweepConfig
from ce_audit.devices import device_description
from ce_audit.dtypes import FORMATS, FloatFormat, float_format, working_dtype
from ce_audit.errors import AuditError
from ce_audit.implementations import registered
from ce_audit.options import LossOptions
from ce_audit.pipeline import Block, audit_source, implementations_and_devices, row_multiple
from ce_audit.plan.cases import Case, random_class_weights
from ce_audit.printable import plural
from ce_audit.replay_linear import CLASSIFIER_KEY, HIDDEN_KEY, holds_linear_dump, linear_source
from ce_audit.reproducers import ReproducerSink
from ce_audit.run.interruption import UnitCount, received_signal, signal_name
from ce_audit.run.isolation import session
from ce_audit.safetensors_file import read_safetensors
from ce_audit.statuses import message_line
from ce_audit.trace import tracing

DEFAULT_LOGITS_KEY = "logits"
DEFAULT_TARGETS_KEY = "targets"
SUFFIXES = ".npy, .pt or .safetensors"
_SCAN_BYTES = 64 << 20  # rows read at a time when scanning the logits for NaN, +inf and their range
REPLAY_BLOCK_MIB = 32  # rows per block: 32 MiB in working precision; the audit of a block takes ~10x that


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    """A NumPy view of a CPU tensor (bfloat16 as ml_dtypes.bfloat16), sharing its memory map."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(FORMATS["bfloat16"].numpy_dtype)
    return tensor.numpy()


def _pt_contents(path: Path) -> Any:
    """torch.load with weights_only (no pickled code) and a memory map where the file format allows."""
    import warnings

    import torch

    with warnings.catch_warnings():  # a legacy pickle warns over two lines before failing: one line
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):  # only the legacy (non-zip) format cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def _tensors(path: Path, what: str) -> np.ndarray | dict[str, np.ndarray]:
    """The file's array, or its named arrays (.safetensors, a .pt dict), read lazily where possible."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False)
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in (".pt", ".pth"):
        import torch

        loaded = _pt_contents(path)
        if isinstance(loaded, torch.Tensor):
            return _torch_to_numpy(loaded)
        if isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return {str(key): _torch_to_numpy(value) for key, value in loaded.items()}
        raise AuditError(f"{what} file {path} holds a {type(loaded).__name__}, not a tensor")
    raise AuditError(f"{what} file {path}: expected a {SUFFIXES} file")


def load_array(path: str | Path, what: str, key: str | None = None, *, sole: bool = True) -> np.ndarray:
    """One array of a .npy (no pickles), .pt (torch.load weights_only) or .safetensors file, memory-mapped
    where the format allows (.npy, .safetensors, zip-format .pt). A file of several named tensors gives the
    one named ``key`` (default: ``what``), or (``sole``) its only tensor."""
    path = Path(path)
    try:
        loaded = _tensors(path, what)
    except AuditError:
        raise
    except FileNotFoundError:
        raise AuditError(f"{what} file {path} does not exist") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error
        reason = message_line(error)
        if reason.startswith("Weights only load failed"):
            reason = "not a tensor torch.load reads safely (weights_only=True); save a tensor with torch.save"
        raise AuditError(f"cannot read {what} file {path}: {reason}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    key = key or what
    if key in loaded:
        return loaded[key]
    if sole and len(loaded) == 1 and key in (DEFAULT_LOGITS_KEY, DEFAULT_TARGETS_KEY):
        return next(iter(loaded.values()))
    held = ", ".join(sorted(loaded)) or "nothing"
    raise AuditError(f"{what} file {path} has no tensor {key!r} (it holds: {held})")


def _file_format_name(logits: np.ndarray) -> str:
    for name, fmt in FORMATS.items():
        if logits.dtype == fmt.numpy_dtype:
            return name
    raise AuditError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")


def token_rows(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, T, V) logits with (B, T) targets (or (B, T, V) probabilities) as B·T rows, row b·T + t for
    token (b, t); (N, V) logits unchanged. A view: nothing is read."""
    if logits.ndim != 3:
        return logits, targets
    batch, tokens, vocab = logits.shape
    if targets.shape not in ((batch, tokens), logits.shape):
        raise AuditError(
            f"targets of shape {targets.shape} for (B, T, V) logits {logits.shape}: "
            f"expected (B, T) = {(batch, tokens)} class indices or (B, T, V) probabilities"
        )
    return logits.reshape(batch * tokens, vocab), targets.reshape(batch * tokens, *targets.shape[2:])


def validate_inputs(logits: np.ndarray, targets: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Check shapes, dtypes and ranges; returns int64 targets (``ignore_index`` allowed among them) or,
    for (N, V) floating-point targets, float64 probabilities. Raises AuditError with one line.
    The logit values are checked by ``scan_logits``."""
    if targets.ndim == 2 and logits.ndim == 2 and np.issubdtype(targets.dtype, np.floating):
        return _validate_probs(logits, targets)
    if logits.ndim != 2:
        raise AuditError(f"logits must be a 2-D (N, V) or 3-D (B, T, V) array, got shape {logits.shape}")
    if targets.ndim != 1:
        raise AuditError(f"targets must be a 1-D (N,) array, got shape {targets.shape}")
    if targets.shape[0] != logits.shape[0]:
        targets_for = f"{plural(targets.shape[0], 'target')} for {plural(logits.shape[0], 'row')}"
        raise AuditError(f"{targets_for} of logits")
    if logits.shape[1] < 1:
        raise AuditError("logits have no classes (V = 0)")
    _file_format_name(logits)
    if not np.issubdtype(targets.dtype, np.integer) or targets.dtype == np.bool_:
        raise AuditError(f"targets must be integers, got {targets.dtype}")
    targets = np.asarray(targets)
    out_of_range = (targets < 0) | (targets >= logits.shape[1])
    if ignore_index is not None:
        out_of_range &= targets != ignore_index
    if out_of_range.any():
        bad = int(targets[out_of_range][0])
        raise AuditError(f"target {bad} is out of range for {logits.shape[1]} classes")
    return targets.astype(np.int64)


def _validate_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    if targets.shape != logits.shape:
        raise AuditError(
            f"probability targets must have the logits' shape {logits.shape}, got {targets.shape}"
        )
    _file_format_name(logits)
    probs = np.asarray(targets).astype(np.float64)
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise AuditError("probability targets must lie in [0, 1]")
    return probs


def _row_step(logits: np.ndarray, budget: int) -> int:
    return max(1, budget // max(1, logits.shape[1] * logits.dtype.itemsize))


def scan_logits(logits: np.ndarray) -> float:
    """One pass over the rows, a block at a time: NaN or +inf is an AuditError; returns the largest finite
    |logit| (0 when there is none)."""
    peak = 0.0
    step = _row_step(logits, _SCAN_BYTES)
    for start in range(0, logits.shape[0], step):
        chunk = np.asarray(logits[start : start + step])
        if chunk.dtype.itemsize < 4:
            chunk = chunk.astype(np.float32)  # exact for float16 and bfloat16
        nan = np.isnan(chunk)
        if nan.any():
            raise AuditError(f"logits contain NaN (first at row {start + int(nan.any(axis=1).argmax())})")
        del nan
        if np.isposinf(chunk).any():
            raise AuditError("logits contain +inf")
        top = chunk.max(initial=-np.inf)
        bottom = np.where(np.isneginf(chunk), np.inf, chunk).min(initial=np.inf)
        for extreme in (top, bottom):
            if np.isfinite(extreme):
                peak = max(peak, abs(float(extreme)))
    return peak


def replay_options(config: SweepConfig, probs: bool) -> LossOptions:
    """The one set of loss options of a replay (probability targets when the targets file is (N, V))."""
    grid = config.loss_options()
    if len(grid) != 1:
        raise AuditError("replay takes one value of each loss option")
    options = replace(grid[0], targets="probs" if probs else "index")
    if options.family == "binary":
        raise AuditError("replay audits cross-entropy and focal loss, not binary cross-entropy")
    reason = options.invalid_reason()
    if reason:
        raise AuditError(reason)
    return options


def apply_target_options(
    targets: np.ndarray, vocab: int, options: LossOptions, seed: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Targets with the extra ignored rows (``ignore_fraction``), and float64 class weights, from the seed."""
    rng = np.random.default_rng([seed, 20240607])
    if options.ignore_fraction > 0 and not options.probs:
        targets = np.where(
            rng.random(targets.shape[0]) < options.ignore_fraction, options.ignore_index, targets
        )
    weight = None
    if options.weights != "none":
        weight = random_class_weights(seed, vocab)
        if options.weights == "zero-on-target":
            hit = targets.argmax(axis=1) if options.probs else targets[targets != options.ignore_index]
            weight[hit] = 0.0
    return targets, weight


def mask_rows(
    values: np.ndarray, targets: np.ndarray, first_row: int, options: LossOptions, seed: int
) -> None:
    """Set ``mask_fraction`` of each row's logits to −inf in place, never the target; row r draws from its
    own stream (seed, r), so the mask does not depend on how the rows are split into blocks."""
    for i in range(values.shape[0]):
        draws = np.random.default_rng([seed, 20240607, first_row + i]).random(values.shape[1])
        masked: np.ndarray = np.less(draws, options.mask_fraction)
        if options.probs:
            masked &= targets[i] == 0
        elif targets[i] != options.ignore_index:
            masked[targets[i]] = False
        values[i, masked] = -np.inf


@dataclass
class FileSource:
    """The replay's input adapter: the file's rows, read a block at a time from the (memory-mapped) dump,
    masked, and rounded once to each dtype. The dump is never converted to float64 as a whole.

    An implementation that cannot ignore rows is audited on the rows that are not ignored
    (``drop_ignored_rows``), against the reference of those rows, rather than skipped.
    """

    logits: np.ndarray  # (N, V) in the file's dtype, a memory map where the format allows
    targets: np.ndarray
    case: Case  # Case.of_files: the file's rows with the replay's options
    class_weight: np.ndarray | None
    budget_bytes: int
    peak: float  # the largest finite |logit|
    seed: int = 0
    drop_ignored_rows: bool = True
    row_multiple: int = 1  # blocks are multiples of this many rows (sequence adapters)

    @property
    def options(self) -> LossOptions:
        return self.case.options

    def weight(self, fmt: FloatFormat) -> np.ndarray | None:
        return None if self.class_weight is None else fmt.quantize(self.class_weight)

    def rows(self, fmt: FloatFormat, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start:stop`` rounded once to ``fmt`` (masks applied), and their targets."""
        raw = np.asarray(self.logits[start:stop])
        targets = self.targets[start:stop]
        if self.options.probs:
            targets = fmt.quantize(targets)
        if raw.dtype == fmt.numpy_dtype and self.options.mask_fraction == 0:
            return np.array(raw), targets
        values = raw.astype(np.float64)
        if self.options.mask_fraction > 0:
            mask_rows(values, self.targets[start:stop], start, self.options, self.seed)
        with np.errstate(over="ignore"):
            return fmt.quantize(values), targets

    def skip_reason(self, fmt: FloatFormat) -> str | None:
        """None; logits that overflow the dtype are the user's input error, not a skipped case."""
        with np.errstate(over="ignore"):
            overflows = np.isinf(fmt.quantize(np.array([self.peak]))).any()
        if overflows:
            raise AuditError(
                f"logits reach {self.peak:.6g}, which overflows {fmt.name} (largest finite {fmt.max:.6g})"
            )
        return None

    def _block_rows(self, fmt: FloatFormat) -> int:
        n_rows, vocab = self.logits.shape
        if self.options.reduction != "none":
            return max(1, n_rows)
        rows = max(1, self.budget_bytes // (vocab * working_dtype(fmt).itemsize))
        return max(self.row_multiple, rows // self.row_multiple * self.row_multiple)

    def n_blocks(self, fmt: FloatFormat) -> int:
        return max(1, -(-self.logits.shape[0] // self._block_rows(fmt)))

    def blocks(self, fmt: FloatFormat) -> Iterator[Block]:
        n_rows = self.logits.shape[0]
        step = self._block_rows(fmt)
        for start in range(0, max(n_rows, 1 if self.options.reduction != "none" else 0), step):
            yield (start, *self.rows(fmt, start, start + step))

    def whole_batch(self, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
        return self.rows(fmt, 0, self.logits.shape[0])


def load_dump(
    logits_path: str | Path,
    targets_path: str | Path | None = None,
    *,
    logits_key: str | None = None,
    targets_key: str | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(N, V) logits (a lazy view of the file), their targets, and the logits' shape as dumped.

    Without ``targets_path`` the logits file (.safetensors or a .pt dict) holds both tensors, under
    ``logits_key`` and ``targets_key`` (default ``logits`` and ``targets``).
    """
    logits = load_array(
        logits_path, "logits", logits_key or DEFAULT_LOGITS_KEY, sole=targets_path is not None
    )
    if targets_path is None:
        raw_targets = load_array(logits_path, "targets", targets_key or DEFAULT_TARGETS_KEY, sole=False)
    else:
        raw_targets = load_array(targets_path, "targets", targets_key or DEFAULT_TARGETS_KEY)
    shape = tuple(logits.shape)
    logits, raw_targets = token_rows(logits, raw_targets)
    return logits, raw_targets, shape


def load_linear_dump(
    path: str | Path, targets_path: str | Path | None, targets_key: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(hidden, classifier, targets) when the file's named tensors hold ``hidden`` and ``classifier``
    (targets from its ``targets`` tensor, or the targets file), else None."""
    if Path(path).suffix.lower() not in (".safetensors", ".pt", ".pth") or not Path(path).is_file():
        return None
    try:
        tensors = _tensors(Path(path), "dump")
    except Exception:  # noqa: BLE001 - not readable as named tensors: load_dump says why
        return None
    if not isinstance(tensors, dict) or not holds_linear_dump(tensors):
        return None
    key = targets_key or DEFAULT_TARGETS_KEY
    if targets_path is not None:
        targets = load_array(targets_path, "targets", key)
    elif key in tensors:
        targets = tensors[key]
    else:
        raise AuditError(f"linear dump {path} has no tensor {key!r} (it holds: {', '.join(sorted(tensors))})")
    return tensors[HIDDEN_KEY], tensors[CLASSIFIER_KEY], targets


def _logits_source(
    logits_path: str | Path,
    targets_path: str | Path | None,
    config: SweepConfig,
    budget: int,
    impls: list[Any],
    *,
    logits_key: str | None,
    targets_key: str | None,
) -> tuple[FileSource, str]:
    """The source of a dump of logits and targets, and the file's dtype."""
    logits, raw_targets, _ = load_dump(
        logits_path, targets_path, logits_key=logits_key, targets_key=targets_key
    )
    options = replay_options(config, probs=raw_targets.ndim == 2)
    targets = validate_inputs(logits, raw_targets, options.ignore_index)
    peak = scan_logits(logits)
    targets, weight = apply_target_options(targets, logits.shape[1], options, config.seed)
    if not options.probs and targets.size:  # the column reports the fraction ignored, the file's own included
        options = replace(options, ignore_fraction=float((targets == options.ignore_index).mean()))
    case = Case.of_files(logits.shape[0], logits.shape[1], config.seed, options)
    family = [impl for impl in impls if config.impls or impl.family == options.family]
    source = FileSource(
        logits, targets, case, weight, budget, peak, config.seed, row_multiple=row_multiple(family)
    )
    return source, _file_format_name(logits)


def run_replay(
    logits_path: str | Path,
    targets_path: str | Path | None,
    config: SweepConfig,
    dtypes: list[str] | None = None,
    *,
    logits_key: str | None = None,
    targets_key: str | None = None,
    reproducers: ReproducerSink | None = None,
) -> AuditResult:
    """Audit the implementations of ``config`` on the dumped logits, per dtype (default: the file's).
    ``reproducers`` collects the worst rows of every failing cell."""
    started, clock = time.time(), time.perf_counter()
    budget = min(config.block_mib, REPLAY_BLOCK_MIB) << 20
    impls, devices = implementations_and_devices(config.impls, config.plugins, config.devices)
    linear = load_linear_dump(logits_path, targets_path, targets_key)
    if linear is not None:  # hidden states and a classifier: the linear_ce family (ce_audit.replay_linear)
        source, file_dtype = linear_source(*linear, replay_options(config, probs=False), config.seed, budget)
    else:
        source, file_dtype = _logits_source(
            logits_path, targets_path, config, budget, impls, logits_key=logits_key, targets_key=targets_key
        )
    if not config.impls:
        impls = [impl for impl in impls if impl.family == source.options.family]
    audited = list(dtypes or [file_dtype])
    config = replace(config, dtypes=tuple(audited))  # report.json records what was audited
    units = UnitCount(len(audited))  # one unit per dtype
    limits = {"max_memory": config.max_memory}
    opened = session(config.isolation, config.timeout, impls=config.impls, plugins=config.plugins, **limits)
    with opened, tracing(config.trace):
        cells, row_results = audit_source(
            source, [float_format(name) for name in audited], impls, devices,
            settings=config.implementation_settings(), tolerances=config.tolerances, grad=config.grad,
            keep_rows=True, units=units, reproducers=reproducers,
        )  # fmt: skip
    signum = received_signal()
    return AuditResult(
        config=config,
        cells=cells,
        implementations=registered(cell.impl for cell in cells),
        row_results=row_results,
        devices={device: device_description(device) for device in devices},
        started=started,
        seconds=time.perf_counter() - clock,
        units_done=units.done,
        units_total=units.total,
        interrupted=signal_name(signum) if signum else "",
    )

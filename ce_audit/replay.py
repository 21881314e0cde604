"""Audit logits dumped from a real model: load, validate, and run every implementation on them.

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

from ce_audit.cases import random_class_weights
from ce_audit.config import SweepConfig
from ce_audit.devices import device_description
from ce_audit.dtypes import FORMATS, FloatFormat, float_format, working_dtype
from ce_audit.errors import AuditError
from ce_audit.interruption import UnitCount, received_signal, signal_name
from ce_audit.isolation import session
from ce_audit.options import LossOptions
from ce_audit.pipeline import Block, audit_source, implementations_and_devices, overflow_peak
from ce_audit.results import AuditResult
from ce_audit.scoring import CaseLabel
from ce_audit.statuses import message_line


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(FORMATS["bfloat16"].numpy_dtype)
    return tensor.numpy()


def load_array(path: str | Path, what: str) -> np.ndarray:
    """Read a .npy (no pickles) or .pt (torch.load weights_only) file into a NumPy array."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".pt", ".pth"):
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, torch.Tensor):
                raise AuditError(f"{what} file {path} holds a {type(loaded).__name__}, not a tensor")
            return _torch_to_numpy(loaded)
    except AuditError:
        raise
    except FileNotFoundError:
        raise AuditError(f"{what} file {path} does not exist") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is a user error
        raise AuditError(f"cannot read {what} file {path}: {message_line(error)}") from None
    raise AuditError(f"{what} file {path}: expected a .npy or .pt file")


def _file_format_name(logits: np.ndarray) -> str:
    for name, fmt in FORMATS.items():
        if logits.dtype == fmt.numpy_dtype:
            return name
    raise AuditError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")


def validate_inputs(logits: np.ndarray, targets: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Check shapes, dtypes and ranges; returns int64 targets (``ignore_index`` allowed among them) or,
    for (N, V) floating-point targets, float64 probabilities. Raises AuditError with one line."""
    if targets.ndim == 2 and logits.ndim == 2 and np.issubdtype(targets.dtype, np.floating):
        return _validate_probs(logits, targets)
    if logits.ndim != 2:
        raise AuditError(f"logits must be a 2-D (N, V) array, got shape {logits.shape}")
    if targets.ndim != 1:
        raise AuditError(f"targets must be a 1-D (N,) array, got shape {targets.shape}")
    if targets.shape[0] != logits.shape[0]:
        raise AuditError(f"{targets.shape[0]} targets for {logits.shape[0]} rows of logits")
    if logits.shape[1] < 1:
        raise AuditError("logits have no classes (V = 0)")
    _file_format_name(logits)
    if not np.issubdtype(targets.dtype, np.integer) or targets.dtype == np.bool_:
        raise AuditError(f"targets must be integers, got {targets.dtype}")
    out_of_range = (targets < 0) | (targets >= logits.shape[1])
    if ignore_index is not None:
        out_of_range &= targets != ignore_index
    if out_of_range.any():
        bad = int(targets[out_of_range][0])
        raise AuditError(f"target {bad} is out of range for {logits.shape[1]} classes")
    _check_logit_values(logits)
    return targets.astype(np.int64)


def _check_logit_values(logits: np.ndarray) -> None:
    values = logits.astype(np.float64)
    if np.isnan(values).any():
        raise AuditError(f"logits contain NaN (first at row {int(np.isnan(values).any(axis=1).argmax())})")
    if np.isposinf(values).any():
        raise AuditError("logits contain +inf")


def _validate_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    if targets.shape != logits.shape:
        raise AuditError(
            f"probability targets must have the logits' shape {logits.shape}, got {targets.shape}"
        )
    _file_format_name(logits)
    probs = targets.astype(np.float64)
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise AuditError("probability targets must lie in [0, 1]")
    _check_logit_values(logits)
    return probs


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


def apply_options(
    logits: np.ndarray, targets: np.ndarray, options: LossOptions, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Float64 logits with the mask applied, targets with extra ignored rows, and float64 class weights."""
    rng = np.random.default_rng([seed, 20240607])
    values = logits.astype(np.float64)
    n_rows, vocab = values.shape
    if options.mask_fraction > 0:
        masked = rng.random(values.shape) < options.mask_fraction
        if options.probs:
            masked &= targets == 0
        else:
            valid = targets != options.ignore_index
            masked[np.flatnonzero(valid), targets[valid]] = False
        values[masked] = -np.inf
    if options.ignore_fraction > 0 and not options.probs:
        targets = np.where(rng.random(n_rows) < options.ignore_fraction, options.ignore_index, targets)
    weight = None
    if options.weights != "none":
        weight = random_class_weights(seed, vocab)
        if options.weights == "zero-on-target":
            hit = targets.argmax(axis=1) if options.probs else targets[targets != options.ignore_index]
            weight[hit] = 0.0
    return values, targets, weight


@dataclass
class FileSource:
    """The replay's input adapter: the file's rows (options applied), quantized once to each dtype."""

    values: np.ndarray  # float64 logits, masks applied
    targets: np.ndarray
    options: LossOptions
    label: CaseLabel
    class_weight: np.ndarray | None
    budget_bytes: int

    def weight(self, fmt: FloatFormat) -> np.ndarray | None:
        return None if self.class_weight is None else fmt.quantize(self.class_weight)

    def _quantized(self, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
        """The logits (and probability targets) rounded once to ``fmt``."""
        with np.errstate(over="ignore"):
            quantized = fmt.quantize(self.values)
        targets = fmt.quantize(self.targets) if self.options.probs else self.targets
        return quantized, targets

    def skip_reason(self, fmt: FloatFormat) -> str | None:
        """None; logits that overflow the dtype are the user's input error, not a skipped case."""
        peak = overflow_peak(self.values, fmt)
        if peak is not None:
            raise AuditError(
                f"logits reach {peak:.6g}, which overflows {fmt.name} (largest finite {fmt.max:.6g})"
            )
        return None

    def _block_rows(self, fmt: FloatFormat) -> int:
        n_rows, vocab = self.values.shape
        if self.options.reduction != "none":
            return max(1, n_rows)
        return max(1, self.budget_bytes // (vocab * working_dtype(fmt).itemsize))

    def n_blocks(self, fmt: FloatFormat) -> int:
        return 1

    def blocks(self, fmt: FloatFormat) -> Iterator[Block]:
        quantized, targets = self._quantized(fmt)
        n_rows = quantized.shape[0]
        step = self._block_rows(fmt)
        for start in range(0, max(n_rows, 1 if self.options.reduction != "none" else 0), step):
            yield start, quantized[start : start + step], targets[start : start + step]

    def whole_batch(self, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
        return self._quantized(fmt)


def run_replay(
    logits_path: str | Path,
    targets_path: str | Path,
    config: SweepConfig,
    dtypes: list[str] | None = None,
) -> AuditResult:
    """Audit the implementations of ``config`` on the dumped logits, per dtype (default: the file's)."""
    started, clock = time.time(), time.perf_counter()
    logits = load_array(logits_path, "logits")
    raw_targets = load_array(targets_path, "targets")
    options = replay_options(config, probs=raw_targets.ndim == 2)
    targets = validate_inputs(logits, raw_targets, options.ignore_index)
    impls, devices = implementations_and_devices(config.impls, config.plugins, config.devices)
    if not config.impls:
        impls = [impl for impl in impls if impl.family == options.family]
    values, targets, weight = apply_options(logits, targets, options, config.seed)
    if not options.probs and targets.size:  # the column reports the fraction ignored, the file's own included
        options = replace(options, ignore_fraction=float((targets == options.ignore_index).mean()))
    audited = list(dtypes or [_file_format_name(logits)])
    config = replace(config, dtypes=tuple(audited))  # report.json records what was audited
    label = CaseLabel("replay", 1.0, 0.0, logits.shape[0], logits.shape[1], config.seed, options)
    source = FileSource(values, targets, options, label, weight, config.block_mib << 20)
    units = UnitCount(len(audited))  # one unit per dtype
    with session(config.isolation, config.timeout, impls=config.impls, plugins=config.plugins):
        cells, row_results = audit_source(
            source, [float_format(name) for name in audited], impls, devices,
            settings=config.implementation_settings(), tolerances=config.tolerances, grad=config.grad,
            keep_rows=True, units=units,
        )  # fmt: skip
    signum = received_signal()
    return AuditResult(
        config=config,
        cells=cells,
        row_results=row_results,
        devices={device: device_description(device) for device in devices},
        started=started,
        seconds=time.perf_counter() - clock,
        units_done=units.done,
        units_total=units.total,
        interrupted=signal_name(signum) if signum else "",
    )

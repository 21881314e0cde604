"""Audit logits dumped from a real model: load, validate, and run every implementation on them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ce_audit.config import SweepConfig
from ce_audit.devices import device_description, resolve_devices
from ce_audit.dtypes import FORMATS, float_format, working_dtype
from ce_audit.engine import AuditResult, CaseLabel, audit_blocks
from ce_audit.errors import AuditError
from ce_audit.implementations import resolve


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
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AuditError(f"cannot read {what} file {path}: {first}") from None
    raise AuditError(f"{what} file {path}: expected a .npy or .pt file")


def _file_format_name(logits: np.ndarray) -> str:
    for name, fmt in FORMATS.items():
        if logits.dtype == fmt.numpy_dtype:
            return name
    raise AuditError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")


def validate_inputs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Check shapes, dtypes and ranges; returns int64 targets. Raises AuditError with one line."""
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
    if targets.size and (targets.min() < 0 or targets.max() >= logits.shape[1]):
        bad = int(targets[(targets < 0) | (targets >= logits.shape[1])][0])
        raise AuditError(f"target {bad} is out of range for {logits.shape[1]} classes")
    values = logits.astype(np.float64)
    if np.isnan(values).any():
        raise AuditError(f"logits contain NaN (first at row {int(np.isnan(values).any(axis=1).argmax())})")
    if np.isposinf(values).any():
        raise AuditError("logits contain +inf")
    return targets.astype(np.int64)


def run_replay(
    logits_path: str | Path,
    targets_path: str | Path,
    config: SweepConfig,
    dtypes: list[str] | None = None,
) -> AuditResult:
    """Audit the implementations of ``config`` on the dumped logits, per dtype (default: the file's)."""
    started, clock = time.time(), time.perf_counter()
    logits = load_array(logits_path, "logits")
    targets = validate_inputs(logits, load_array(targets_path, "targets"))
    impls = resolve(config.impls)
    devices = resolve_devices(config.devices, accelerators_wanted=any(i.backend == "torch" for i in impls))
    values = logits.astype(np.float64)
    rows, records = [], []
    for name in dtypes or [_file_format_name(logits)]:
        fmt = float_format(name)
        with np.errstate(over="ignore"):
            quantized = values.astype(fmt.numpy_dtype)
        overflow = np.isinf(quantized) & np.isfinite(values)
        if overflow.any():
            peak = float(np.abs(values[overflow]).max())
            raise AuditError(
                f"logits reach {peak:.6g}, which overflows {name} (largest finite {fmt.max:.6g})"
            )
        label = CaseLabel("replay", 1.0, 0.0, logits.shape[0], logits.shape[1], config.seed)
        per_row = logits.shape[1] * working_dtype(fmt).itemsize
        block_rows = max(1, (config.block_mib << 20) // per_row)
        blocks = (
            (start, quantized[start : start + block_rows], targets[start : start + block_rows])
            for start in range(0, logits.shape[0], block_rows)
        )
        cell_rows, cell_records = audit_blocks(
            blocks,
            fmt,
            label,
            impls,
            devices,
            settings=config.implementation_settings(),
            tolerance=config.tolerances[name],
            grad=config.grad,
            keep_rows=True,
        )
        rows += cell_rows
        records += cell_records
    return AuditResult(
        config=config,
        rows=rows,
        records=records,
        devices={device: device_description(device) for device in devices},
        started=started,
        seconds=time.perf_counter() - clock,
    )

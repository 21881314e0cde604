"""The sweep: plans the grid of cases and runs each (case, options) through the pipeline.

``CaseSource`` is the sweep's input adapter: the seeded rows of one case (ce_audit.cases), quantized
once to each dtype, in blocks of at most ``block_mib`` of working memory. A dtype is skipped, with the
reason, where the loss is not defined for the options, where a reduction's single whole-batch call would
pass 4 × ``block_mib``, or where the generated logits overflow the dtype.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from ce_audit.cases import Case, build_cases, class_weights, generate_inputs, quantize, row_blocks
from ce_audit.config import SweepConfig
from ce_audit.devices import device_description
from ce_audit.dtypes import FloatFormat, float_format, working_dtype
from ce_audit.interruption import UnitCount, received_signal, signal_name, stop_requested
from ce_audit.isolation import session
from ce_audit.options import LossOptions
from ce_audit.pipeline import Block, Progress, audit_source, implementations_and_devices, overflow_peak
from ce_audit.results import AuditResult, Cell
from ce_audit.scoring import CaseLabel


@dataclass
class CaseSource:
    """The inputs of one generated case with one set of loss options."""

    case: Case
    options: LossOptions
    label: CaseLabel
    budget_bytes: int

    def __post_init__(self) -> None:
        self.invalid = self.options.invalid_reason()
        self._weight = None if self.invalid else class_weights(self.case, self.options)

    def weight(self, fmt: FloatFormat) -> np.ndarray | None:
        return None if self._weight is None else quantize(self._weight, fmt)

    def _ranges(self, fmt: FloatFormat, budget_bytes: int) -> list[tuple[int, int]]:
        """Row blocks; a reduction is computed by the implementation over the whole batch, in one block."""
        if self.options.reduction != "none":
            return [(0, self.case.batch)]
        return list(row_blocks(self.case, working_dtype(fmt).itemsize, budget_bytes))

    def n_blocks(self, fmt: FloatFormat) -> int:
        return len(self._ranges(fmt, self.budget_bytes))

    def _blocks(self, fmt: FloatFormat, budget_bytes: int) -> Iterator[Block]:
        for start, stop in self._ranges(fmt, budget_bytes):
            logits, targets = generate_inputs(self.case, self.options, start, stop)
            if targets.dtype.kind == "f":
                targets = quantize(targets, fmt)
            yield start, quantize(logits, fmt), targets

    def blocks(self, fmt: FloatFormat) -> Iterator[Block]:
        return self._blocks(fmt, self.budget_bytes)

    def whole_batch(self, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
        (_, logits, targets), *_ = self._blocks(fmt, 1 << 62)
        return logits, targets

    def skip_reason(self, fmt: FloatFormat) -> str | None:
        return self.invalid or self._too_big(fmt) or self._overflows(fmt)

    def _too_big(self, fmt: FloatFormat) -> str | None:
        case, reduction = self.case, self.options.reduction
        if (
            reduction == "none"
            or case.batch * case.vocab * working_dtype(fmt).itemsize <= 4 * self.budget_bytes
        ):
            return None
        return (
            f"a {reduction} is computed in one call over the whole batch; "
            f"{case.batch} × {case.vocab} passes 4 × block_mib of working memory"
        )

    def _overflows(self, fmt: FloatFormat) -> str | None:
        """Why the case cannot be represented in the dtype (its logits pass the largest finite value)."""
        case = self.case
        # Cheap bound first: |offset| + |scale| · (largest |base| a distribution can draw, with margin) + |M|.
        if abs(case.offset) + abs(case.scale) * 16.0 + abs(case.margin or 0.0) < fmt.max / 2:
            return None
        for start, stop in row_blocks(case, 8, 64 << 20):
            peak = overflow_peak(generate_inputs(case, self.options, start, stop)[0], fmt)
            if peak is not None:
                return f"logits reach {peak:.4g}, beyond {fmt.name}'s largest finite value {fmt.max:.6g}"
        return None


def _run_grid(
    config: SweepConfig, progress: Progress | None, units: UnitCount
) -> tuple[list[Cell], list[str]]:
    impls, devices = implementations_and_devices(config.impls, config.plugins, config.devices)
    cases = build_cases(
        config.distributions, config.scales, config.offsets, config.vocabs, config.batches, config.seed
    )
    formats = [float_format(name) for name in config.dtypes]
    settings = config.implementation_settings()
    cells: list[Cell] = []
    for base_case in cases:
        for margin, position in itertools.product(config.margins, config.target_positions):
            case = replace(base_case, margin=margin, target_position=position)
            for options in config.loss_options():
                if stop_requested():  # interrupted: the completed units are the result
                    return cells, devices
                family_impls = impls if config.impls else [i for i in impls if i.family == options.family]
                if not family_impls:
                    units.done += len(formats)
                    if progress:
                        progress(float(len(formats)))
                    continue
                label = CaseLabel(
                    case.distribution, case.scale, case.offset, case.batch, case.vocab, case.seed,
                    options, margin, position,
                )  # fmt: skip
                source = CaseSource(case, options, label, config.block_mib << 20)
                case_cells, _ = audit_source(
                    source, formats, family_impls, devices, settings=settings, tolerances=config.tolerances,
                    grad=config.grad, progress=progress, units=units,
                )  # fmt: skip
                cells += case_cells
    return cells, devices


def run_sweep(config: SweepConfig, progress: Progress | None = None) -> AuditResult:
    """Run the whole grid of ``config`` (each of its [[grids]] in turn); one cell per implementation,
    dtype, device and case."""
    started = time.time()
    clock = time.perf_counter()
    cells: list[Cell] = []
    devices: list[str] = []
    units = UnitCount(sweep_size(config))
    grids = config.expanded()
    impls = [name for grid in grids for name in grid.impls]
    plugins = [spec for grid in grids for spec in grid.plugins]
    with session(config.isolation, config.timeout, impls=impls, plugins=plugins):  # one worker per run
        for grid in grids:
            if stop_requested():
                break
            grid_cells, grid_devices = _run_grid(grid, progress, units)
            cells += grid_cells
            devices += [device for device in grid_devices if device not in devices]
    signum = received_signal()
    return AuditResult(
        config=config,
        cells=cells,
        row_results=[],
        devices={device: device_description(device) for device in devices},
        started=started,
        seconds=time.perf_counter() - clock,
        units_done=units.done,
        units_total=units.total,
        interrupted=signal_name(signum) if signum else "",
    )


def sweep_size(config: SweepConfig) -> int:
    """Number of (case, dtype) units a sweep reports progress in."""
    return sum(
        len(grid.distributions) * len(grid.scales) * len(grid.offsets) * len(grid.vocabs) * len(grid.batches)
        * len(grid.dtypes) * len(grid.margins) * len(grid.target_positions) * len(grid.loss_options())
        for grid in config.expanded()
    )  # fmt: skip

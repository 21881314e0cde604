"""What a sweep or replay returns: its cells, the config that produced them, and how the run went."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ce_audit.config import SweepConfig
from ce_audit.implementations import Implementation
from ce_audit.results import Cell, RowResult, rounded_cells


@dataclass(frozen=True)
class AuditResult:
    """What a sweep or replay returns: its cells (and per-row results of a replay), and what produced them."""

    config: SweepConfig
    cells: list[Cell]
    row_results: list[RowResult]
    devices: dict[str, str]
    started: float
    seconds: float
    shard: dict[str, Any] | None = None  # a --shard run: which part of the units (ce_audit.run.shards)
    units_done: int = 0  # (case, dtype) units completed …
    units_total: int = 0  # … of those planned
    interrupted: str = ""  # the signal that stopped the run (SIGINT, SIGTERM), "" when it ran to its end
    implementations: tuple[Implementation, ...] = ()  # what each audited name was (report.json describes it)

    @property
    def partial(self) -> bool:
        """The run was stopped before its last unit: the cells are those of the completed units."""
        return self.units_done < self.units_total

    @cached_property
    def summary_cells(self) -> list[Cell]:
        """The cells as summary.csv holds them, every error measurement to ``results.SIGNIFICANT_DIGITS``
        significant digits: rounded once, here, for every report and the gate, so that they all read the
        same values (``cells`` keep full precision for the Python API and the terminal)."""
        return rounded_cells(self.cells)

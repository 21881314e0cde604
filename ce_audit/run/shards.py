"""CI shards: ``--shard K/N`` runs a deterministic, balanced part of a sweep's units.

The units (ce_audit.plan.units.Unit, in report order) are dealt to N shards by their estimated cost, largest
first, each to the shard with the least cost so far (ties: the lower unit index, the lower shard), so
every shard of the same config and package gets the same units on any machine. A shard runs its units in
report order and records in report.json which units it ran and how many cells each gave;
``ce-audit merge`` (ce_audit.run.merge) puts the shards' cells back in report order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ce_audit.errors import AuditError

if TYPE_CHECKING:
    from ce_audit.plan.units import Unit

_SHARD_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``K/N`` with 1 ≤ K ≤ N; anything else is an AuditError."""
        match = _SHARD_PATTERN.match(text)
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            raise AuditError(f"--shard takes K/N with 1 ≤ K ≤ N (e.g. 2/4), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, units: Sequence[Unit]) -> list[Unit]:
        """This shard's units, in report order."""
        owner = assign(units, self.count)
        return [unit for unit in units if owner[unit.index] == self.index]

    def record(self, total_units: int, cell_counts: list[tuple[int, int]]) -> dict[str, Any]:
        """What report.json says of the shard: K, N, the sweep's unit count, and [unit index, cells] of
        each unit run here."""
        return {
            "index": self.index,
            "count": self.count,
            "total_units": total_units,
            "units": [[index, cells] for index, cells in cell_counts],
        }


def assign(units: Sequence[Unit], count: int) -> dict[int, int]:
    """The shard (1-based) of each unit index: largest estimated cost first, to the least loaded shard."""
    loads = [0] * count
    owner: dict[int, int] = {}
    for unit in sorted(units, key=lambda unit: (-unit.cost, unit.index)):
        lightest = min(range(count), key=lambda shard: (loads[shard], shard))
        loads[lightest] += unit.cost
        owner[unit.index] = lightest + 1
    return owner

"""The regression rules of the gate: small objects whose ``fails(baseline, current)`` returns a message
when the current cell fails the rule against the baseline cell, else None.

Which metrics are compared, and how, comes from the gate marks of the ``Cell`` fields (ce_audit.results):
* ``status``: may not get worse, in the order ok < inaccurate < nonfinite < error (or no longer measured);
* ``count``: NaN/Inf rows may not grow;
* ``growth``: may not grow by more than ``ulp_growth`` ULPs and by more than ``rel_growth`` (a fraction);
  a metric in ``eps`` units (a relative error) counts one ULP as the dtype's machine epsilon 2^(1−p);
* ``kind``: may not change (per-row losses ↔ a mean; the returned dtype).
A baseline cell missing now fails; a new cell fails only when ``strict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ce_audit.dtypes import FORMATS
from ce_audit.results import Cell, measurements, unit_of, what_of
from ce_audit.statuses import UNMEASURED, Status, status_rank

PRESENT = "cell"  # the metric name of the Present check, which compares no column


class Check(Protocol):
    """One regression rule: a message when the current cell fails it against the baseline, else None."""

    @property
    def metric(self) -> str: ...

    def fails(self, baseline: Cell | None, current: Cell | None) -> str | None: ...


def measured(cell: Cell | None) -> bool:
    """The cell exists and its loss was measured (not error or skipped)."""
    return cell is not None and cell.status not in UNMEASURED


def _both_measured(baseline: Cell | None, current: Cell | None) -> tuple[Cell, Cell] | None:
    """Both cells, when both were measured; otherwise None."""
    if baseline is None or current is None or not (measured(baseline) and measured(current)):
        return None
    return baseline, current


@dataclass(frozen=True)
class Present:
    """A baseline cell must still be audited; a new cell fails only in strict mode."""

    strict: bool = False
    metric: str = PRESENT

    def fails(self, baseline: Cell | None, current: Cell | None) -> str | None:
        if baseline is not None and current is None:
            return "missing from the current audit"
        if baseline is None and current is not None and self.strict:
            return "new cell, not in the baseline (--strict)"
        return None


@dataclass(frozen=True)
class StatusHeld:
    """status / grad_status may not get worse: ok < inaccurate < nonfinite < error."""

    metric: str = "status"

    def fails(self, baseline: Cell | None, current: Cell | None) -> str | None:
        if baseline is None or current is None:
            return None
        if self.metric != "status" and not measured(current):
            return None  # the status check already says it
        before, now = getattr(baseline, self.metric), getattr(current, self.metric)
        rank_before, rank_now = status_rank(before), status_rank(now)
        if rank_before is None:
            return None
        if rank_now is None:
            reason = f": {current.error}" if current.error else ""
            return f"no longer audited ({now or 'absent'}{reason})"
        if rank_now > rank_before:
            reason = f": {current.error}" if now == Status.ERROR and current.error else ""
            return f"{self.metric} got worse{reason}"
        return None


@dataclass(frozen=True)
class CountHeld:
    """No more NaN/Inf (or wrong) rows than the baseline had."""

    metric: str

    def fails(self, baseline: Cell | None, current: Cell | None) -> str | None:
        pair = _both_measured(baseline, current)
        if pair is None:
            return None
        before, now = (float(getattr(cell, self.metric)) for cell in pair)
        if now > before or (math.isnan(now) and not math.isnan(before)):
            return f"{what_of(self.metric)} appeared"
        return None


def gradient_measured(cell: Cell) -> bool:
    return status_rank(cell.grad_status) not in (None, status_rank(Status.ERROR))


@dataclass(frozen=True)
class GrowthHeld:
    """A metric may not grow by more than ``ulps`` ULPs *and* more than ``fraction`` of its baseline value.

    For a relative error (``relative=True``) one ULP is the dtype's machine epsilon 2^(1−p).
    """

    metric: str
    ulps: float = 1.0
    fraction: float = 0.1
    relative: bool = False

    def fails(self, baseline: Cell | None, current: Cell | None) -> str | None:
        pair = _both_measured(baseline, current)
        if pair is None:
            return None
        if self.relative and not all(gradient_measured(cell) for cell in pair):
            return None  # no gradient measured on one side; the grad_status check covers it
        before, now = (float(getattr(cell, self.metric)) for cell in pair)
        if math.isnan(now):
            return None if math.isnan(before) else "became NaN"
        unit = 1.0
        if self.relative:
            fmt = FORMATS.get(pair[1].dtype)
            unit = 2.0 ** (1 - fmt.precision) if fmt else 0.0
        if now - before > self.ulps * unit and now > before * (1 + self.fraction):
            allowed = f"{self.ulps:g} ULP" + (" (relative)" if self.relative else "")
            return f"grew by more than {allowed} and {self.fraction:.0%}"
        return None


@dataclass(frozen=True)
class KindHeld:
    """What an implementation returns does not change: per-row losses stay per-row losses (and a mean a
    mean); the returned dtype stays the same."""

    metric: str = "value_kind"

    def fails(self, baseline: Cell | None, current: Cell | None) -> str | None:
        pair = _both_measured(baseline, current)
        if pair is None:
            return None
        before, now = (getattr(cell, self.metric) for cell in pair)
        if before and now and before != now:
            if self.metric != "value_kind":
                return f"now returns {now} (was {before})"
            return "now returns a mean (0-d)" if now == "mean" else "now returns per-row losses"
        return None


def default_checks(ulp_growth: float = 1.0, rel_growth: float = 0.1, strict: bool = False) -> list[Check]:
    """The regression rules of the gate, in the order their failures are listed: presence, then each
    metric the Cell fields mark for the gate (statuses, counts, growth, kind), in field order."""
    return [
        Present(strict),
        *(StatusHeld(metric) for metric in measurements(gate="status")),
        *(CountHeld(metric) for metric in measurements(gate="count")),
        *(
            GrowthHeld(metric, ulp_growth, rel_growth, relative=unit_of(metric) == "eps")
            for metric in measurements(gate="growth")
        ),
        *(KindHeld(metric) for metric in measurements(gate="kind")),
    ]

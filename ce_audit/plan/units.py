"""A sweep's units: one (case, dtype) of one grid each, with the implementations and devices it runs on,
numbered in the order a sweep reports them. Executors (ce_audit.run.executors) and shards
(ce_audit.run.shards) deal them out; ce_audit.run.sweep runs them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from ce_audit.config import Grid, SweepConfig
from ce_audit.options import LossOptions
from ce_audit.pipeline import implementations_and_devices
from ce_audit.plan.cases import DEFAULT_HIDDEN_SIZE, Case, build_cases


@dataclass(frozen=True)
class Unit:
    """One independent piece of a sweep: one case (with its loss options) and dtype of one grid, with the
    names of the implementations and the devices it runs on."""

    index: int
    grid: Grid
    case: Case
    dtype: str
    impls: tuple[str, ...]
    devices: tuple[str, ...]

    @property
    def options(self) -> LossOptions:
        return self.case.options

    @property
    def cells(self) -> int:
        """The cells it adds to the report: one per implementation and device (what progress counts)."""
        return len(self.impls) * len(self.devices)

    @property
    def cost(self) -> int:
        """An estimate of the work: rows × vocabulary × (implementations + the reference) × devices."""
        if not self.impls:
            return 0
        width = self.case.vocab * max(1, self.case.hidden_size)  # linear_ce: N × V × D products
        return self.case.batch * width * (len(self.impls) + 1) * len(self.devices)


def grid_cases(grid: Grid) -> list[Case]:
    """The cases of one grid in report order: each generated case × input dimension × loss options. The
    logits' dimensions (margin, target position) shape the logits families' cases, the hidden states' (hidden
    size, classifier scale) linear_ce's (hidden size 0: DEFAULT_HIDDEN_SIZE); each family keeps the others'
    defaults."""
    cases = build_cases(grid.distributions, grid.scales, grid.offsets, grid.vocabs, grid.batches, grid.seed)
    logits_inputs = list(itertools.product(grid.values("margin"), grid.values("target_position")))
    hidden_sizes = tuple(dict.fromkeys(size or DEFAULT_HIDDEN_SIZE for size in grid.values("hidden_size")))
    hidden_inputs = list(itertools.product(hidden_sizes, grid.values("classifier_scale")))
    planned = []
    for case in cases:
        for margin, position in logits_inputs:
            for options in grid.loss_options():
                if options.family != "linear_ce":
                    planned.append(replace(case, margin=margin, target_position=position, options=options))
                elif (margin, position) == logits_inputs[0]:  # once, whatever the logits' dimensions
                    planned += [
                        replace(case, options=options, hidden_size=size, classifier_scale=scale)
                        for size, scale in hidden_inputs
                    ]
    return planned


def plan_units(
    config: SweepConfig, devices_here: bool = True, *, cpu_only: bool = False
) -> tuple[list[Unit], list[str]]:
    """Every unit of the sweep, in report order, and the devices of all its grids.

    Plugins are loaded here to know each implementation's loss family. ``devices_here`` False: a named
    accelerator (cuda, cuda:N) need not be present on this machine (a cluster's nodes have their own).
    ``cpu_only``: every grid on the CPU alone, no device looked for (torch not imported): the same units,
    their cost a lower bound.
    """
    units: list[Unit] = []
    all_devices: list[str] = []
    for grid in config.expanded():
        impls, grid_devices = implementations_and_devices(
            grid.impls, grid.plugins, ("cpu",) if cpu_only else grid.devices, present_only=devices_here
        )
        all_devices += [device for device in grid_devices if device not in all_devices]
        for case in grid_cases(grid):
            family = impls if grid.impls else [i for i in impls if i.family == case.options.family]
            names = tuple(impl.name for impl in family)
            units += [
                Unit(len(units) + i, grid, case, dtype, names, tuple(grid_devices))
                for i, dtype in enumerate(grid.dtypes)
            ]
    return units, all_devices

"""Shared helpers of the characterization tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cimlab.characterize import (
    MeasurementStore,
    Plan,
    PlanOptions,
    SupplySetup,
    SweepResult,
    SweepRunner,
    conditions_from_vdd,
    store_meta,
)
from cimlab.driver import Chip


def sweep(url: str, out: Path, options: PlanOptions, vdd: list[float] | None = None, *,
          supply: SupplySetup | None = None, should_stop: Callable[[], bool] = lambda: False,
          chip: Chip | None = None) -> SweepResult:
    """Create a store in ``out`` and run the plan on the chip at ``url`` (or on ``chip``)."""
    own = chip is None
    chip = chip or Chip.open(url)
    try:
        plan = Plan(chip.spec, options)
        conds = conditions_from_vdd(vdd)
        with MeasurementStore.create(out, store_meta(chip, plan, conds, url, None), conds) as store:
            return SweepRunner(chip, store, plan, supply=supply, should_stop=should_stop).run()
    finally:
        if own:
            chip.close()


def store_counts(out: Path, cond_id: int = 0) -> np.ndarray:
    """The dense counts of one condition of the store in ``out``."""
    with MeasurementStore.open(out) as store:
        from cimlab.firmware_bridge.spec import MacroSpec

        spec = MacroSpec.from_dict(store.meta["spec"])
        return store.counts(cond_id, (spec.physical_cols, spec.n_levels, spec.n_codes))

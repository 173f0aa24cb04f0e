"""Characterization: sweep the macro, store the tallies crash-safely, and build the data-driven error model.

::

    plan.py    Plan, PlanOptions: weights and inputs so every column sees every reachable level (deterministic)
    store.py   MeasurementStore: SQLite in DIR, one transaction per batch; Condition, BatchRecord
    sweep.py   SweepRunner: run a plan on a chip into a store (resume, Ctrl-C, supply current); models out

The command line is ``cimlab characterize`` / ``cimlab fit`` / ``cimlab report`` (``cimlab.cli_characterize``).
"""

from cimlab.characterize.plan import Batch, Plan, PlanOptions, parse_index_list
from cimlab.characterize.store import STORE_NAME, BatchRecord, Condition, MeasurementStore
from cimlab.characterize.sweep import (
    MODEL_NAME,
    SupplySetup,
    SweepResult,
    SweepRunner,
    check_resume,
    conditions_from_vdd,
    model_for_condition,
    store_meta,
    write_models,
)

__all__ = [
    "MODEL_NAME",
    "STORE_NAME",
    "Batch",
    "BatchRecord",
    "Condition",
    "MeasurementStore",
    "Plan",
    "PlanOptions",
    "SupplySetup",
    "SweepResult",
    "SweepRunner",
    "check_resume",
    "conditions_from_vdd",
    "model_for_condition",
    "parse_index_list",
    "store_meta",
    "write_models",
]

"""Bench instruments over VISA: the supplies that power the macro, on PyMeasure's drivers.

::

    supplies.py   SupplyLimits, BenchSupply (limits, compliance, ramp, output off on every exit), open_supply()
                  by *IDN?: Keithley 2400/2450, Keysight/Agilent E3631A/E36312A (PyMeasure), E364xA (keysight.py)
    keysight.py   KeysightE364xA: a driver in PyMeasure's style for a family PyMeasure lacks
    sampler.py    CurrentSampler: the charge the supply delivers while the chip works
    sim/          pyvisa-sim YAML of a simulated bench (``--visa-library PATH/bench.yaml@sim``)

A served twin's own simulated SMU (``cimlab sim serve --smu``) is reached like any instrument, over VISA.
Nothing here opens an instrument at import time; PyMeasure is imported when a supply is opened.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cimlab.instruments.sampler import CurrentSampler, CurrentSummary
from cimlab.instruments.supplies import (
    SOURCES,
    SUPPLY_MODELS,
    BenchSupply,
    Reading,
    Source,
    SupplyLimits,
    open_supply,
    source_for_idn,
)


def sim_bench_yaml() -> Path:
    """Path of the bundled pyvisa-sim bench (append ``@sim`` to use it as a VISA library)."""
    return Path(str(resources.files(__name__).joinpath("sim", "bench.yaml")))


__all__ = [
    "SOURCES",
    "SUPPLY_MODELS",
    "BenchSupply",
    "CurrentSampler",
    "CurrentSummary",
    "Reading",
    "Source",
    "SupplyLimits",
    "open_supply",
    "sim_bench_yaml",
    "source_for_idn",
]

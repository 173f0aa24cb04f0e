"""Bench instruments over VISA: declarative SCPI drivers for the supplies that power the macro.

::

    base.py       Instrument, Property (control/measurement/setting), validators, VisaAdapter
    supplies.py   SourceSupply: Keithley2400, Keithley2450, KeysightE36xx; open_supply() by *IDN?
    sampler.py    CurrentSampler: read the supply current in the background while the chip works
    testing.py    expected_protocol(): test a driver against the exact commands it must send
    sim/          pyvisa-sim YAML of a simulated bench (``--visa-library PATH/bench.yaml@sim``)

Nothing here opens an instrument at import time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cimlab.instruments.base import Choice, Instrument, Property, Range, VisaAdapter, boolean
from cimlab.instruments.sampler import CurrentSampler, CurrentSummary
from cimlab.instruments.supplies import (
    SUPPLIES,
    Keithley2400,
    Keithley2450,
    KeysightE36xx,
    SourceSupply,
    driver_for_idn,
    open_supply,
)


def sim_bench_yaml() -> Path:
    """Path of the bundled pyvisa-sim bench (append ``@sim`` to use it as a VISA library)."""
    return Path(str(resources.files(__name__).joinpath("sim", "bench.yaml")))


__all__ = [
    "SUPPLIES",
    "Choice",
    "CurrentSampler",
    "CurrentSummary",
    "Instrument",
    "Keithley2400",
    "Keithley2450",
    "KeysightE36xx",
    "Property",
    "Range",
    "SourceSupply",
    "VisaAdapter",
    "boolean",
    "driver_for_idn",
    "open_supply",
    "sim_bench_yaml",
]

"""Supplies for the macro's VDD: a Keithley 2400/2450 SMU and a Keysight E36xx bench supply (SCPI subsets).

All present one interface, ``SourceSupply``: ``source_voltage`` (V), ``current_limit`` (A, the compliance),
``output_enabled``, ``current`` (a fresh reading, A) and the context manager ``powered(voltage, current_limit)``,
which sets the compliance before the voltage, checks the instrument's error queue, turns the output on, and turns
it off again on every way out of the block (normal exit, errors, Ctrl-C).

``open_supply(resource, visa_library)`` identifies the instrument with ``*IDN?`` and picks the driver.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from cimlab.firmware_bridge.errors import CimError, ConfigError, DeviceError, LinkError
from cimlab.instruments.base import Adapter, Instrument, Range, VisaAdapter, boolean, scpi_bool

MAX_ERRORS_READ = 32
"""Error-queue entries read at most by ``check_errors`` (a queue that never empties is itself an error)."""


class SourceSupply(Instrument):
    """A voltage source with a current limit and a current meter.

    Subclasses declare the SCPI of each property and their ranges (``v_min``, ``v_max`` in V, ``i_min``,
    ``i_max`` in A).
    """

    model: ClassVar[str] = "supply"
    idn_pattern: ClassVar[str] = r"$^"
    error_query: ClassVar[str] = ":SYST:ERR?"
    v_min: float = 0.0
    v_max: float = 0.0
    i_min: float = 0.0
    i_max: float = 0.0

    source_voltage: float
    current_limit: float
    output_enabled: bool
    current: float

    def configure(self) -> None:
        """Put the instrument in voltage-source, current-measure mode (does not touch the output)."""

    def check_errors(self) -> None:
        """Read the SCPI error queue; DeviceError listing every entry if it was not empty."""
        errors = []
        for _ in range(MAX_ERRORS_READ):
            reply = self.query(self.error_query)
            code_text = reply.split(",", 1)[0].strip()
            try:
                code = int(code_text)
            except ValueError:
                raise LinkError(f"{self.name}: error-queue reply {reply!r} does not start with a number") from None
            if code == 0:
                break
            errors.append(reply)
        else:
            raise DeviceError(f"{self.name}: error queue did not empty after {MAX_ERRORS_READ} reads: {errors}")
        if errors:
            raise DeviceError(f"{self.name} reported SCPI error(s): {'; '.join(errors)}")

    def set_source(self, voltage: float, current_limit: float) -> None:
        """Set the compliance first, then the voltage (V, A); validated against the model's ranges."""
        self.current_limit = current_limit
        self.source_voltage = voltage

    def shutdown(self) -> None:
        """Turn the output off."""
        self.output_enabled = False

    @contextmanager
    def powered(self, voltage: float, current_limit: float) -> Iterator[SourceSupply]:
        """Source ``voltage`` (V) with ``current_limit`` (A) for the block; the output is off after it, always."""
        # validate both before anything is sent, so a bad value leaves the instrument untouched
        Range("v_min", "v_max", "V")(voltage, self, "source_voltage")
        Range("i_min", "i_max", "A")(current_limit, self, "current_limit")
        try:
            self.configure()
            self.set_source(voltage, current_limit)
            self.check_errors()
            self.output_enabled = True
            yield self
        except BaseException as exc:
            try:
                self.shutdown()
            except CimError as off_err:
                exc.add_note(f"and turning the output of {self.name} off failed too: {off_err}")
            raise
        self.shutdown()


class _KeithleySourceMeter(SourceSupply):
    """What the Keithley 24xx SourceMeters share: ranges, source voltage, output, current measurement."""

    v_min, v_max = -210.0, 210.0
    i_min, i_max = 1e-9, 1.05

    source_voltage = Instrument.control(
        ":SOUR:VOLT?", ":SOUR:VOLT %E", "Control the source voltage (V).", validator=Range("v_min", "v_max", "V")
    )
    output_enabled = Instrument.control(
        ":OUTP?", ":OUTP %d", "Control whether the output is on (bool).", validator=boolean, parse=scpi_bool
    )
    current = Instrument.measurement(":MEAS:CURR?", "Measure the output current (A); one triggered reading.")

    def configure(self) -> None:
        self.write(":SOUR:FUNC VOLT")
        self.write(':SENS:FUNC "CURR"')


class Keithley2400(_KeithleySourceMeter):
    """Keithley 2400-series SourceMeter (2400/2401/2410/2420/2425/2430/2440), SCPI mode, front terminals."""

    model = "keithley2400"
    idn_pattern = r"KEITHLEY.*MODEL 24[0-4]\d\b"

    current_limit = Instrument.control(
        ":SENS:CURR:PROT?", ":SENS:CURR:PROT %E", "Control the current compliance (A).",
        validator=Range("i_min", "i_max", "A"),
    )

    def configure(self) -> None:
        super().configure()
        self.write(":FORM:ELEM CURR")


class Keithley2450(_KeithleySourceMeter):
    """Keithley 2450/2460/2461/2470 SourceMeter in its SCPI command set."""

    model = "keithley2450"
    idn_pattern = r"KEITHLEY.*MODEL 24[5-7]\d\b"

    current_limit = Instrument.control(
        ":SOUR:VOLT:ILIM?", ":SOUR:VOLT:ILIM %E", "Control the current limit while sourcing voltage (A).",
        validator=Range("i_min", "i_max", "A"),
    )


class KeysightE36xx(SourceSupply):
    """Keysight/Agilent E36xx DC supply (E3631A, E364xA, E36312A ...): APPL/VOLT/CURR/OUTP/MEAS:CURR?.

    Args:
        adapter: the transport.
        channel: output to use on multi-output models (``P6V``, ``CH1`` ...); ``None`` on single-output ones.
        v_max, i_max: the output's ratings, V and A (defaults: the 6 V / 5 A output of an E3631A or E36312A).
    """

    model = "e36xx"
    idn_pattern = r"(KEYSIGHT|AGILENT|HEWLETT-PACKARD).*,E36\d\d"
    error_query = "SYST:ERR?"

    source_voltage = Instrument.control(
        "VOLT?", "VOLT %E", "Control the output voltage setting (V).", validator=Range("v_min", "v_max", "V")
    )
    current_limit = Instrument.control(
        "CURR?", "CURR %E", "Control the output current limit (A).", validator=Range("i_min", "i_max", "A")
    )
    output_enabled = Instrument.control(
        "OUTP?", "OUTP %d", "Control whether the output is on (bool).", validator=boolean, parse=scpi_bool
    )
    current = Instrument.measurement("MEAS:CURR?", "Measure the output current (A).")

    def __init__(self, adapter: Adapter, *, channel: str | None = None, v_max: float = 6.18,
                 i_max: float = 5.15) -> None:
        super().__init__(adapter)
        if channel is not None and not re.fullmatch(r"[A-Za-z0-9+\-]{1,8}", channel):
            raise ConfigError(f"E36xx channel {channel!r} is not an output name such as P6V or CH1")
        if not (v_max > 0 and i_max > 0):
            raise ConfigError(f"E36xx ratings must be positive, got v_max={v_max} V, i_max={i_max} A")
        self.channel = channel
        self.v_min, self.v_max, self.i_min, self.i_max = 0.0, float(v_max), 0.0, float(i_max)

    def configure(self) -> None:
        if self.channel is not None:
            self.write(f"INST:SEL {self.channel}")

    def set_source(self, voltage: float, current_limit: float) -> None:
        """APPL sets the voltage and the current limit in one command (V, A)."""
        v = Range("v_min", "v_max", "V")(voltage, self, "source_voltage")
        i = Range("i_min", "i_max", "A")(current_limit, self, "current_limit")
        self.write(f"APPL {v:E},{i:E}")


SUPPLIES: dict[str, type[SourceSupply]] = {
    cls.model: cls for cls in (Keithley2400, Keithley2450, KeysightE36xx)
}
"""model name -> driver class (for ``--smu-model``)."""


def driver_for_idn(idn: str) -> type[SourceSupply]:
    """The driver class whose ``idn_pattern`` matches an ``*IDN?`` reply; ConfigError naming the known models."""
    for cls in SUPPLIES.values():
        if re.search(cls.idn_pattern, idn, flags=re.IGNORECASE):
            return cls
    raise ConfigError(f"no supply driver for instrument {idn!r}; known models: {', '.join(SUPPLIES)}")


def open_supply(
    resource: str, visa_library: str = "", *, model: str = "auto", timeout: float = 2.0, channel: str | None = None
) -> SourceSupply:
    """Open ``resource`` and return its driver (by ``*IDN?`` when ``model`` is ``"auto"``); close it after use."""
    if model != "auto" and model not in SUPPLIES:
        raise ConfigError(f"supply model {model!r} is not one of auto, {', '.join(SUPPLIES)}")
    adapter = VisaAdapter(resource, visa_library, timeout=timeout)
    try:
        if model == "auto":
            idn = adapter.query("*IDN?")
            if not idn:
                raise ConfigError(f"the instrument at {resource!r} answered *IDN? with nothing; give --smu-model")
            cls = driver_for_idn(idn)
        else:
            cls = SUPPLIES[model]
        if cls is KeysightE36xx:
            return KeysightE36xx(adapter, channel=channel)
        if channel is not None:
            raise ConfigError(f"--channel applies to E36xx supplies only, not {cls.model}")
        return cls(adapter)
    except BaseException:
        adapter.close()
        raise


__all__ = [
    "SUPPLIES",
    "Keithley2400",
    "Keithley2450",
    "KeysightE36xx",
    "SourceSupply",
    "driver_for_idn",
    "open_supply",
]

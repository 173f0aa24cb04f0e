"""Supplies for the macro's VDD: PyMeasure's drivers behind one small cimlab interface that adds the safety.

::

    SupplyLimits   what the output may do: the chip's VDD range (from its profile) capped by the user's --vdd-max,
                   the current compliance, the ramp step and dwell
    BenchSupply    powered(volts) / set_voltage(volts) / read(): every setpoint is checked against the limits
                   before anything is sent; the compliance is set and the voltage zeroed before the output turns
                   on; the output ramps from 0 in steps; it is turned off on every way out (errors, Ctrl-C)
    open_supply()  identifies the instrument by *IDN? and picks its source: Keithley 2400 and 2450
                   (``pymeasure.instruments.keithley``), Keysight/Agilent E3631A and E36312A
                   (``pymeasure.instruments.keysight``), E364xA (``cimlab.instruments.keysight``)

A reading carries the instrument's own timestamp where the model gives one (2400: the TIME element; 2450: the
buffer's relative time), so the charge a sampler integrates uses the instrument's clock, not the host's.
VISA timeouts become ``CimTimeoutError`` and other VISA failures ``LinkError``, both naming the resource.
"""

from __future__ import annotations

import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from cimlab.firmware_bridge.errors import (
    BackendUnavailable,
    CimError,
    CimTimeoutError,
    ConfigError,
    DeviceError,
    LinkError,
)

if TYPE_CHECKING:
    from cimlab.chip_sim.config import Profile

log = logging.getLogger(__name__)
SCPI_LOG = logging.getLogger("cimlab.instruments.scpi")
"""Every SCPI command and reply, at DEBUG (PyMeasure's adapter logs them here)."""


# ---- limits -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SupplyLimits:
    """What a supply may do to the macro.

    Attributes:
        v_min, v_max: allowed output voltage while the chip runs, V (the chip's range, capped by --vdd-max).
        compliance_a: current limit, A.
        ramp_step_v: largest step while ramping, V.
        ramp_dwell_s: pause after each ramp step, s.
        source: where the limits come from, for messages.
    """

    v_min: float
    v_max: float
    compliance_a: float
    ramp_step_v: float = 0.05
    ramp_dwell_s: float = 0.002
    source: str = "the supply limits"

    def __post_init__(self) -> None:
        values = (self.v_min, self.v_max, self.compliance_a, self.ramp_step_v, self.ramp_dwell_s)
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"supply limits must be finite numbers, got {values}")
        if not 0 <= self.v_min <= self.v_max:
            raise ConfigError(f"supply range {self.v_min:g}..{self.v_max:g} V is empty or negative")
        if not self.compliance_a > 0:
            raise ConfigError(f"--compliance must be a positive current in A, got {self.compliance_a:g}")
        if not (self.ramp_step_v > 0 and self.ramp_dwell_s >= 0):
            raise ConfigError(f"ramp step must be > 0 V and dwell >= 0 s, got {self.ramp_step_v}, {self.ramp_dwell_s}")

    @classmethod
    def from_profile(cls, profile: Profile, *, vdd_max_v: float | None = None,
                     compliance_a: float | None = None) -> SupplyLimits:
        """The limits of a chip described by ``profile``: its VDD range, capped at ``vdd_max_v`` (V, default the
        chip's maximum; above it is refused), and ``compliance_a`` (A, default the profile's)."""
        a, s = profile.analog, profile.supply
        chip_max = a.vdd_max_mv / 1000.0
        source = f"profile {profile.name!r} (VDD {a.vdd_min_mv}..{a.vdd_max_mv} mV)"
        if vdd_max_v is not None:
            if not (math.isfinite(vdd_max_v) and vdd_max_v > 0):
                raise ConfigError(f"--vdd-max must be a positive voltage in V, got {vdd_max_v}")
            if vdd_max_v > chip_max:
                raise ConfigError(f"--vdd-max {vdd_max_v:g} V is above the chip's maximum {chip_max:g} V ({source})")
            if vdd_max_v < a.vdd_min_mv / 1000.0:
                raise ConfigError(f"--vdd-max {vdd_max_v:g} V is below the chip's minimum "
                                  f"{a.vdd_min_mv / 1000.0:g} V ({source})")
            source += f", --vdd-max {vdd_max_v:g} V"
        return cls(
            v_min=a.vdd_min_mv / 1000.0,
            v_max=chip_max if vdd_max_v is None else vdd_max_v,
            compliance_a=s.compliance_ma / 1000.0 if compliance_a is None else compliance_a,
            ramp_step_v=s.ramp_step_mv / 1000.0,
            ramp_dwell_s=s.ramp_dwell_ms / 1000.0,
            source=source,
        )

    def check(self, volts: float, what: str = "--vdd") -> float:
        """``volts`` as a float when inside ``v_min..v_max``; ConfigError naming the value, range and source."""
        if isinstance(volts, bool) or not isinstance(volts, int | float) or not math.isfinite(volts):
            raise ConfigError(f"{what}: {volts!r} is not a voltage in V")
        if not self.v_min <= volts <= self.v_max:
            hint = " (volts, not millivolts?)" if volts > 10 * self.v_max else ""
            raise ConfigError(f"{what} {volts:g} V is outside the allowed {self.v_min:g}..{self.v_max:g} V of "
                              f"{self.source}{hint}; nothing was sent to the supply")
        return float(volts)

    def ramp(self, start: float, stop: float) -> list[float]:
        """Setpoints from ``start`` to ``stop`` (V), no step larger than ``ramp_step_v``; ends at ``stop``."""
        n = max(1, math.ceil(abs(stop - start) / self.ramp_step_v - 1e-9))
        return [start + (stop - start) * k / n for k in range(1, n + 1)]


# ---- one output of one instrument ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reading:
    """One current reading."""

    amps: float
    """Current, A."""
    t_s: float | None
    """The instrument's timestamp of the reading, s (None: the model gives none)."""


def _float(value: Any, what: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LinkError(f"{name}: {what} reading {value!r} is not a number")
    return float(value)


class Source(ABC):
    """One output of one instrument, as BenchSupply drives it (a thin layer over a PyMeasure driver).

    Subclasses name the model (``model``), how to recognise it (``idn_pattern``, a regex on ``*IDN?``) and map
    the five operations onto the driver's properties.
    """

    model: ClassVar[str]
    idn_pattern: ClassVar[str]

    def __init__(self, instrument: Any) -> None:
        self.instrument = instrument

    @property
    def name(self) -> str:
        """The resource, for messages."""
        return str(getattr(self.instrument.adapter, "resource_name", None) or self.instrument.name)

    def configure(self) -> None:
        """Voltage source, current measurement (does not touch the output)."""

    @abstractmethod
    def set_compliance(self, amps: float) -> None:
        """Set the current limit, A."""

    @abstractmethod
    def set_voltage(self, volts: float) -> None:
        """Set the output voltage, V."""

    @abstractmethod
    def set_output(self, on: bool) -> None:
        """Turn the output on or off."""

    @abstractmethod
    def read(self) -> Reading:
        """One current reading."""

    def errors(self) -> list[str]:
        """The instrument's error queue, emptied (PyMeasure's ``check_errors``)."""
        return [", ".join(str(f) for f in e) for e in self.instrument.check_errors()]

    def close(self) -> None:
        """Release the VISA resource."""
        self.instrument.adapter.close()


class Keithley2400Source(Source):
    """Keithley 2400-series SourceMeter (2400/2401/2410/2420/2425/2430/2440) through PyMeasure's ``Keithley2400``.

    Its readings hold (voltage, current, resistance, time, status): the time is the instrument's timestamp.
    """

    model = "keithley2400"
    idn_pattern = r"KEITHLEY.*MODEL 24[0-4]\d\b"

    def configure(self) -> None:
        self.instrument.source_mode = "voltage"

    def set_compliance(self, amps: float) -> None:
        self.instrument.compliance_current = amps

    def set_voltage(self, volts: float) -> None:
        self.instrument.source_voltage = volts

    def set_output(self, on: bool) -> None:
        self.instrument.source_enabled = on

    def read(self) -> Reading:
        values = self.instrument.values(":MEASURE:CURRENT?")
        if len(values) < 4:
            raise LinkError(f"{self.name}: a reading has the elements {values}, expected V, I, R, TIME, STATUS")
        return Reading(_float(values[1], "current", self.name), _float(values[3], "time", self.name))


class Keithley2450Source(Source):
    """Keithley 2450/2460/2461/2470 SourceMeter (SCPI command set) through PyMeasure's ``Keithley2450``.

    Each reading is read with its relative timestamp from the default buffer.
    """

    model = "keithley2450"
    idn_pattern = r"KEITHLEY.*MODEL 24[5-7]\d\b"

    def configure(self) -> None:
        self.instrument.source_mode = "voltage"
        self.instrument.measure_current()

    def set_compliance(self, amps: float) -> None:
        self.instrument.compliance_current = amps

    def set_voltage(self, volts: float) -> None:
        self.instrument.source_voltage = volts

    def set_output(self, on: bool) -> None:
        if on:
            self.instrument.enable_source()
        else:
            self.instrument.disable_source()

    def read(self) -> Reading:
        values = self.instrument.values(':READ? "defbuffer1", READ, REL')
        if len(values) < 2:
            raise LinkError(f"{self.name}: a buffer reading has the elements {values}, expected READ, REL")
        return Reading(_float(values[0], "current", self.name), _float(values[1], "time", self.name))


class _ChannelSource(Source):
    """A supply whose outputs are PyMeasure channels (``voltage_setpoint``, ``current_limit``, ``output_enabled``,
    ``current``); the host clock times its readings."""

    def __init__(self, instrument: Any, channel: int = 1) -> None:
        super().__init__(instrument)
        if channel not in instrument.channels:
            raise ConfigError(f"{self.model} has outputs {sorted(instrument.channels)}, not {channel}")
        self.channel = instrument.channels[channel]

    def set_compliance(self, amps: float) -> None:
        self.channel.current_limit = amps

    def set_voltage(self, volts: float) -> None:
        self.channel.voltage_setpoint = volts

    def set_output(self, on: bool) -> None:
        self.channel.output_enabled = on

    def read(self) -> Reading:
        return Reading(_float(self.channel.current, "current", self.name), None)


class KeysightE36312ASource(_ChannelSource):
    """Keysight E36312A/E36313A triple output through PyMeasure's ``KeysightE36312A``."""

    model = "e36312a"
    idn_pattern = r"(KEYSIGHT|AGILENT).*,E3631[23]A"


class KeysightE3631ASource(_ChannelSource):
    """Keysight/Agilent E3631A triple output through PyMeasure's ``KeysightE3631A``."""

    model = "e3631a"
    idn_pattern = r"(KEYSIGHT|AGILENT|HEWLETT-PACKARD).*,E3631A"


class KeysightE364xASource(Source):
    """Keysight/Agilent E3640A..E3649A through ``cimlab.instruments.keysight.KeysightE364xA``."""

    model = "e364xa"
    idn_pattern = r"(KEYSIGHT|AGILENT|HEWLETT-PACKARD).*,E364\dA"

    def __init__(self, instrument: Any, channel: int = 1) -> None:
        super().__init__(instrument)
        if channel not in (1, 2):
            raise ConfigError(f"an E364xA has outputs 1 and 2, not {channel}")
        self.channel = channel

    def configure(self) -> None:
        self.instrument.output_selected = self.channel

    def set_compliance(self, amps: float) -> None:
        self.instrument.current_limit = amps

    def set_voltage(self, volts: float) -> None:
        self.instrument.voltage_setpoint = volts

    def set_output(self, on: bool) -> None:
        self.instrument.output_enabled = on

    def read(self) -> Reading:
        return Reading(_float(self.instrument.current, "current", self.name), None)


def _driver_class(model: str) -> type:
    """The PyMeasure (or PyMeasure-style) driver class of a model, imported when first needed."""
    if model == "keithley2400":
        from pymeasure.instruments.keithley import Keithley2400

        return Keithley2400
    if model == "keithley2450":
        from pymeasure.instruments.keithley import Keithley2450

        return Keithley2450
    if model == "e36312a":
        from pymeasure.instruments.keysight import KeysightE36312A

        return KeysightE36312A
    if model == "e3631a":
        from pymeasure.instruments.keysight import KeysightE3631A

        return KeysightE3631A
    from cimlab.instruments.keysight import KeysightE364xA

    return KeysightE364xA


SOURCES: dict[str, type[Source]] = {
    cls.model: cls for cls in (Keithley2400Source, Keithley2450Source, KeysightE36312ASource, KeysightE3631ASource,
                               KeysightE364xASource)
}
"""model name -> source class (``--smu-model``)."""
SUPPLY_MODELS = ("auto", *SOURCES)


def source_for_idn(idn: str) -> type[Source]:
    """The source class whose ``idn_pattern`` matches an ``*IDN?`` reply; ConfigError naming the known models."""
    for cls in SOURCES.values():
        if re.search(cls.idn_pattern, idn, flags=re.IGNORECASE):
            return cls
    raise ConfigError(f"no supply driver for instrument {idn!r}; known models: {', '.join(SOURCES)} "
                      "(give --smu-model to force one)")


# ---- the cimlab supply --------------------------------------------------------------------------------------------
class BenchSupply:
    """A supply that powers the macro within ``limits`` (see the module docstring).

    Args:
        source: the instrument's output.
        limits: what it may do.
        sleep: how to wait between ramp steps (tests pass a no-op).
    """

    def __init__(self, source: Source, limits: SupplyLimits, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.source = source
        self.limits = limits
        self._sleep = sleep
        self._volts = 0.0
        self._on = False

    @property
    def name(self) -> str:
        """The resource, for messages."""
        return self.source.name

    @property
    def volts(self) -> float:
        """The present setpoint, V (0 while off)."""
        return self._volts if self._on else 0.0

    @contextmanager
    def _visa(self, what: str) -> Iterator[None]:
        """VISA errors -> CimTimeoutError / LinkError naming the resource and the step."""
        import pyvisa.errors

        try:
            yield
        except pyvisa.errors.VisaIOError as err:
            if err.error_code == pyvisa.constants.StatusCode.error_timeout:
                raise CimTimeoutError(f"supply {self.name} did not answer ({what}) before its timeout") from err
            raise LinkError(f"supply {self.name} failed ({what}): {err}") from err
        except (pyvisa.errors.Error, OSError) as err:
            raise LinkError(f"supply {self.name} failed ({what}): {err}") from err
        except ValueError as err:  # PyMeasure's validators: a value the model cannot take
            raise ConfigError(f"supply {self.name} ({self.source.model}) refused {what}: {err}") from err

    def _check_errors(self, what: str) -> None:
        with self._visa("reading its error queue"):
            errors = self.source.errors()
        if errors:
            raise DeviceError(f"supply {self.name} reported SCPI error(s) after {what}: {'; '.join(errors)}")

    def _step_to(self, volts: float) -> None:
        """Ramp the output from the present setpoint to ``volts`` (already checked)."""
        for v in self.limits.ramp(self._volts, volts):
            with self._visa(f"setting {v:g} V"):
                self.source.set_voltage(v)
            self._volts = v
            self._sleep(self.limits.ramp_dwell_s)

    @contextmanager
    def powered(self, volts: float) -> Iterator[BenchSupply]:
        """Source ``volts`` (V) for the block: checked first, compliance set and voltage zeroed before the output
        turns on, ramped up from 0; ramped down and turned off after the block, turned off at once on errors."""
        target = self.limits.check(volts)
        try:
            with self._visa("configuring the output"):
                self.source.set_output(False)
                self.source.configure()
                self.source.set_compliance(self.limits.compliance_a)
                self.source.set_voltage(0.0)
            self._volts = 0.0
            self._check_errors("setting the compliance and 0 V")
            with self._visa("turning the output on"):
                self.source.set_output(True)
            self._on = True
            log.info("%s: output on, compliance %g A, ramping to %g V", self.name, self.limits.compliance_a, target)
            self._step_to(target)
            yield self
        except BaseException as exc:
            try:
                self.off()
            except CimError as off_err:
                exc.add_note(f"and turning the output of {self.name} off failed too: {off_err}")
            raise
        self._step_to(0.0)
        self.off()

    def set_voltage(self, volts: float) -> None:
        """Ramp a powered output to ``volts`` (V, checked against the limits first)."""
        target = self.limits.check(volts)
        if not self._on:
            raise ConfigError("set_voltage needs a powered output: use BenchSupply.powered(volts)")
        self._step_to(target)
        self._check_errors(f"setting {target:g} V")

    def off(self) -> None:
        """Turn the output off and the setpoint to 0 V."""
        with self._visa("turning the output off"):
            self.source.set_output(False)
            self._on = False
            self.source.set_voltage(0.0)
        self._volts = 0.0
        log.info("%s: output off", self.name)

    def read(self) -> Reading:
        """One current reading (A, with the instrument's timestamp where it gives one)."""
        with self._visa("reading the current"):
            return self.source.read()

    def close(self) -> None:
        """Release the instrument (the output is left as it is: ``powered`` turns it off)."""
        with self._visa("closing"):
            self.source.close()


def open_supply(resource: str, limits: SupplyLimits, visa_library: str = "", *, model: str = "auto",
                channel: int = 1, timeout_s: float = 2.0) -> BenchSupply:
    """Open ``resource`` (a VISA resource name; ``visa_library`` ``""``, ``@py`` or ``FILE.yaml@sim``), identify
    it by ``*IDN?`` unless ``model`` names it, and return a BenchSupply over it. Close it after use."""
    if model != "auto" and model not in SOURCES:
        raise ConfigError(f"supply model {model!r} is not one of {', '.join(SUPPLY_MODELS)}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ConfigError(f"instrument timeout must be positive seconds, got {timeout_s}")
    try:
        import pyvisa
        from pymeasure.adapters import VISAAdapter
    except ImportError as err:  # pragma: no cover - core dependencies
        raise BackendUnavailable(f"instruments need pymeasure and pyvisa, which did not import: {err}") from err
    try:
        adapter = VISAAdapter(resource, visa_library, log=SCPI_LOG, timeout=round(timeout_s * 1000),
                              read_termination="\n", write_termination="\n")
    except (pyvisa.errors.Error, OSError, ValueError) as err:
        where = visa_library or "the system VISA"
        raise LinkError(f"cannot open supply {resource!r} ({where}): {err}") from err
    try:
        if model == "auto":
            try:
                adapter.write("*IDN?")
                idn = adapter.read().strip()
            except pyvisa.errors.Error as err:
                raise LinkError(f"supply {resource!r} did not answer *IDN? ({err}); check the resource, or "
                                "give --smu-model") from err
            if not idn:
                raise ConfigError(f"the instrument at {resource!r} answered *IDN? with nothing; give --smu-model")
            cls = source_for_idn(idn)
        else:
            cls = SOURCES[model]
        instrument = _driver_class(cls.model)(adapter)
        source = cls(instrument, channel) if issubclass(cls, _ChannelSource | KeysightE364xASource) else cls(instrument)
        if channel != 1 and not issubclass(cls, _ChannelSource | KeysightE364xASource):
            raise ConfigError(f"--smu-channel applies to multi-output supplies, not a {cls.model}")
        log.info("supply %s: %s", resource, cls.model)
        return BenchSupply(source, limits)
    except BaseException:
        adapter.close()
        raise


__all__ = [
    "SCPI_LOG",
    "SOURCES",
    "SUPPLY_MODELS",
    "BenchSupply",
    "Keithley2400Source",
    "Keithley2450Source",
    "KeysightE364xASource",
    "KeysightE3631ASource",
    "KeysightE36312ASource",
    "Reading",
    "Source",
    "SupplyLimits",
    "open_supply",
    "source_for_idn",
]

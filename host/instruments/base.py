"""Declarative SCPI instruments: properties with units and validators, over a VISA resource or a test adapter.

An instrument class lists its settings as descriptors, PyMeasure-style::

    class Supply(Instrument):
        voltage = Instrument.control("VOLT?", "VOLT %E", "Control the output voltage (V).",
                                     validator=Range(0.0, "v_max", "V"))

``control`` reads and writes, ``measurement`` only reads, ``setting`` only writes. A validator gets the value and
the instrument (bounds given as attribute names are read from the instance, so a model's limits live in one place)
and raises ``ConfigError`` naming the property, the allowed range and the unit.

Every command goes through an adapter with ``write(text)``, ``query(text) -> str`` and ``close()``:
``VisaAdapter`` (pyvisa; ``visa_library="path.yaml@sim"`` for pyvisa-sim) or the test helper
``cimlab.instruments.testing.ProtocolAdapter``. Every read has the adapter's timeout as its deadline; VISA timeouts
become ``CimTimeoutError`` and other VISA failures ``LinkError``, both naming the resource and the command.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, Self

from cimlab.firmware_bridge.errors import BackendUnavailable, CimTimeoutError, ConfigError, LinkError


class Adapter(Protocol):
    """What an instrument needs from its transport."""

    name: str

    def write(self, command: str) -> None:
        """Send one command."""

    def query(self, command: str) -> str:
        """Send one command and return its reply without the termination."""

    def close(self) -> None:
        """Release the transport."""


class VisaAdapter:
    """A pyvisa message-based resource.

    Args:
        resource: VISA resource name, e.g. ``GPIB0::24::INSTR`` or ``USB0::0x05E6::0x2450::04000001::INSTR``.
        visa_library: pyvisa backend: ``""`` (the system VISA), ``@py`` (pyvisa-py) or ``FILE.yaml@sim``.
        timeout: deadline of every read, seconds.
        read_termination, write_termination: message terminators.
    """

    def __init__(
        self,
        resource: str,
        visa_library: str = "",
        *,
        timeout: float = 2.0,
        read_termination: str = "\n",
        write_termination: str = "\n",
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"instrument timeout must be positive seconds, got {timeout}")
        try:
            import pyvisa
            import pyvisa.errors
        except ImportError as err:  # pragma: no cover - pyvisa is a core dependency
            raise BackendUnavailable(f"instruments need pyvisa, which did not import: {err}") from err
        self._errors = pyvisa.errors
        self.name = resource
        try:
            self._rm = pyvisa.ResourceManager(visa_library)
        except (OSError, ValueError, pyvisa.errors.Error) as err:
            raise BackendUnavailable(
                f"VISA library {visa_library or '(system default)'!r} is not usable: {err}"
            ) from err
        try:
            self._res = self._rm.open_resource(
                resource,
                timeout=round(timeout * 1000),
                read_termination=read_termination,
                write_termination=write_termination,
            )
        except Exception as err:
            self._rm.close()
            if isinstance(err, pyvisa.errors.Error | ValueError | OSError):
                where = visa_library or "system VISA"
                raise LinkError(f"cannot open instrument {resource!r} ({where}): {err}") from err
            raise

    def _translate(self, err: Exception, command: str) -> Exception:
        if isinstance(err, self._errors.VisaIOError) and err.error_code == self._errors.StatusCode.error_timeout:
            return CimTimeoutError(f"instrument {self.name!r} did not answer {command!r} before its timeout")
        return LinkError(f"instrument {self.name!r} failed on {command!r}: {err}")

    def write(self, command: str) -> None:
        try:
            self._res.write(command)
        except self._errors.Error as err:
            raise self._translate(err, command) from err

    def query(self, command: str) -> str:
        try:
            return str(self._res.query(command)).strip()
        except self._errors.Error as err:
            raise self._translate(err, command) from err

    def close(self) -> None:
        try:
            self._res.close()
        finally:
            self._rm.close()


# ---- validators -------------------------------------------------------------------------------------------------
Bound = float | str


class Range:
    """Accept numbers in ``lo .. hi`` (bounds may name attributes of the instrument), in ``unit``."""

    def __init__(self, lo: Bound, hi: Bound, unit: str) -> None:
        self.lo, self.hi, self.unit = lo, hi, unit

    def __call__(self, value: Any, inst: Instrument, name: str) -> float:
        lo = float(getattr(inst, self.lo) if isinstance(self.lo, str) else self.lo)
        hi = float(getattr(inst, self.hi) if isinstance(self.hi, str) else self.hi)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{type(inst).__name__}.{name} must be a number ({self.unit}), got {value!r}")
        v = float(value)
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ConfigError(
                f"{type(inst).__name__}.{name}={value!r} is outside the allowed range {lo:g}..{hi:g} {self.unit}"
            )
        return v


class Choice:
    """Accept one of ``values``."""

    def __init__(self, values: Sequence[Any]) -> None:
        self.values = tuple(values)

    def __call__(self, value: Any, inst: Instrument, name: str) -> Any:
        if value not in self.values:
            allowed = ", ".join(repr(v) for v in self.values)
            raise ConfigError(f"{type(inst).__name__}.{name}={value!r} is not one of {allowed}")
        return value


def boolean(value: Any, inst: Instrument, name: str) -> int:
    """Accept a bool (or 0/1); the wire value is 1 or 0."""
    if value not in (True, False, 0, 1):
        raise ConfigError(f"{type(inst).__name__}.{name} must be a boolean, got {value!r}")
    return int(bool(value))


Validator = Callable[[Any, "Instrument", str], Any]


def first_float(reply: str) -> float:
    """The first comma-separated field of a reply as a float (SCPI readings may carry several)."""
    text = reply.split(",", 1)[0].strip()
    try:
        return float(text)
    except ValueError:
        raise LinkError(f"instrument reply {reply!r} is not a number") from None


def scpi_bool(reply: str) -> bool:
    """``1``/``0``/``ON``/``OFF`` -> bool."""
    text = reply.strip().upper()
    if text in ("1", "ON"):
        return True
    if text in ("0", "OFF"):
        return False
    raise LinkError(f"instrument reply {reply!r} is not a boolean")


class Property:
    """A declarative instrument property (see ``Instrument.control``)."""

    def __init__(
        self,
        get_command: str | None,
        set_command: str | None,
        doc: str,
        *,
        validator: Validator | None = None,
        parse: Callable[[str], Any] = first_float,
    ) -> None:
        self.get_command = get_command
        self.set_command = set_command
        self.validator = validator
        self.parse = parse
        self.name = ""
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, inst: Instrument | None, owner: type) -> Any:
        if inst is None:
            return self
        if self.get_command is None:
            raise AttributeError(f"{owner.__name__}.{self.name} can only be set")
        return self.parse(inst.query(self.get_command))

    def __set__(self, inst: Instrument, value: Any) -> None:
        if self.set_command is None:
            raise AttributeError(f"{type(inst).__name__}.{self.name} can only be read")
        if self.validator is not None:
            value = self.validator(value, inst, self.name)
        inst.write(self.set_command % value)


class Instrument:
    """Base of every SCPI instrument driver.

    Args:
        adapter: the transport (``VisaAdapter`` or a test adapter); the instrument owns and closes it.
    """

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    @staticmethod
    def control(get_command: str, set_command: str, doc: str, *, validator: Validator | None = None,
                parse: Callable[[str], Any] = first_float) -> Any:
        """A property that is read with ``get_command`` and written with ``set_command % value``."""
        return Property(get_command, set_command, doc, validator=validator, parse=parse)

    @staticmethod
    def measurement(get_command: str, doc: str, *, parse: Callable[[str], Any] = first_float) -> Any:
        """A read-only property."""
        return Property(get_command, None, doc, parse=parse)

    @staticmethod
    def setting(set_command: str, doc: str, *, validator: Validator | None = None) -> Any:
        """A write-only property."""
        return Property(None, set_command, doc, validator=validator)

    @property
    def name(self) -> str:
        """The resource this instrument talks to."""
        return self.adapter.name

    def write(self, command: str) -> None:
        """Send one SCPI command."""
        self.adapter.write(command)

    def query(self, command: str) -> str:
        """Send one SCPI query; its reply (stripped)."""
        return self.adapter.query(command)

    def close(self) -> None:
        """Release the transport."""
        self.adapter.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "Adapter",
    "Choice",
    "Instrument",
    "Property",
    "Range",
    "VisaAdapter",
    "boolean",
    "first_float",
    "scpi_bool",
]

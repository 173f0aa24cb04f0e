"""A simulated SMU that powers a served twin, reached as an instrument: ``cimlab sim serve --smu 127.0.0.1:0``.

The host drives it as it drives a bench SMU: over VISA (``TCPIP::127.0.0.1::PORT::SOCKET`` with pyvisa-py,
``--visa-library @py``), identified by ``*IDN?``, through PyMeasure's Keithley 2400 driver. It speaks the subset of
a Keithley 2400's SCPI that the driver sends (below). Nothing on the host side knows it is simulated.

What it simulates:

- **the supply**: while the output is on, its voltage setpoint is the twin's VDD (the ``VDD_MV`` register is
  written with it, so gain, noise and energy follow); a setpoint outside the twin's operating range leaves the
  twin where it was (a real macro would brown out or be damaged) and is logged as a warning;
- **the ammeter**: the twin's time is its cycle counter (cycles / clock_hz). Each ``:MEASURE:CURRENT?`` returns
  the mean current since the previous reading, ``(energy counter delta) / (VDD * chip-time delta)`` (an integrating
  meter, clipped at the compliance), with the chip time of the reading as its TIME element; a reading with no chip
  time since the previous one repeats the previous current. The charge the host sums from these readings is then
  exactly the energy counters' over VDD, to the meter's resolution (7 significant digits). With the output off it
  reads 0 A, and the twin runs on its ``VDD_MV`` register as on a board's own regulator.

Accepted SCPI (long forms as PyMeasure writes them, colon optional, case-insensitive, ``;`` joins commands)::

    *IDN?  *RST  *CLS  SYST:ERR?  :FORMAT:ELEMENTS <list>  :SOURCE:FUNCTION VOLT|?  :SOURCE:VOLTAGE <V>|?
    :SENSE:CURRENT:PROTECTION <A>|?  OUTPUT 0|1|?  :MEASURE:CURRENT?

It serves loopback only, one client at a time, lines of at most ``MAX_LINE`` bytes.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from cimlab.firmware_bridge.controller import Controller, Counters, Identity, OpCost
from cimlab.firmware_bridge.errors import ConfigError, DeviceError, LinkError
from cimlab.firmware_bridge.registers import BY_NAME

log = logging.getLogger(__name__)
MAX_LINE = 4096
"""Longest command line accepted, bytes."""
ELEMENTS = ("VOLT", "CURR", "RES", "TIME", "STAT")
NOT_A_NUMBER = 9.91e37
"""What a 2400 returns for an element it did not measure."""


class PoweredTwin(Controller):
    """A twin controller whose operations are serialised with its simulated supply, and whose chip time and
    energy are accumulated monotonically (a RESET or a counter clear does not rewind them).

    Args:
        twin: the twin's controller (``cimlab.chip_sim.TwinController``).
    """

    def __init__(self, twin: Any) -> None:
        self.twin = twin
        self.spec = twin.spec
        self.lock = threading.Lock()
        self.cycles = 0
        self.energy_fj = 0

    def _costed(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.lock:
            out = fn(*args)
            last = self.twin.counters().last
            self.cycles += last.cycles
            self.energy_fj += last.energy_fj
            return out

    def identity(self) -> Identity:
        return self.twin.identity()

    def reset(self, clear_weights: bool) -> None:
        with self.lock:
            self.twin.reset(clear_weights)

    def read_reg(self, addr: int) -> int:
        with self.lock:
            return self.twin.read_reg(addr)

    def write_reg(self, addr: int, value: int) -> int:
        with self.lock:
            return self.twin.write_reg(addr, value)

    def write_weights(self, row_start: int, weights: np.ndarray) -> None:
        self._costed(self.twin.write_weights, row_start, weights)

    def read_weights(self, row_start: int, n_rows: int) -> np.ndarray:
        with self.lock:
            return self.twin.read_weights(row_start, n_rows)

    def mac(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        return self._costed(self.twin.mac, row_start, inputs)

    def mac_raw(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        return self._costed(self.twin.mac_raw, row_start, inputs)

    def counters(self) -> Counters:
        with self.lock:
            return self.twin.counters()

    def note_error(self, flags: int) -> None:
        with self.lock:
            self.twin.note_error(flags)

    def snapshot(self) -> tuple[float, int]:
        """(chip time in s, energy in fJ), consistent with each other."""
        with self.lock:
            return self.cycles / self.spec.clock_hz, self.energy_fj

    def apply_supply(self, volts: float) -> bool:
        """Write the twin's VDD_MV from a supply voltage; False (twin untouched) outside its range."""
        mv = round(volts * 1000)
        a = self.twin.profile.analog
        if mv < a.vdd_min_mv:  # ramping up or down: the macro is browned out, no operation runs meanwhile
            log.debug("simulated SMU at %g V: below the twin's %d mV, the twin waits", volts, a.vdd_min_mv)
            return False
        with self.lock:
            try:
                self.twin.write_reg(BY_NAME["VDD_MV"].addr, mv)
            except DeviceError as err:
                log.warning("simulated SMU at %g V: %s; a real macro would be damaged; the twin stays at "
                            "VDD_MV=%d", volts, err, self.twin.vdd_mv)
                return False
        return True


class SimSMU:
    """The instrument's state and its SCPI (see the module docstring).

    Args:
        twin: the powered twin it supplies.
        max_volts, max_amps: the instrument's ranges (a 2400: 21 V on its 20 V range, 1.05 A).
    """

    def __init__(self, twin: PoweredTwin, *, max_volts: float = 21.0, max_amps: float = 1.05) -> None:
        self.twin = twin
        self.max_volts = max_volts
        self.max_amps = max_amps
        self.errors: deque[str] = deque(maxlen=32)
        self.reset()

    def reset(self) -> None:
        """*RST: output off, 0 V, compliance 105 uA, the 2400's default elements."""
        self.output = False
        self.volts = 0.0
        self.compliance = 1.05e-4
        self.elements = list(ELEMENTS)
        self.last_amps = 0.0
        self.t_prev, self.e_prev = self.twin.snapshot()

    # ---- the meter --------------------------------------------------------------------------------------------
    def measure(self) -> str:
        """One reading: the mean current since the previous one (see the module docstring)."""
        t, e = self.twin.snapshot()
        dt, de = t - self.t_prev, e - self.e_prev
        self.t_prev, self.e_prev = t, e
        if not self.output or self.volts <= 0:
            self.last_amps = 0.0
        elif dt > 0:
            self.last_amps = min(de * 1e-15 / (self.volts * dt), self.compliance)
        values = {"VOLT": self.volts if self.output else 0.0, "CURR": self.last_amps, "RES": NOT_A_NUMBER,
                  "TIME": t, "STAT": 0.0}
        return ",".join(f"{values[k]:+.9E}" if k == "TIME" else f"{values[k]:+.6E}" for k in self.elements)

    # ---- the source -------------------------------------------------------------------------------------------
    def _set_output(self, on: bool) -> None:
        self.measure()  # close the meter's interval at the old state
        self.output = on
        if on:
            self.twin.apply_supply(self.volts)

    def _set_volts(self, volts: float) -> None:
        if not -self.max_volts <= volts <= self.max_volts:
            raise _ScpiError('-222,"Data out of range"')
        self.measure()
        self.volts = volts
        if self.output:
            self.twin.apply_supply(volts)

    def _set_compliance(self, amps: float) -> None:
        if not 0 < amps <= self.max_amps:
            raise _ScpiError('-222,"Data out of range"')
        self.compliance = amps

    def _set_elements(self, text: str) -> None:
        names = [part.strip().upper() for part in text.split(",") if part.strip()]
        chosen = []
        for name in names:
            match = [k for k in ELEMENTS if name.startswith(k)]
            if not match:
                raise _ScpiError('-224,"Illegal parameter value"')
            chosen.append(match[0])
        self.elements = chosen

    # ---- SCPI ---------------------------------------------------------------------------------------------------
    def handle(self, line: str) -> list[str]:
        """Execute one line of commands; the replies of its queries."""
        replies = []
        for command in line.split(";"):
            command = command.strip()
            if not command:
                continue
            try:
                reply = self._one(command)
            except _ScpiError as err:
                self.errors.append(str(err))
                log.debug("simulated SMU: %r -> error %s", command, err)
                continue
            if reply is not None:
                replies.append(reply)
        return replies

    def _one(self, command: str) -> str | None:
        header, _, arg = command.partition(" ")
        header = header.lstrip(":").upper()
        arg = arg.strip()
        if header == "*IDN?":
            chip = self.twin.identity().chip_id
            return f"KEITHLEY INSTRUMENTS INC.,MODEL 2400,SIM-{chip},cimlab simulated SMU"
        if header == "*RST":
            self.reset()
            return None
        if header == "*CLS":
            self.errors.clear()
            return None
        if header in ("SYST:ERR?", "SYSTEM:ERROR?", "SYST:ERR:NEXT?", "SYSTEM:ERROR:NEXT?"):
            return self.errors.popleft() if self.errors else '0,"No error"'
        if header in ("FORMAT:ELEMENTS", "FORM:ELEM"):
            self._set_elements(arg)
            return None
        if header in ("SOURCE:FUNCTION", "SOUR:FUNC"):
            if arg.upper() not in ("VOLT", "VOLTAGE"):
                raise _ScpiError('-221,"Settings conflict; this simulated SMU sources voltage only"')
            return None
        if header in ("SOURCE:FUNCTION?", "SOUR:FUNC?"):
            return "VOLT"
        if header in ("SOURCE:VOLTAGE", "SOUR:VOLT", "SOURCE:VOLTAGE:LEVEL", "SOUR:VOLT:LEV"):
            self._set_volts(_number(arg))
            return None
        if header in ("SOURCE:VOLTAGE?", "SOUR:VOLT?"):
            return f"{self.volts:+.6E}"
        if header in ("SENSE:CURRENT:PROTECTION", "SENS:CURR:PROT"):
            self._set_compliance(_number(arg))
            return None
        if header in ("SENSE:CURRENT:PROTECTION?", "SENS:CURR:PROT?"):
            return f"{self.compliance:+.6E}"
        if header in ("OUTPUT", "OUTP"):
            if arg.upper() not in ("0", "1", "ON", "OFF"):
                raise _ScpiError('-224,"Illegal parameter value"')
            self._set_output(arg.upper() in ("1", "ON"))
            return None
        if header in ("OUTPUT?", "OUTP?"):
            return "1" if self.output else "0"
        if header in ("MEASURE:CURRENT?", "MEAS:CURR?", "READ?"):
            return self.measure()
        raise _ScpiError('-113,"Undefined header"')


class _ScpiError(Exception):
    """An entry for the error queue (code and text, as SYST:ERR? returns it)."""


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _ScpiError('-104,"Data type error"') from None
    if not math.isfinite(value):
        raise _ScpiError('-222,"Data out of range"')
    return value


def serve_smu(smu: SimSMU, host: str, port: int, *, stop: threading.Event,
              on_ready: Callable[[str], None], poll_s: float = 0.1) -> None:
    """Serve ``smu`` on a raw SCPI socket (loopback only) until ``stop`` is set; ``on_ready`` gets its VISA
    resource name ``TCPIP::HOST::PORT::SOCKET``."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"the simulated SMU serves loopback only (127.0.0.1 or ::1), not {host!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as err:
            raise LinkError(f"cannot listen on {host}:{port} for the simulated SMU: {err.strerror or err}") from err
        listener.listen(1)
        bound_host, bound_port = listener.getsockname()[:2]
        on_ready(f"TCPIP::{bound_host}::{bound_port}::SOCKET")
        while not stop.is_set():
            if not select.select([listener], [], [], poll_s)[0]:
                continue
            conn, _ = listener.accept()
            with conn:
                _serve_client(smu, conn, stop, poll_s)
    finally:
        listener.close()


def _serve_client(smu: SimSMU, conn: socket.socket, stop: threading.Event, poll_s: float) -> None:
    buf = b""
    while not stop.is_set():
        if not select.select([conn], [], [], poll_s)[0]:
            continue
        try:
            chunk = conn.recv(MAX_LINE)
        except ConnectionError:
            return
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode("ascii", "replace").strip()
            log.debug("simulated SMU <- %s", line)
            replies = smu.handle(line)
            for reply in replies:
                log.debug("simulated SMU -> %s", reply)
            if replies:
                try:
                    conn.sendall((";".join(replies) + "\n").encode("ascii"))
                except ConnectionError:
                    return
        if len(buf) > MAX_LINE:
            smu.errors.append('-223,"Too much data"')
            buf = b""


def start_smu(twin: Any, host: str, port: int, *, stop: threading.Event,
              start_timeout_s: float = 10.0) -> tuple[PoweredTwin, str]:
    """Serve a simulated SMU for ``twin`` in a daemon thread until ``stop`` is set; returns the powered twin (to
    give the bridge instead of ``twin``) and the SMU's VISA resource name."""
    powered = PoweredTwin(twin)
    smu = SimSMU(powered)
    bound = threading.Event()
    where: list[str] = []
    failure: list[BaseException] = []

    def ready(resource: str) -> None:
        where.append(resource)
        bound.set()

    def run() -> None:
        try:
            serve_smu(smu, host, port, stop=stop, on_ready=ready)
        except BaseException as err:  # noqa: BLE001 - reported to the caller below, or logged once serving
            failure.append(err)
            bound.set()
            log.error("simulated SMU stopped: %s", err)

    threading.Thread(target=run, name="cimlab-sim-smu", daemon=True).start()
    if not bound.wait(start_timeout_s):
        raise LinkError(f"the simulated SMU did not start within {start_timeout_s} s")
    if failure:
        raise failure[0]
    return powered, where[0]


__all__ = ["PoweredTwin", "SimSMU", "serve_smu", "start_smu"]

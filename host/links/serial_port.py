# URL format: a serial device path, or any pyserial URL.
#
#   /dev/ttyUSB0[?baud=N]     a real UART (default baud 115200); rate_hint = baud/10 bytes/s
#   /dev/pts/5[?baud=N]       a pseudo-terminal (ignores baud); rate_hint only when baud is given
#   COM3[?baud=N]             a Windows port
#   socket://HOST:PORT, rfc2217://HOST:PORT[?...], spy://PORT[?...], loop://, alt://PORT?class=...
#                             pyserial URLs, passed to serial.serial_for_url unchanged (they keep their own
#                             query); rate_hint None
#
# Options (plain device paths only):
#   baud=N    line rate in baud, 50..50000000
"""Serial ports and pyserial URLs through ``serial.serial_for_url``."""

from __future__ import annotations

import os
import stat

import serial

from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError, LinkError
from cimlab.links.base import Link
from cimlab.links.url import int_param, parse_params, reject_unknown, scheme_of

DEFAULT_BAUD = 115200
BAUD_RANGE = (50, 50_000_000)
_PTY_SLAVE_MAJORS = range(136, 144)  # Linux Unix98 pty slaves (/dev/pts/N)


def _is_pty(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in _PTY_SLAVE_MAJORS


class SerialLink(Link):
    """A link over a pyserial port (device path or pyserial URL).

    Args:
        url: see the module comment (no ``#fragment``: the factory strips it).
        timeout: seconds; the base of the write deadline.
    """

    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        super().__init__(url, timeout=timeout)
        scheme = scheme_of(url)
        if scheme is None:
            path, _, query = url.partition("?")
            if not path:
                raise ConfigError(f"serial link {url!r}: no device path")
            where = f"serial link {url!r}"
            params = parse_params(query, where)
            reject_unknown(params, ("baud",), where)
            baud = int_param(params, "baud", *BAUD_RANGE, DEFAULT_BAUD, where)
            target = path
            exclusive: bool | None = True
            if not _is_pty(path) or "baud" in params:
                self.rate_hint = baud / 10.0
        else:
            baud = DEFAULT_BAUD
            target = url
            exclusive = None
        self._timeout_set: float | None = None
        self._write_timeout_set: float | None = None
        try:
            self._port = serial.serial_for_url(
                target, baudrate=baud, timeout=0, write_timeout=self.timeout, exclusive=exclusive
            )
        except ValueError as err:
            raise ConfigError(f"serial link {url!r}: {err}") from err
        except (serial.SerialException, OSError) as err:
            raise LinkError(f"cannot open {url!r}: {err}") from err
        self._timeout_set = 0.0
        self._write_timeout_set = self.timeout
        # pyserial's socket:// reports in_waiting as 0/1 (readable or not), not a byte count: drain it with a
        # zero timeout instead.
        self._waiting_is_a_count = type(self._port).__module__ != "serial.urlhandler.protocol_socket"

    @property
    def port(self) -> serial.SerialBase:
        """The underlying pyserial port (for settings this link does not cover)."""
        return self._port

    def _set_timeout(self, value: float) -> None:
        # Setting a pyserial timeout reconfigures the port: only do it when it changes.
        if value != self._timeout_set:
            self._port.timeout = value
            self._timeout_set = value

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        port = self._port
        try:
            self._set_timeout(timeout)
            first = port.read(1)
            if not first or max_bytes == 1:
                return first
            waiting = port.in_waiting
            if not waiting:
                return first
            if self._waiting_is_a_count:
                # those bytes are already here: the read returns at once, without touching the timeout
                return first + port.read(min(waiting, max_bytes - 1))
            self._set_timeout(0.0)
            return first + port.read(max_bytes - 1)
        except serial.SerialException as err:
            raise LinkError(f"read from {self.url!r} failed: {err}") from err
        except OSError as err:
            raise LinkError(f"read from {self.url!r} failed: {err}") from err

    def _write(self, data: memoryview) -> None:
        deadline = self.write_deadline(len(data))
        try:
            if deadline != self._write_timeout_set:
                self._port.write_timeout = deadline
                self._write_timeout_set = deadline
            written = self._port.write(data)
        except serial.SerialTimeoutException as err:
            raise CimTimeoutError(
                f"write of {len(data)} bytes to {self.url!r} did not finish within {deadline:.3g} s"
            ) from err
        except (serial.SerialException, OSError) as err:
            raise LinkError(f"write to {self.url!r} failed: {err}") from err
        if written is not None and written != len(data):
            raise LinkError(f"write to {self.url!r} sent {written} of {len(data)} bytes")

    def _close(self) -> None:
        try:
            self._port.close()
        except (serial.SerialException, OSError) as err:
            raise LinkError(f"closing {self.url!r} failed: {err}") from err

# URL format: tcp://HOST:PORT[?baud=B]
#
#   tcp://127.0.0.1:5000            a raw TCP byte stream (e.g. `cimlab sim serve --tcp`), TCP_NODELAY set
#   tcp://[::1]:5000?baud=3000000   IPv6; baud only sets rate_hint (B/10 bytes/s), for a paced server
#
# Options:
#   baud=B    line rate the far end paces at, 50..1000000000 (only informs rate_hint and write deadlines)
"""Raw TCP sockets."""

from __future__ import annotations

import select
import socket
import time
from urllib.parse import urlsplit

from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError, LinkError
from cimlab.links.base import Link
from cimlab.links.url import int_param, parse_params, reject_unknown

BAUD_RANGE = (50, 1_000_000_000)
_CHUNK = 1 << 20  # largest single send(), bytes


class TcpLink(Link):
    """A link over a TCP connection.

    Args:
        url: ``tcp://HOST:PORT[?baud=B]``.
        timeout: seconds; the connect deadline and the base of the write deadline.
    """

    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        super().__init__(url, timeout=timeout)
        where = f"tcp link {url!r}"
        parts = urlsplit(url)
        if parts.scheme.lower() != "tcp":
            raise ConfigError(f"{where}: scheme must be tcp://")
        if parts.path not in ("", "/"):
            raise ConfigError(f"{where}: unexpected path {parts.path!r}; the format is tcp://HOST:PORT")
        host = parts.hostname
        if not host:
            raise ConfigError(f"{where}: missing host; the format is tcp://HOST:PORT")
        try:
            port = parts.port
        except ValueError as err:
            raise ConfigError(f"{where}: bad port ({err}); allowed 1..65535") from None
        if port is None:
            raise ConfigError(f"{where}: missing port; the format is tcp://HOST:PORT")
        if not 1 <= port <= 65535:
            raise ConfigError(f"{where}: port {port} is outside 1..65535")
        params = parse_params(parts.query, where)
        reject_unknown(params, ("baud",), where)
        if "baud" in params:
            self.rate_hint = int_param(params, "baud", *BAUD_RANGE, 0, where) / 10.0
        self.address = (host, port)
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
        except TimeoutError as err:
            raise LinkError(f"cannot open {url!r}: connect timed out after {self.timeout:g} s") from err
        except OSError as err:
            raise LinkError(f"cannot open {url!r}: {err.strerror or err}") from err
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise LinkError(f"cannot configure {url!r}: {err}") from err
        self._sock = sock

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        sock = self._sock
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
            if not ready:
                return b""
            data = sock.recv(max_bytes)
        except BlockingIOError:
            return b""
        except OSError as err:
            raise LinkError(f"read from {self.url!r} failed: {err}") from err
        if not data:
            raise LinkError(f"{self.url!r}: connection closed by the peer")
        return data

    def _write(self, data: memoryview) -> None:
        sock = self._sock
        limit = self.write_deadline(len(data))
        deadline = time.monotonic() + limit
        sent = 0
        try:
            while sent < len(data):
                try:
                    sent += sock.send(data[sent : sent + _CHUNK])
                    continue
                except BlockingIOError:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CimTimeoutError(
                        f"write of {len(data)} bytes to {self.url!r} stalled after {sent} bytes"
                        f" ({limit:.3g} s deadline)"
                    )
                select.select([], [sock], [], left)
        except CimTimeoutError:
            raise
        except OSError as err:
            raise LinkError(f"write to {self.url!r} failed after {sent} of {len(data)} bytes: {err}") from err

    def _close(self) -> None:
        self._sock.close()

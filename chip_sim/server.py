"""Serve a twin behind a pseudo-terminal or a TCP port, speaking the same frames as a board.

``serve_pty`` makes a pty pair, puts the slave side in raw mode (no echo, no line discipline: every byte passes
as sent) and serves the master side; hosts open the slave path (``/dev/pts/N``) as a serial port. The server
keeps its own handle on the slave so the pty survives hosts connecting and disconnecting, as a board's UART does.

``serve_tcp`` listens on HOST:PORT (port 0 picks a free one) and serves one host at a time; the twin's state
(weights, registers, counters) persists across connections, as a board's does.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import tty
from collections.abc import Callable

from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.errors import ConfigError, LinkError
from cimlab.firmware_bridge.serve import serve_fd

Ready = Callable[[str], None]


def serve_pty(bridge: Bridge, *, stop: threading.Event, on_ready: Ready, baud: int | None = None) -> None:
    """Serve ``bridge`` on a new pty until ``stop`` is set; ``on_ready`` gets the slave path."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        on_ready(os.ttyname(slave))
        while not stop.is_set():
            serve_fd(bridge, master, stop=stop, baud=baud)
    finally:
        os.close(master)
        os.close(slave)


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ConfigError naming the bad part."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    try:
        value = int(port)
    except ValueError:
        raise ConfigError(f"port {port!r} in {text!r} is not a number") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"port {value} is outside 0..65535")
    return host.strip("[]"), value


def serve_tcp(
    bridge: Bridge,
    host: str,
    port: int,
    *,
    stop: threading.Event,
    on_ready: Ready,
    baud: int | None = None,
    poll_s: float = 0.1,
) -> None:
    """Serve ``bridge`` on a TCP port until ``stop`` is set; ``on_ready`` gets ``tcp://HOST:PORT`` as bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise LinkError(f"cannot create a socket for {host}:{port}: {err}") from err
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as err:
            raise LinkError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
        listener.listen(1)
        bound_host, bound_port = listener.getsockname()[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        on_ready(f"tcp://{shown}:{bound_port}")
        while not stop.is_set():
            ready, _, _ = select.select([listener], [], [], poll_s)
            if not ready:
                continue
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                bridge.framer.reset()
                serve_fd(bridge, conn.fileno(), stop=stop, baud=baud)
    finally:
        listener.close()

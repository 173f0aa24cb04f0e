"""The device end on a port: a Bridge served on a pty, a TCP port or a serial device, until told to stop.

The same rules hold for the twin (``cimlab sim serve``) and for a board (``cimlab board serve``):

- ``serve_tcp`` binds loopback unless ``allow_remote`` is given, and then only with a ``token``, which a host must
  send in its HELLO before any other request is served (``Bridge.new_session``);
- one host at a time: a host that connects while another is served gets a BUSY frame (opcode 0, seq 0, a line of
  text) at once and its connection is closed; a host that sends nothing for ``idle_timeout_s`` is disconnected, so
  an idle host cannot hold the device;
- the device's state (weights, registers, counters) outlives a host disconnecting, as a board's does.

``serve_pty`` makes a pty pair, puts the slave side in raw mode (no echo, no line discipline: every byte passes
as sent) and serves the master side; hosts open the slave path (``/dev/pts/N``) as a serial port. The server keeps
its own handle on the slave so the pty survives hosts connecting and disconnecting, as a board's UART does.
``serve_serial`` serves a serial device (a board's UART) through pyserial.

The loop never blocks on a write: replies queue and go out as the descriptor accepts them, while requests keep
being read. A host that writes a window of large requests before reading therefore cannot deadlock against a
device that is writing large replies.

With ``baud`` set, bytes in each direction are paced at a UART's line rate (10 bits a byte: start, 8 data, stop),
so link efficiency measured through a pty or TCP means what it would on the board. The pacing is a token bucket per
direction whose burst is the UART's DMA FIFO (``fifo_bytes``): while the controller computes, the line keeps
delivering into the FIFO, as a DMA-fed UART does, but never more than the FIFO holds. Bytes move in blocks of about
1 ms of line time (``GRANULE_S``), as a USB UART's latency timer delivers them.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.errors import ConfigError, LinkError
from cimlab.firmware_bridge.frame import REPLY_FLAG, encode_frame
from cimlab.firmware_bridge.messages import MAX_TOKEN, Status

log = logging.getLogger(__name__)

Ready = Callable[[str], None]
"""Called once with where hosts connect (a pty path, ``tcp://HOST:PORT`` or the serial device)."""
Stop = threading.Event | Callable[[], bool]
"""Serving ends when the event is set or the callable returns True."""

FIFO_BYTES = 16 * 1024
"""Default UART DMA FIFO per direction, bytes: the line runs on this long while the controller is busy."""
CHUNK = 64 * 1024
GRANULE_S = 0.001
"""A paced line moves bytes in blocks of this much line time, seconds."""
IDLE_TIMEOUT_S = 60.0
"""Default seconds a connected host may send nothing before it is disconnected."""
REFUSAL_LINGER_S = 2.0
"""Seconds a refused connection is kept to absorb what the host sends, so the BUSY frame is not reset away."""
MIN_TOKEN = 16
"""Shortest token, bytes."""


class _Bucket:
    """Token bucket of bytes at ``rate`` bytes/s; burst capped at ``burst`` bytes."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = 0.0
        self.t = time.monotonic()

    def available(self) -> int:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        self.tokens -= n

    def idle(self) -> None:
        """The line had nothing to carry: no credit builds up (bytes cannot arrive before they are sent)."""
        self.tokens = 0.0
        self.t = time.monotonic()

    def wait_s(self, n: int = 1) -> float:
        """Seconds until at least ``n`` bytes are available."""
        return max(0.0, (n - self.tokens) / self.rate)


class _Pump:
    """One host's bytes through the bridge, on ``fd_in``/``fd_out`` (non-blocking), paced when ``baud`` is set."""

    def __init__(self, bridge: Bridge, fd_in: int, fd_out: int, baud: int | None, fifo_bytes: int) -> None:
        if baud is not None and baud <= 0:
            raise ConfigError(f"baud must be positive, got {baud}")
        self.bridge = bridge
        self.fd_in, self.fd_out = fd_in, fd_out
        os.set_blocking(fd_in, False)
        if fd_out != fd_in:
            os.set_blocking(fd_out, False)
        burst = float(max(64, fifo_bytes))
        self.rx = _Bucket(baud / 10, burst) if baud else None
        self.tx = _Bucket(baud / 10, burst) if baud else None
        self.granule = max(1, int(baud / 10 * GRANULE_S)) if baud else 1
        self.outq = bytearray()
        self.last_rx = time.monotonic()
        self._listening = False  # whether the last wait included reading
        self._asked_at = 0.0
        self._streaming = False  # whether bytes have been coming in without a silence

    def _rx_ok(self) -> bool:
        return self.rx is None or self.rx.available() >= self.granule

    def _tx_ok(self) -> bool:
        return bool(self.outq) and (self.tx is None or self.tx.available() >= min(len(self.outq), self.granule))

    def wanted(self) -> tuple[list[int], list[int], float]:
        """Descriptors to wait on for reading and writing, and the longest wait before ``service`` is due (s)."""
        rx_ok, tx_ok = self._rx_ok(), self._tx_ok()
        self._listening = rx_ok
        self._asked_at = time.monotonic()
        timeout = float("inf")
        wake = self.bridge.wake_at()
        if wake is not None:
            timeout = max(0.0, wake - time.monotonic())
        if self.rx is not None and not rx_ok:
            timeout = min(timeout, self.rx.wait_s(self.granule))
        if self.tx is not None and self.outq and not tx_ok:
            timeout = min(timeout, self.tx.wait_s(min(len(self.outq), self.granule)))
        return ([self.fd_in] if rx_ok else []), ([self.fd_out] if tx_ok else []), timeout

    def service(self, readable: bool, writable: bool) -> bool:
        """Read, run the bridge's timed duties, write; False once the host has gone (EOF)."""
        arriving = readable
        if self.rx is not None and self._listening:
            if not readable:
                self.rx.idle()  # the line carried nothing: no credit builds up
                self._streaming = False
            elif not self._streaming and time.monotonic() - self._asked_at > GRANULE_S:
                # bytes after a silence: their line time starts now, not when the wait began
                self.rx.idle()
                self._streaming = True
                readable = False
        if self.tx is not None and not self.outq:
            self.tx.idle()
        if readable and not self._read():
            return False
        wake = self.bridge.wake_at()
        if wake is not None and time.monotonic() >= wake and not arriving:  # bytes waiting are not a silence
            self.outq += b"".join(self.bridge.poll())
        return not (writable and self.outq) or self._write()

    def _read(self) -> bool:
        n = CHUNK if self.rx is None else min(CHUNK, self.rx.available())
        try:
            data = os.read(self.fd_in, max(1, n))
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False
        except OSError as err:
            if err.errno == errno.EIO:  # a pty or serial device whose other side is gone
                return False
            raise
        if not data:
            return False
        if self.rx is not None:
            self.rx.take(len(data))
        self.last_rx = time.monotonic()
        for reply in self.bridge.receive(data):
            self.outq += reply
        return True

    def _write(self) -> bool:
        n = len(self.outq) if self.tx is None else min(len(self.outq), self.tx.available())
        try:
            sent = os.write(self.fd_out, bytes(self.outq[: min(n, CHUNK)]))
        except BlockingIOError:
            sent = 0
        except (BrokenPipeError, ConnectionResetError):
            return False
        if self.tx is not None:
            self.tx.take(sent)
        del self.outq[:sent]
        return True


def _stopper(stop: Stop | None) -> Callable[[], bool]:
    if stop is None:
        return lambda: False
    if isinstance(stop, threading.Event):
        return stop.is_set
    return stop


def serve_fd(
    bridge: Bridge,
    fd_in: int,
    fd_out: int | None = None,
    *,
    stop: Stop | None = None,
    baud: int | None = None,
    poll_s: float = 0.1,
    fifo_bytes: int = FIFO_BYTES,
    idle_timeout_s: float | None = None,
) -> str:
    """Serve the bridge on ``fd_in``/``fd_out`` (the same descriptor when ``fd_out`` is None) for one host.

    Returns ``"stopped"`` when ``stop`` is set, ``"eof"`` when the peer closed the stream, or ``"idle"`` when it sent
    nothing for ``idle_timeout_s`` seconds (None: no limit). ``poll_s`` bounds how long a stop request waits
    (seconds); ``fifo_bytes`` is the paced UART's FIFO per direction (bytes). The descriptors are switched to
    non-blocking mode.
    """
    stopped = _stopper(stop)
    pump = _Pump(bridge, fd_in, fd_in if fd_out is None else fd_out, baud, fifo_bytes)
    while not stopped():
        rlist, wlist, timeout = pump.wanted()
        try:
            readable, writable, _ = select.select(rlist, wlist, [], min(timeout, poll_s))
        except InterruptedError:
            continue
        if not pump.service(bool(readable), bool(writable)):
            return "eof"
        if idle_timeout_s is not None and time.monotonic() - pump.last_rx > idle_timeout_s:
            return "idle"
    return "stopped"


# ---- a pty and a serial device ---------------------------------------------------------------------------------
def serve_pty(bridge: Bridge, *, stop: Stop, on_ready: Ready, baud: int | None = None) -> None:
    """Serve ``bridge`` on a new pty until ``stop``; ``on_ready`` gets the slave path (``/dev/pts/N``)."""
    stopped = _stopper(stop)
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        bridge.new_session()
        on_ready(os.ttyname(slave))
        while not stopped():
            serve_fd(bridge, master, stop=stopped, baud=baud)
    finally:
        os.close(master)
        os.close(slave)


def serve_serial(bridge: Bridge, device: str, *, stop: Stop, on_ready: Ready, baud: int = 115200) -> None:
    """Serve ``bridge`` on a serial device (a board's UART, opened exclusively at ``baud``) until ``stop``.

    Raises LinkError when the device cannot be opened or goes away.
    """
    import serial  # pyserial configures the line (raw mode, any baud); the loop then serves its descriptor

    stopped = _stopper(stop)
    try:
        port = serial.Serial(device, baudrate=baud, timeout=0, exclusive=True)
    except (serial.SerialException, OSError, ValueError) as err:
        raise LinkError(f"cannot open serial device {device!r} at {baud} baud: {err}") from err
    try:
        bridge.new_session()
        on_ready(device)
        if serve_fd(bridge, port.fileno(), stop=stopped) == "eof":
            raise LinkError(f"serial device {device!r} went away")
    finally:
        port.close()


# ---- TCP -------------------------------------------------------------------------------------------------------
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


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; any other name counts as reachable from the network."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, *, allow_remote: bool, token: bytes | None) -> None:
    """ConfigError unless binding ``host`` is safe: loopback, or ``allow_remote`` with a token."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ConfigError(
            f"{host!r} is not a loopback address: serving there lets the network program the device; "
            "pass --allow-remote with --token-file to do it, or bind 127.0.0.1"
        )
    if not token:
        raise ConfigError(f"serving on {host!r} (--allow-remote) needs a token that hosts must present: --token-file")


def read_token_file(path: str | os.PathLike[str]) -> bytes:
    """The token in a file (surrounding whitespace removed); ConfigError when unreadable, too short or too long."""
    try:
        token = Path(path).read_bytes().strip()
    except OSError as err:
        raise ConfigError(f"cannot read token file {str(path)!r}: {err.strerror or err}") from err
    if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
        raise ConfigError(
            f"token file {str(path)!r} holds {len(token)} bytes; a token has {MIN_TOKEN}..{MAX_TOKEN}"
            " (e.g. `python -c 'import secrets; print(secrets.token_hex(24))' > FILE`)"
        )
    return token


def serve_tcp(
    bridge: Bridge,
    host: str,
    port: int,
    *,
    stop: Stop,
    on_ready: Ready,
    baud: int | None = None,
    token: bytes | None = None,
    allow_remote: bool = False,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    poll_s: float = 0.1,
) -> None:
    """Serve ``bridge`` on TCP ``host:port`` (port 0 picks a free one) until ``stop``, one host at a time.

    ``on_ready`` gets ``tcp://HOST:PORT`` as bound. See the module docstring for the rules; ``token`` is required
    at HELLO when given, ``idle_timeout_s`` (seconds) disconnects a silent host. ConfigError when the address
    is not loopback and ``allow_remote`` with a token was not given; LinkError when it cannot be bound.
    """
    check_exposure(host, allow_remote=allow_remote, token=token)
    if not idle_timeout_s > 0:
        raise ConfigError(f"idle timeout must be positive seconds, got {idle_timeout_s}")
    listener = _listen(host, port)
    try:
        bound_host, bound_port = listener.getsockname()[:2]
        shown = f"[{bound_host}]" if listener.family == socket.AF_INET6 else bound_host
        on_ready(f"tcp://{shown}:{bound_port}")
        _TcpServer(bridge, listener, baud=baud, token=token, idle_timeout_s=idle_timeout_s).run(
            _stopper(stop), poll_s
        )
    finally:
        listener.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise LinkError(f"cannot create a socket for {host}:{port}: {err}") from err
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(8)
        listener.setblocking(False)
    except OSError as err:
        listener.close()
        raise LinkError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    return listener


class _Session:
    """The host being served: its socket and the pump between it and the bridge."""

    def __init__(self, conn: socket.socket, peer: str, bridge: Bridge, baud: int | None,
                 token: bytes | None) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        bridge.new_session(token)
        self.conn = conn
        self.peer = peer
        self.since = time.strftime("%H:%M:%S")
        self.pump = _Pump(bridge, conn.fileno(), conn.fileno(), baud, FIFO_BYTES)

    def gone(self) -> bool:
        """True when the host has closed its side (nothing left to read but the end)."""
        try:
            return self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


class _Refusal:
    """A host turned away: it has been sent BUSY; what it sends is read and dropped until it closes or we give up."""

    def __init__(self, conn: socket.socket, text: str) -> None:
        self.conn = conn
        self.until = time.monotonic() + REFUSAL_LINGER_S
        conn.setblocking(False)
        try:
            conn.send(encode_frame(REPLY_FLAG, 0, text.encode("utf-8"), status=int(Status.BUSY)))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self.until = 0.0

    def drained(self) -> bool:
        """Read what arrived; True once the host closed (or broke) its side."""
        try:
            return not self.conn.recv(CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            return True


class _TcpServer:
    """The accept loop of ``serve_tcp``: one session, refusals, the idle timeout."""

    def __init__(self, bridge: Bridge, listener: socket.socket, *, baud: int | None, token: bytes | None,
                 idle_timeout_s: float) -> None:
        self.bridge = bridge
        self.listener = listener
        self.baud = baud
        self.token = token
        self.idle_timeout_s = idle_timeout_s
        self.session: _Session | None = None
        self.refusals: list[_Refusal] = []

    def run(self, stopped: Callable[[], bool], poll_s: float) -> None:
        try:
            while not stopped():
                self._step(poll_s)
        finally:
            self._end_session("the server stops")
            for r in self.refusals:
                r.conn.close()

    def _step(self, poll_s: float) -> None:
        rlist: list[int | socket.socket] = [self.listener, *(r.conn for r in self.refusals)]
        wlist: list[int] = []
        timeout = poll_s
        if self.session is not None:
            r, w, t = self.session.pump.wanted()
            rlist += r
            wlist += w
            timeout = min(timeout, t)
        try:
            readable, writable, _ = select.select(rlist, wlist, [], timeout)
        except InterruptedError:
            return
        self._serve(readable, writable)  # first: a host that just left must not make the next one look busy
        if self.listener in readable:
            self._accept()
        self._expire_refusals(set(readable))

    def _accept(self) -> None:
        try:
            conn, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        peer = f"{addr[0]}:{addr[1]}"
        if self.session is not None and self.session.gone():
            self._end_session("the host closed the connection")
        if self.session is None:
            self.session = _Session(conn, peer, self.bridge, self.baud, self.token)
            log.info("serving %s", peer)
            return
        s = self.session
        log.info("refused %s: busy serving %s", peer, s.peer)
        self.refusals.append(_Refusal(conn, f"the device serves another host ({s.peer} since {s.since});"
                                            " try again when it disconnects"))

    def _serve(self, readable: list, writable: list) -> None:
        s = self.session
        if s is None:
            return
        fd = s.conn.fileno()
        if not s.pump.service(fd in readable, fd in writable):
            self._end_session("the host closed the connection")
        elif time.monotonic() - s.pump.last_rx > self.idle_timeout_s:
            self._end_session(f"the host sent nothing for {self.idle_timeout_s:g} s")

    def _end_session(self, why: str) -> None:
        if self.session is not None:
            log.info("session with %s ends: %s", self.session.peer, why)
            self.session.conn.close()
            self.session = None

    def _expire_refusals(self, readable: set) -> None:
        now = time.monotonic()
        keep = []
        for r in self.refusals:
            if (r.conn in readable and r.drained()) or now >= r.until:
                r.conn.close()
            else:
                keep.append(r)
        self.refusals = keep


__all__ = [
    "FIFO_BYTES",
    "IDLE_TIMEOUT_S",
    "check_exposure",
    "is_loopback",
    "parse_hostport",
    "read_token_file",
    "serve_fd",
    "serve_pty",
    "serve_serial",
    "serve_tcp",
]

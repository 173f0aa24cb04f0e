"""The device-side loop: a Bridge on a file descriptor (pty master, TCP socket, UART), until told to stop.

The loop never blocks on a write: replies queue and go out as the descriptor accepts them, while requests keep
being read. A host that writes a window of large requests before reading therefore cannot deadlock against a
device that is writing large replies.

With ``baud`` set, bytes in each direction are paced at a UART's line rate (10 bits a byte: start, 8 data, stop),
so link efficiency measured through a pty or TCP means what it would on the board. The pacing is a token bucket per
direction whose burst is the UART's DMA FIFO (``fifo_bytes``): while the controller computes, the line keeps
delivering into the FIFO, as a DMA-fed UART does, but never more than the FIFO holds.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections.abc import Callable

from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.errors import ConfigError

FIFO_BYTES = 16 * 1024
"""Default UART DMA FIFO per direction, bytes: the line runs on this long while the controller is busy."""
CHUNK = 64 * 1024


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

    def wait_s(self) -> float:
        """Seconds until at least one byte is available."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


def serve_fd(
    bridge: Bridge,
    fd_in: int,
    fd_out: int | None = None,
    *,
    stop: threading.Event | Callable[[], bool] | None = None,
    baud: int | None = None,
    poll_s: float = 0.1,
    fifo_bytes: int = FIFO_BYTES,
) -> str:
    """Serve the bridge on ``fd_in``/``fd_out`` (the same descriptor when ``fd_out`` is None).

    Returns ``"stopped"`` when ``stop`` is set, or ``"eof"`` when the peer closed the stream. ``poll_s`` bounds how
    long a stop request waits (seconds); ``fifo_bytes`` is the paced UART's FIFO per direction (bytes). The
    descriptors are switched to non-blocking mode.
    """
    if baud is not None and baud <= 0:
        raise ConfigError(f"baud must be positive, got {baud}")
    fd_out = fd_in if fd_out is None else fd_out
    stopped: Callable[[], bool]
    if stop is None:
        stopped = lambda: False  # noqa: E731
    elif isinstance(stop, threading.Event):
        stopped = stop.is_set
    else:
        stopped = stop
    os.set_blocking(fd_in, False)
    if fd_out != fd_in:
        os.set_blocking(fd_out, False)
    rate = baud / 10 if baud else None
    burst = float(max(64, fifo_bytes))
    rx = _Bucket(rate, burst) if rate else None
    tx = _Bucket(rate, burst) if rate else None
    outq = bytearray()
    while not stopped():
        rx_ok = rx is None or rx.available() >= 1
        tx_ok = bool(outq) and (tx is None or tx.available() >= 1)
        timeout = poll_s
        wake = bridge.wake_at()
        if wake is not None:
            timeout = min(timeout, max(0.0, wake - time.monotonic()))
        if rx is not None and not rx_ok:
            timeout = min(timeout, rx.wait_s())
        if tx is not None and outq and not tx_ok:
            timeout = min(timeout, tx.wait_s())
        try:
            readable, writable, _ = select.select(
                [fd_in] if rx_ok else [], [fd_out] if tx_ok else [], [], timeout
            )
        except InterruptedError:
            continue
        if rx is not None and rx_ok and not readable:
            rx.idle()
        if tx is not None and not outq:
            tx.idle()
        if readable:
            n = CHUNK if rx is None else min(CHUNK, rx.available())
            try:
                data = os.read(fd_in, n)
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                return "eof"
            except OSError as err:
                if err.errno == errno.EIO:  # pty whose other side is closed
                    return "eof"
                raise
            if data == b"":
                return "eof"
            if data:
                if rx is not None:
                    rx.take(len(data))
                for reply in bridge.receive(data):
                    outq += reply
        wake = bridge.wake_at()
        if wake is not None and time.monotonic() >= wake:
            outq += b"".join(bridge.poll())
        if writable and outq:
            n = len(outq) if tx is None else min(len(outq), tx.available())
            try:
                sent = os.write(fd_out, bytes(outq[: min(n, CHUNK)]))
            except BlockingIOError:
                sent = 0
            except (BrokenPipeError, ConnectionResetError):
                return "eof"
            if tx is not None:
                tx.take(sent)
            del outq[:sent]
    return "stopped"

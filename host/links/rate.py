# URL format: any link URL followed by #rate=BAUD
#
#   sim://#rate=3000000       the in-process twin, paced like a 3 Mbaud UART (300 000 bytes/s each way)
#
# Options:
#   rate=BAUD    line rate, 300..1000000000 baud; bytes/s = BAUD/10 (8N1: ten bits a byte)
"""A pacing wrapper: the wrapped link behaves like a full-duplex UART of a given line rate.

Model: each direction is a line that carries ``BAUD/10`` bytes/s.

- write: the bytes occupy the transmit line after whatever is still on it; the call returns once no more
  than ``fifo_bytes`` are left to send (a UART driver's transmit buffer), so back-to-back frames keep the
  line busy. The bytes are handed to the inner link at once, in slices of about 1 ms of line time.
- read: bytes taken from the inner link are put on the receive line; they become readable as the line
  carries them, in blocks of about 1 ms of line time (as a USB UART's latency timer delivers them), so a
  reader polling in a tight loop is not handed one byte at a time. Replies the inner link produced during a
  write (the in-process twin answers at once) start on the receive line no earlier than the moment the
  slice that completed their request was transmitted.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.links.base import Link, WrapperLink

RATE_RANGE = (300, 1_000_000_000)
DEFAULT_FIFO = 4096
"""Transmit buffer, bytes: how far a writer may run ahead of the line."""
_DRAIN = 1 << 20  # most bytes taken from the inner link per poll
_SLICE_S = 0.001  # line time per write slice and per receive granule, seconds
_MIN_SLICE = 256  # smallest write slice, bytes
_IDLE_SLICE = 0.005  # seconds a read waits on the inner link while holding the line state


class RateLink(WrapperLink):
    """Pace ``inner`` to ``baud/10`` bytes/s in each direction.

    Args:
        inner: the link to pace (closed with this one).
        baud: line rate, baud (10 bits a byte).
        fifo_bytes: transmit buffer, bytes.
        url: reported URL (defaults to the inner link's).
    """

    def __init__(self, inner: Link, baud: int, *, fifo_bytes: int = DEFAULT_FIFO, url: str | None = None) -> None:
        if isinstance(baud, bool) or not isinstance(baud, int) or not RATE_RANGE[0] <= baud <= RATE_RANGE[1]:
            raise ConfigError(f"rate={baud!r} is outside the allowed range {RATE_RANGE[0]}..{RATE_RANGE[1]} baud")
        if isinstance(fifo_bytes, bool) or not isinstance(fifo_bytes, int) or fifo_bytes < 0:
            raise ConfigError(f"fifo_bytes={fifo_bytes!r} must be an integer >= 0")
        super().__init__(inner, url=url, rate_hint=baud / 10.0)
        self.baud = baud
        self.bytes_per_s = baud / 10.0
        self.fifo_bytes = fifo_bytes
        # received bytes become readable in blocks of this many bytes (~1 ms of line time)
        self.granule = max(1, int(self.bytes_per_s * _SLICE_S))
        self._tx_free = 0.0  # monotonic time the transmit line finishes what it holds
        self._rx_free = 0.0  # monotonic time the receive line finishes what it holds
        self._rx: deque[tuple[float, bytes]] = deque()  # (time the chunk's first byte starts, chunk)
        self._rx_taken = 0  # bytes of the head chunk already returned
        self._line = threading.Lock()  # guards the line state shared by a reader and a writer

    def _schedule(self, chunk: bytes, earliest: float) -> None:
        start = max(earliest, self._rx_free)
        self._rx_free = start + len(chunk) / self.bytes_per_s
        self._rx.append((start, chunk))

    def _poll_inner(self, earliest: float) -> None:
        while True:
            chunk = self.inner.read(_DRAIN, 0.0)
            if not chunk:
                return
            self._schedule(chunk, earliest)

    def _write(self, data: memoryview) -> None:
        with self._line:
            now = time.monotonic()
            start = max(now, self._tx_free)
            done = start + len(data) / self.bytes_per_s
            self._tx_free = done
            # Bytes already waiting belong to earlier traffic: put them on the line before this write's replies.
            self._poll_inner(now)
            # Hand the bytes over in slices of ~1 ms of line time, so a reply to a frame early in a long write
            # starts on the receive line when that frame (not the whole write) has been sent.
            step = max(_MIN_SLICE, int(self.bytes_per_s * _SLICE_S))
            for off in range(0, len(data), step):
                piece = data[off : off + step]
                self.inner.write(piece)
                self._poll_inner(start + (off + len(piece)) / self.bytes_per_s)
        release = done - self.fifo_bytes / self.bytes_per_s
        delay = release - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _available(self, now: float, max_bytes: int) -> bytes:
        out = bytearray()
        while self._rx and len(out) < max_bytes:
            start, chunk = self._rx[0]
            arrived = self._arrived(start, len(chunk), now)
            if arrived <= self._rx_taken:
                break
            take = min(arrived - self._rx_taken, max_bytes - len(out))
            out += chunk[self._rx_taken : self._rx_taken + take]
            self._rx_taken += take
            if self._rx_taken == len(chunk):
                self._rx.popleft()
                self._rx_taken = 0
            else:
                break
        return bytes(out)

    def _arrived(self, start: float, n: int, now: float) -> int:
        """Bytes of an ``n``-byte chunk readable at ``now``: whole granules, or all once the line carried it."""
        carried = (now - start) * self.bytes_per_s
        if carried >= n:
            return n
        return int(carried // self.granule) * self.granule

    def _next_arrival(self) -> float | None:
        if not self._rx:
            return None
        start, chunk = self._rx[0]
        g = self.granule
        return start + min(len(chunk), (self._rx_taken // g + 1) * g) / self.bytes_per_s

    def _read(self, max_bytes: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            with self._line:
                now = time.monotonic()
                self._poll_inner(now)
                out = self._available(now, max_bytes)
                if out:
                    return out
                left = deadline - now
                if left <= 0:
                    return b""
                nxt = self._next_arrival()
                if nxt is None:
                    # Nothing on the line: wait on the inner link itself, in slices so a writer is not held up.
                    chunk = self.inner.read(_DRAIN, min(left, _IDLE_SLICE))
                    if chunk:
                        self._schedule(chunk, time.monotonic())
                    continue
            time.sleep(min(left, max(nxt - now, 0.0)))

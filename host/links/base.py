"""The Link interface: a byte pipe with deadlines, nothing about frames.

``Link`` is a template (as python-can's ``BusABC.recv``): the public ``read``/``write``/``close`` validate
arguments, serialise callers, keep the statistics and translate closed-link use into ``LinkError``; a backend
implements only ``_read``, ``_write`` and ``_close``. One thread may read while another writes.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType

from cimlab.firmware_bridge.errors import ConfigError, LinkError


@dataclass
class LinkStats:
    """What passed through a link since it was opened.

    ``reads`` and ``writes`` count calls (a read that timed out empty counts too); bytes are payload bytes
    handed to or returned from the link.
    """

    bytes_in: int = 0
    bytes_out: int = 0
    reads: int = 0
    writes: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict for reports."""
        return dict(self.__dict__)


def check_timeout(value: float, what: str = "timeout") -> float:
    """A finite, non-negative number of seconds, or ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what}={value!r} must be a finite number of seconds >= 0")
    return float(value)


class Link(ABC):
    """Bytes in, bytes out, with deadlines.

    Attributes:
        url: the URL the link was opened from, as given.
        rate_hint: bytes/s of the physical line if known (baud/10 for a UART), else None.
        timeout: seconds; the open deadline and the base of every write deadline.
        stats: counters, see ``LinkStats``.
    """

    url: str
    rate_hint: float | None
    timeout: float
    stats: LinkStats

    def __init__(self, url: str, *, timeout: float = 1.0, rate_hint: float | None = None) -> None:
        self.url = url
        self.timeout = check_timeout(timeout)
        self.rate_hint = rate_hint
        self.stats = LinkStats()
        self._closed = False
        self._rlock = threading.Lock()
        self._wlock = threading.Lock()

    # ---- public template --------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once ``close`` ran."""
        return self._closed

    def write_deadline(self, n_bytes: int) -> float:
        """Seconds a write of ``n_bytes`` may take: ``timeout`` plus twice the line time when the rate is known."""
        if self.rate_hint:
            return self.timeout + 2.0 * n_bytes / self.rate_hint
        return self.timeout

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all bytes or raise CimTimeoutError/LinkError within the link's write deadline."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ConfigError(f"write takes bytes, bytearray or memoryview, got {type(data).__name__}")
        view = memoryview(data).cast("B")
        with self._wlock:
            self._check_open()
            self.stats.writes += 1
            if len(view):
                self._write(view)
                self.stats.bytes_out += len(view)

    def read(self, max_bytes: int, timeout: float) -> bytes:
        """Return 1..max_bytes bytes as soon as any are available, or b"" once `timeout` seconds pass.

        Never blocks longer than ``timeout`` (+ small scheduling slack). Raises LinkError if the link is
        closed or broken (EOF).
        """
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ConfigError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        timeout = check_timeout(timeout)
        with self._rlock:
            self._check_open()
            self.stats.reads += 1
            data = self._read(max_bytes, timeout)
            self.stats.bytes_in += len(data)
            return data

    def close(self) -> None:
        """Release every fd, socket and buffer; idempotent. Waits for a read or write in flight (bounded)."""
        with self._rlock, self._wlock:
            if self._closed:
                return
            self._closed = True
            self._close()

    def __enter__(self) -> Link:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.url!r} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise LinkError(f"link {self.url!r} is closed")

    # ---- backend hooks ----------------------------------------------------------------------------------
    @abstractmethod
    def _write(self, data: memoryview) -> None:
        """Write every byte of ``data`` (non-empty) within ``write_deadline(len(data))``."""

    @abstractmethod
    def _read(self, max_bytes: int, timeout: float) -> bytes:
        """Return 1..max_bytes bytes, or b"" after ``timeout`` seconds; LinkError on EOF."""

    @abstractmethod
    def _close(self) -> None:
        """Release the backend's resources (called once)."""


class WrapperLink(Link):
    """A link that adds behaviour around another one; closing it closes the inner link."""

    def __init__(self, inner: Link, *, url: str | None = None, rate_hint: float | None = None) -> None:
        hint = rate_hint if rate_hint is not None else inner.rate_hint
        super().__init__(url if url is not None else inner.url, timeout=inner.timeout, rate_hint=hint)
        self.inner = inner

    def _close(self) -> None:
        self.inner.close()

"""The charge a supply delivers during a block: ``with CurrentSampler(supply) as s: ...``, then ``s.summary``.

One reading is taken when the block starts and one when it ends; between them a background thread reads the
current back to back, at most once per ``period_s``. The charge is the sum of each reading times the time since the
reading before it (on the instrument's own clock when its readings carry timestamps, else the host's monotonic
clock), so it covers exactly the span from the first reading to the last. An instrument that integrates the current
between readings gives the exact charge; one that samples gives its Riemann sum. The sampler owns the instrument
for the block (nothing else may talk to it meanwhile).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError
from cimlab.instruments.supplies import Reading


class CurrentMeter(Protocol):
    """Anything that gives current readings."""

    def read(self) -> Reading: ...


@dataclass(frozen=True)
class CurrentSummary:
    """Supply current over one block."""

    samples: int
    """Readings taken (the one at the start included)."""
    charge_c: float
    """Charge delivered between the first and the last reading, C."""
    duration_s: float
    """Time between the first and the last reading, s (on ``clock``)."""
    clock: str
    """``instrument`` (the readings' own timestamps) or ``host`` (the host's monotonic clock)."""
    min_a: float
    max_a: float

    @property
    def mean_a(self) -> float | None:
        """Mean current over the span, A (None when no time passed on the clock)."""
        return self.charge_c / self.duration_s if self.duration_s > 0 else None


class CurrentSampler:
    """Readings of ``meter`` during a ``with`` block (see the module docstring).

    Args:
        meter: the supply (each ``read()`` is bounded by its VISA timeout).
        period_s: shortest interval between the starts of two background readings, s (0: back to back).
        join_timeout_s: deadline for the background reading in progress when the block ends, s.
    """

    def __init__(self, meter: CurrentMeter, *, period_s: float = 0.0, join_timeout_s: float = 10.0) -> None:
        if period_s < 0 or join_timeout_s <= 0:
            raise ConfigError(f"period_s must be >= 0 and join_timeout_s > 0 s, got {period_s}, {join_timeout_s}")
        self.meter = meter
        self.period_s = period_s
        self.join_timeout_s = join_timeout_s
        self.readings: list[tuple[float, float]] = []
        self.summary: CurrentSummary | None = None
        self._clock = "host"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _take(self) -> None:
        with self._lock:
            r = self.meter.read()
            t = time.monotonic() if r.t_s is None else r.t_s
            self._clock = "host" if r.t_s is None else "instrument"
            self.readings.append((r.amps, t))

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.period_s if self.readings else 0.0):
                self._take()
        except BaseException as err:  # noqa: BLE001 - handed to the main thread in __exit__
            self._error = err

    def __enter__(self) -> Self:
        self._take()
        self._thread = threading.Thread(target=self._run, name="cimlab-current-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(self.join_timeout_s)
        if self._thread.is_alive():
            raise CimTimeoutError(f"the current reading did not finish within {self.join_timeout_s} s")
        if exc is not None:
            return
        if self._error is not None:
            raise self._error
        self._take()
        self.summary = summarize(self.readings, self._clock)


def summarize(readings: list[tuple[float, float]], clock: str) -> CurrentSummary:
    """Charge and span of (amps, time) readings: each reading times the time since the one before it."""
    charge = sum(a * max(0.0, t - t_prev) for (a, t), (_, t_prev) in zip(readings[1:], readings[:-1], strict=True))
    amps = [a for a, _ in readings[1:]] or [readings[0][0]]  # the first reading covers the time before the block
    return CurrentSummary(len(readings), charge, readings[-1][1] - readings[0][1], clock, min(amps), max(amps))


__all__ = ["CurrentMeter", "CurrentSampler", "CurrentSummary", "summarize"]

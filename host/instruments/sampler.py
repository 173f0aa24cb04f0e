"""Read a supply's current in the background while the chip works: ``with CurrentSampler(supply) as s: ...``.

The sampler owns the instrument for the duration of the block (nothing else may talk to it meanwhile). It reads
``supply.current`` back to back, at most once per ``period_s``, until the block ends; the summary holds the mean
current over the block's wall time. At least one reading is taken even for a block shorter than one reading.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from cimlab.firmware_bridge.errors import CimTimeoutError, ConfigError


class CurrentMeter(Protocol):
    """Anything with a ``current`` reading in amperes."""

    @property
    def current(self) -> float: ...


@dataclass(frozen=True)
class CurrentSummary:
    """Supply current over one block."""

    samples: int
    """Readings taken."""
    mean_a: float
    """Mean of the readings, A."""
    min_a: float
    """Smallest reading, A."""
    max_a: float
    """Largest reading, A."""
    duration_s: float
    """Wall time of the block, s."""


class CurrentSampler:
    """Background current readings of ``meter`` during a ``with`` block.

    Args:
        meter: the supply (its ``current`` property triggers one reading; its adapter's timeout bounds it).
        period_s: shortest interval between the starts of two readings, seconds (0: back to back).
        join_timeout_s: deadline for the last reading to finish when the block ends, seconds.
    """

    def __init__(self, meter: CurrentMeter, *, period_s: float = 0.0, join_timeout_s: float = 10.0) -> None:
        if period_s < 0 or join_timeout_s <= 0:
            raise ConfigError(f"period_s must be >= 0 and join_timeout_s > 0 s, got {period_s}, {join_timeout_s}")
        self.meter = meter
        self.period_s = period_s
        self.join_timeout_s = join_timeout_s
        self.readings: list[float] = []
        self.summary: CurrentSummary | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                self.readings.append(float(self.meter.current))
                self._stop.wait(max(0.0, self.period_s - (time.monotonic() - start)))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread in __exit__
            self._error = err

    def __enter__(self) -> Self:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="cimlab-current-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        duration = time.monotonic() - self._t0
        self._stop.set()
        assert self._thread is not None
        self._thread.join(self.join_timeout_s)
        if self._thread.is_alive():
            raise CimTimeoutError(f"the current reading did not finish within {self.join_timeout_s} s")
        if self._error is not None:
            if exc is None:
                raise self._error
            return
        if not self.readings and exc is None:
            self.readings.append(float(self.meter.current))
        if self.readings:
            r = self.readings
            self.summary = CurrentSummary(len(r), sum(r) / len(r), min(r), max(r), duration)


__all__ = ["CurrentMeter", "CurrentSampler", "CurrentSummary"]

"""The interface the device-side bridge dispatches to: a real controller's firmware, or the twin.

The bridge validates every request against the controller's MacroSpec before calling it, so a Controller sees
only well-formed arguments: row ranges inside the array, arrays of the right shape, dtype and range. A method
that refuses a request raises ``DeviceError`` with a ``Status``; the bridge turns that into an error reply.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from cimlab.firmware_bridge.spec import MacroSpec


@dataclass(frozen=True)
class Identity:
    """What HELLO reports besides the MacroSpec."""

    chip_id: str
    firmware_id: str
    bitstream_id: str


@dataclass(frozen=True)
class OpCost:
    """What one operation cost the chip."""

    cycles: int
    """Controller clock cycles."""
    energy_fj: int
    """Estimated macro energy, femtojoules."""


@dataclass(frozen=True)
class Counters:
    """The STATUS counters."""

    busy: bool
    error_flags: int
    cycles: int
    ops: int
    conversions: int
    energy_fj: int
    last: OpCost


class Controller(ABC):
    """A CIM macro controller as the bridge sees it."""

    spec: MacroSpec

    @abstractmethod
    def identity(self) -> Identity:
        """Chip, firmware and bitstream identity."""

    @abstractmethod
    def reset(self, clear_weights: bool) -> None:
        """Reset registers, FIFOs and counters; also zero the weights when asked."""

    @abstractmethod
    def read_reg(self, addr: int) -> int:
        """Value of a register (DeviceError BAD_REGISTER if unknown)."""

    @abstractmethod
    def write_reg(self, addr: int, value: int) -> int:
        """Write a register; return the value it now holds (DeviceError BAD_REGISTER / READ_ONLY)."""

    @abstractmethod
    def write_weights(self, row_start: int, weights: np.ndarray) -> None:
        """Store logical weights [n_rows, cols] (int64, in range) at ``row_start``."""

    @abstractmethod
    def read_weights(self, row_start: int, n_rows: int) -> np.ndarray:
        """Logical weights [n_rows, cols] as stored."""

    @abstractmethod
    def mac(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        """Recombined outputs [batch, cols] (int32, adc_lsb units) for inputs [batch, n_rows] at row_start.

        Only the row groups holding the driven rows are converted and recombined (``MacroSpec.group_span``).
        """

    @abstractmethod
    def mac_raw(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        """Raw codes [batch, planes, groups spanned, slices, cols] for inputs [batch, n_rows] at row_start.

        The group axis holds only the groups ``MacroSpec.group_span(row_start, n_rows)``.
        """

    @abstractmethod
    def counters(self) -> Counters:
        """Busy flag, error flags and counters."""

    def note_error(self, flags: int) -> None:  # noqa: B027 - optional hook
        """Record sticky error flags (bad frames, bad requests) seen by the bridge."""

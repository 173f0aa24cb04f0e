"""An ideal fake Controller for the protocol tests (imported by conftest.py and the bridge tests)."""

from __future__ import annotations

import numpy as np

from cimlab.firmware_bridge.controller import Controller, Counters, Identity, OpCost
from cimlab.firmware_bridge.errors import DeviceError
from cimlab.firmware_bridge.messages import Status
from cimlab.firmware_bridge.registers import BY_ADDR, REGISTERS
from cimlab.firmware_bridge.spec import MacroSpec

# A macro small enough for fast tests whose ADC resolves every level (s_max = 16 <= adc_max = 31), so MAC
# outputs equal x @ W exactly.
SMALL_SPEC = MacroSpec(
    rows=32,
    cols=8,
    weight_bits=4,
    weight_storage="twos",
    cell_bits=1,
    input_bits=4,
    input_slice_bits=1,
    rows_per_conversion=16,
    adc_bits=5,
    adc_full_scale=31,
    clock_hz=50_000_000,
)


class FakeController(Controller):
    """Ideal numpy controller for bridge tests; records every call in ``calls``.

    ``busy_next`` makes the next that many MAC/MAC_RAW calls refuse with Status.BUSY (without executing).
    """

    def __init__(self, spec: MacroSpec = SMALL_SPEC) -> None:
        self.spec = spec
        self.weights = np.zeros((spec.rows, spec.cols), dtype=np.int64)
        self.regs = {r.addr: r.reset for r in REGISTERS}
        self.error_flags = 0
        self.ops = 0
        self.calls: list[tuple] = []
        self.noted: list[int] = []
        self.busy_next = 0

    # ---- what the tests compare --------------------------------------------------------------------------
    def state(self) -> tuple[bytes, tuple, int]:
        """Weights, registers and op counter: everything a request can change (error flags excluded)."""
        return (self.weights.tobytes(), tuple(sorted(self.regs.items())), self.ops)

    def count(self, name: str) -> int:
        """How many times method ``name`` was called."""
        return sum(1 for c in self.calls if c[0] == name)

    # ---- Controller --------------------------------------------------------------------------------------
    def identity(self) -> Identity:
        self.calls.append(("identity",))
        return Identity("fake-chip-0", "fw-test-1", "bs-test-2")

    def reset(self, clear_weights: bool) -> None:
        self.calls.append(("reset", clear_weights))
        self.regs = {r.addr: r.reset for r in REGISTERS}
        self.error_flags = 0
        self.ops = 0
        if clear_weights:
            self.weights[:] = 0

    def read_reg(self, addr: int) -> int:
        self.calls.append(("read_reg", addr))
        if addr not in BY_ADDR:
            raise DeviceError(f"no register at 0x{addr:02x}", status=Status.BAD_REGISTER)
        if BY_ADDR[addr].name == "ERR_FLAGS":
            return self.error_flags
        return self.regs[addr]

    def write_reg(self, addr: int, value: int) -> int:
        self.calls.append(("write_reg", addr, value))
        reg = BY_ADDR.get(addr)
        if reg is None:
            raise DeviceError(f"no register at 0x{addr:02x}", status=Status.BAD_REGISTER)
        if reg.access == "ro":
            raise DeviceError(f"register {reg.name} is read-only", status=Status.READ_ONLY)
        if reg.access == "w1c":
            self.error_flags &= ~value
            return self.error_flags
        self.regs[addr] = value
        return value

    def write_weights(self, row_start: int, weights: np.ndarray) -> None:
        self.calls.append(("write_weights", row_start, weights.shape))
        self.weights[row_start : row_start + weights.shape[0]] = weights

    def read_weights(self, row_start: int, n_rows: int) -> np.ndarray:
        self.calls.append(("read_weights", row_start, n_rows))
        return self.weights[row_start : row_start + n_rows].copy()

    def _busy(self) -> None:
        if self.busy_next:
            self.busy_next -= 1
            raise DeviceError("controller busy", status=Status.BUSY)

    def mac(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        self.calls.append(("mac", row_start, inputs.shape))
        self._busy()
        w = self.weights[row_start : row_start + inputs.shape[1]]
        self.ops += inputs.shape[0]
        return inputs.astype(np.int64) @ w, OpCost(cycles=7 * inputs.shape[0], energy_fj=11 * inputs.size)

    def mac_raw(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        self.calls.append(("mac_raw", row_start, inputs.shape))
        self._busy()
        spec = self.spec
        x = np.zeros((inputs.shape[0], spec.n_groups * spec.rows_per_conversion), dtype=np.int64)
        x[:, row_start : row_start + inputs.shape[1]] = inputs
        planes = spec.inputs_to_planes(x).astype(np.int64)
        digits = np.zeros((x.shape[1], spec.n_slices, spec.cols), dtype=np.int64)
        digits[: spec.rows] = spec.weights_to_slices(self.weights)
        g, r = spec.n_groups, spec.rows_per_conversion
        s = np.einsum(
            "bpgr,grkc->bpgkc",
            planes.reshape(x.shape[0], spec.n_planes, g, r),
            digits.reshape(g, r, -1, spec.cols),
        )
        # only the row groups holding driven rows are converted
        first, end = row_start // r, -(-(row_start + inputs.shape[1]) // r)
        self.ops += inputs.shape[0]
        codes = np.clip(s[:, :, first:end], 0, spec.adc_max)
        return codes, OpCost(cycles=9 * inputs.shape[0], energy_fj=13 * inputs.size)

    def counters(self) -> Counters:
        self.calls.append(("counters",))
        return Counters(
            busy=False,
            error_flags=self.error_flags,
            cycles=3 * self.ops,
            ops=self.ops,
            conversions=self.ops * self.spec.conversions_per_vector,
            energy_fj=5 * self.ops,
            last=OpCost(cycles=1, energy_fj=2),
        )

    def note_error(self, flags: int) -> None:
        self.noted.append(flags)
        self.error_flags |= flags

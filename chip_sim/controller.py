"""The twin's controller: register file, weight SRAM, input buffer, output FIFO and a cycle-counting FSM.

Two execution paths give identical codes, cycle counts and energy for the same seed and operations:

- ``fast`` (default): whole batches at once through an engine of ``cimlab.chip_sim.fastpath``: on the CPU one fused
  kernel computes the partial sums (exact integers), converts them and recombines the codes tile by tile, with
  the random items drawn in place; with ``device="cuda"`` the same operations run with torch on a GPU.
- ``reference``: ``cimlab.chip_sim.fsm.ReferenceFSM`` advances the controller one clock at a time and computes each
  conversion on its own with integer sums (slow; for tests on small macros).

Cycles are the RTL sequencer's (``bitstreams/rtl/cimlab_seq.sv``): its states and the buffers' layout are defined
once in ``cimlab.firmware_bridge.fabric``, whose formulas both paths use (the reference FSM by stepping through
the states). A request whose data do not fit the fabric's input or output buffer runs as several runs of the
sequencer, each paying the operation overhead, as on the board. READ_WEIGHTS costs cycles too (the SRAM's read
port, then the output buffer); WRITE_WEIGHTS is followed by the bridge's read-back. The tests in ``tests/rtl``
check both paths against the RTL's own counters, codes and weights.

Energy (fJ) scales with (VDD / vdd_nominal)**2 and counts ADC conversions, the sum of the ideal partial sums of the
stored digits (bit-line discharge), word-line pulses of rows with a nonzero input slice, vectors, and written
cell bits: what a board's processor can count too (``cimlab.firmware_bridge.fabric.Activity``).

Only the row groups holding the requested rows are converted (the sequencer skips idle groups); rows of those
groups outside the request see input 0. The per-conversion random stream is indexed by a global vector counter
that RESET does not rewind, so noise stays fresh across resets while a given sequence of operations always gives
the same codes. Writing the NOISE_SEED register rekeys the stream and rewinds the counter: the codes after it
depend only on the key and the operations since (a characterization sweep writes one per batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cimlab.chip_sim.analog import AnalyticConverter, Converter, DataDrivenConverter
from cimlab.chip_sim.config import Profile
from cimlab.chip_sim.fastpath import make_engine
from cimlab.chip_sim.rng import check_seed
from cimlab.chip_sim.rtl.params import fabric_layout, fabric_timing
from cimlab.firmware_bridge.controller import Controller, Counters, Identity, OpCost
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.fabric import Activity
from cimlab.firmware_bridge.errors import ShapeError
from cimlab.firmware_bridge.files import package_version
from cimlab.firmware_bridge.registers import BY_NAME, REGISTERS, check_write, host_register, signed32

if TYPE_CHECKING:
    from cimlab.chip_sim.fsm import ReferenceFSM

_ID_MAX = 255  # HELLO's identity strings are Pascal strings with a one-byte length
_NOISE_SEED = BY_NAME["NOISE_SEED"].addr


@dataclass
class Tally:
    """Integer event counts of one operation, from which its cost follows (``Activity`` plus cycles)."""

    cycles: int = 0
    conversions: int = 0
    level_sum: int = 0
    wordline_pulses: int = 0
    vectors: int = 0
    bits_written: int = 0


class TwinController(Controller):
    """The twin's controller (see the module docstring).

    Args:
        profile: the twin's configuration.
        seed: seeds the static mismatch and the per-conversion randomness, 0..2**64-1.
        device: where the fast path runs: ``"cpu"`` or a torch GPU device (``"cuda"``, ``"cuda:N"``); the codes
            are the same on every device.

    Raises:
        ConfigError: an unknown device. BackendUnavailable: a GPU device without torch.
    """

    def __init__(self, profile: Profile, seed: int = 0, device: str = "cpu") -> None:
        self.profile = profile
        self.spec = profile.spec
        self.seed = check_seed(seed)
        self.device = device
        spec = self.spec
        self.converter: Converter
        if profile.error_model:
            self.converter = DataDrivenConverter(spec, ErrorModel.load(profile.error_model))
        else:
            self.converter = AnalyticConverter(spec, profile.analog, self.seed, profile.device)
        self._stream = self.converter.stream(self.seed)
        self._engine = make_engine(spec, device)
        self.layout = fabric_layout(profile)
        self.timing = fabric_timing(profile)
        self.busy = False
        self._rows_pad = spec.n_groups * spec.rows_per_conversion
        J = spec.physical_cols
        self._digits = np.zeros((self._rows_pad, J), dtype=np.uint8)  # what the SRAM stores
        self._compute = np.zeros((self._rows_pad, J), dtype=np.int64)  # what the array computes with
        self._w32 = np.zeros((spec.n_groups, spec.rows_per_conversion, J), dtype=np.float32)
        self._rowsum = np.zeros(self._rows_pad, dtype=np.int64)  # stored digits summed over columns (energy)
        self.vector_counter = 0
        self._fsm: ReferenceFSM | None = None
        self._regs: dict[int, int] = {}
        self._reset_state()
        self._store_rows(0, spec.weights_to_slices(np.zeros((spec.rows, spec.cols), dtype=np.int64)))

    # ---- identity and state -----------------------------------------------------------------------------
    def identity(self) -> Identity:
        suffix = f"-s{self.seed}"
        room = _ID_MAX - len("twin-") - len(suffix)
        name = self.profile.name.encode("utf-8")[:room].decode("utf-8", "ignore")  # HELLO counts bytes
        return Identity(f"twin-{name}{suffix}", f"cimlab-twin {package_version()}", "twin")

    def _reset_state(self) -> None:
        a = self.profile.analog
        noise_seed = self._regs.get(_NOISE_SEED, 0)
        self._regs = {r.addr: r.reset for r in REGISTERS}
        self._regs[_NOISE_SEED] = noise_seed  # held across RESET, as the stream it keys is
        self._regs[BY_NAME["VDD_MV"].addr] = a.vdd_nominal_mv
        self._regs[BY_NAME["TEMP_CC"].addr] = round(a.temp_nominal_c * 100) & 0xFFFFFFFF
        self.converter.set_conditions(a.vdd_nominal_mv, a.temp_nominal_c)
        self._clear_counters()

    def _clear_counters(self) -> None:
        self._cycles = 0
        self._ops = 0
        self._conversions = 0
        self._energy = 0
        self._last = OpCost(0, 0)

    def reset(self, clear_weights: bool) -> None:
        """Registers to their reset values (VDD_MV and TEMP_CC to the profile's nominal conditions), error flags
        and counters cleared; weights zeroed (logical 0) when asked. The noise stream is not rewound."""
        self._reset_state()
        if clear_weights:
            self._store_rows(0, self.spec.weights_to_slices(np.zeros((self.spec.rows, self.spec.cols), np.int64)))

    def counters(self) -> Counters:
        return Counters(
            busy=self.busy,
            error_flags=self._regs[BY_NAME["ERR_FLAGS"].addr],
            cycles=self._cycles,
            ops=self._ops,
            conversions=self._conversions,
            energy_fj=self._energy,
            last=self._last,
        )

    def note_error(self, flags: int) -> None:
        self._regs[BY_NAME["ERR_FLAGS"].addr] |= flags & 0xFFFFFFFF

    @property
    def vdd_mv(self) -> int:
        """The supply setpoint, mV."""
        return self._regs[BY_NAME["VDD_MV"].addr]

    @property
    def temp_c(self) -> float:
        """The die temperature, degC (TEMP_CC is signed centi-degrees)."""
        return signed32(self._regs[BY_NAME["TEMP_CC"].addr]) / 100.0

    def latency_s(self, cost: OpCost) -> float:
        """Seconds an operation of ``cost`` takes at the profile's clock."""
        return cost.cycles / self.spec.clock_hz

    # ---- registers --------------------------------------------------------------------------------------
    def read_reg(self, addr: int) -> int:
        reg = host_register(addr)
        if reg.name == "CYCLES_LO":
            return self._cycles & 0xFFFFFFFF
        if reg.name == "CYCLES_HI":
            return (self._cycles >> 32) & 0xFFFFFFFF
        if reg.name == "OPS":
            return self._ops & 0xFFFFFFFF
        return self._regs[addr]

    def write_reg(self, addr: int, value: int) -> int:
        a = self.profile.analog
        reg = check_write(addr, value, vdd_range_mv=(a.vdd_min_mv, a.vdd_max_mv),
                          temp_range_cc=(round(a.temp_min_c * 100), round(a.temp_max_c * 100)))
        if reg.access == "w1c":
            self._regs[addr] &= ~value & 0xFFFFFFFF
        elif reg.name == "CTRL":
            if value & 1:
                self._clear_counters()
            self._regs[addr] = value & ~1
        elif reg.name == "VDD_MV":
            self._regs[addr] = value
            self.converter.set_conditions(value, self.temp_c)
        elif reg.name == "TEMP_CC":
            self._regs[addr] = value
            self.converter.set_conditions(self.vdd_mv, self.temp_c)
        elif addr == _NOISE_SEED:
            self._regs[addr] = value
            if self._stream is not None:
                self._stream.rekey(value)
            self.vector_counter = 0
        else:
            self._regs[addr] = value
        return self.read_reg(addr)

    # ---- weights ----------------------------------------------------------------------------------------
    def _check_rows(self, row_start: int, n_rows: int) -> None:
        if n_rows < 1 or row_start < 0 or row_start + n_rows > self.spec.rows:
            raise ShapeError(
                f"rows {row_start}..{row_start + n_rows - 1} are outside the array (0..{self.spec.rows - 1})"
            )

    def _store_rows(self, row0: int, slices: np.ndarray) -> None:
        """Stored digits [n, n_slices, cols] at rows row0.. -> SRAM, compute weights and their float32 copy."""
        n = slices.shape[0]
        digits = slices.reshape(n, self.spec.physical_cols)
        self._digits[row0 : row0 + n] = digits
        compute = self.converter.compute_digits(digits, row0)
        self._compute[row0 : row0 + n] = compute
        self._rowsum[row0 : row0 + n] = digits.sum(axis=1, dtype=np.int64)
        self._w32.reshape(self._rows_pad, -1)[row0 : row0 + n] = compute
        self._engine.weights_changed(row0, n)

    def write_weights(self, row_start: int, weights: np.ndarray) -> None:
        spec = self.spec
        w = np.asarray(weights)
        if w.ndim != 2 or w.shape[1] != spec.cols:
            raise ShapeError(f"weights have shape {w.shape}; expected [n_rows, cols={spec.cols}]")
        self._check_rows(row_start, w.shape[0])
        _check_range(w, spec.weight_min, spec.weight_max, "weights")
        n = w.shape[0]
        bits = n * spec.physical_cols * spec.cell_bits
        with self._busy():
            if self.profile.mode == "reference":
                cycles = self._reference().write_weights(row_start, spec.weights_to_slices(w))
            else:
                self._store_rows(row_start, spec.weights_to_slices(w))
                cycles = self.layout.weight_cycles(n, True, self.timing)
        self._account(Tally(cycles=cycles, bits_written=bits), vectors=0)

    def read_weights(self, row_start: int, n_rows: int) -> np.ndarray:
        self._check_rows(row_start, n_rows)
        with self._busy():
            if self.profile.mode == "reference":
                out, cycles = self._reference().read_weights(row_start, n_rows)
            else:
                spec = self.spec
                d = self._digits[row_start : row_start + n_rows].reshape(n_rows, spec.n_slices, spec.cols)
                out, cycles = spec.slices_to_weights(d), self.layout.weight_cycles(n_rows, False, self.timing)
        self._account(Tally(cycles=cycles), vectors=0)
        return out

    @contextmanager
    def _busy(self) -> Iterator[None]:
        """The sequencer is busy while an operation runs (STATUS's ``busy``)."""
        self.busy = True
        try:
            yield
        finally:
            self.busy = False

    # ---- MAC --------------------------------------------------------------------------------------------
    def mac(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        x = self._check_inputs(row_start, inputs)
        codes, cost = self._run(row_start, x, raw=False)
        return codes, cost

    def mac_raw(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        x = self._check_inputs(row_start, inputs)
        return self._run(row_start, x, raw=True)

    def _check_inputs(self, row_start: int, inputs: np.ndarray) -> np.ndarray:
        spec = self.spec
        x = np.asarray(inputs)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ShapeError(f"inputs have shape {x.shape}; expected [batch >= 1, n_rows]")
        self._check_rows(row_start, x.shape[1])
        _check_range(x, 0, spec.input_max, "inputs")
        return x

    def _run(self, row_start: int, x: np.ndarray, *, raw: bool) -> tuple[np.ndarray, OpCost]:
        with self._busy():
            if self.profile.mode == "reference":
                codes, tally = self._reference().run(row_start, x, raw=raw)
                out = codes if raw else self._recombine(codes, x)
            else:
                out, tally = self._fast(row_start, x, raw=raw)
        cost = self._account(tally, vectors=x.shape[0])
        return out, cost

    def _recombine(self, codes: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self.spec.recombine(codes, x).astype(np.int32)

    def vector_cycles(self, row_start: int, n_rows: int, *, raw: bool) -> int:
        """Cycles one MAC vector over rows ``row_start .. +n_rows`` takes (``FabricLayout.vector_cycles``)."""
        g0, g1 = self.spec.group_span(row_start, n_rows)
        return self.layout.vector_cycles(g1 - g0, raw, self.timing)

    def _fast(self, row_start: int, x: np.ndarray, *, raw: bool) -> tuple[np.ndarray, Tally]:
        spec = self.spec
        batch, n_rows = x.shape
        P, K, C = spec.n_planes, spec.n_slices, spec.cols
        g0, g1 = spec.group_span(row_start, n_rows)
        Gs = g1 - g0
        rng_state = self._stream.pcg_state() if self._stream is not None else None
        result, events = self._engine.mac(x, row_start, g0, g1, self._w32, self._rowsum, self.converter.fused(),
                                          rng_state, self.vector_counter, raw=raw)
        self.vector_counter += batch
        if raw:
            out = result.reshape(batch, P, Gs, K, C)
        else:
            # result[b, k * C + c]: codes summed over groups and planes, each plane weighted
            acc = np.einsum("bkc,k->bc", result.reshape(batch, K, C), spec.slice_weights())
            out = spec.scale_accumulated(acc, x).astype(np.int32)
        tally = Tally(
            cycles=self.layout.mac_cycles(batch, Gs, raw, self.timing),
            conversions=batch * P * Gs * spec.physical_cols,
            level_sum=int(events[:, 0].sum()),
            wordline_pulses=int(events[:, 1].sum()),
            vectors=batch,
        )
        return out, tally

    def _reference(self) -> ReferenceFSM:
        if self._fsm is None:  # imported lazily: the fast path never needs it
            from cimlab.chip_sim.fsm import ReferenceFSM

            self._fsm = ReferenceFSM(self)
        return self._fsm

    # ---- accounting -------------------------------------------------------------------------------------
    def activity_energy(self, activity: Activity | Tally, vdd_mv: int) -> int:
        """Estimated energy of an operation's activity at supply ``vdd_mv``, femtojoules (rounded).

        The RTL twin's board controller estimates its energy with this, from what its processor counts.
        """
        e = self.profile.energy
        vscale = (vdd_mv / self.profile.analog.vdd_nominal_mv) ** 2
        energy = vscale * (
            e.adc_fj * activity.conversions
            + e.bitline_fj_per_level * activity.level_sum
            + e.wordline_fj * activity.wordline_pulses
            + e.digital_fj_per_vector * activity.vectors
            + e.write_fj_per_bit * activity.bits_written
        )
        return round(energy)

    def _account(self, tally: Tally, *, vectors: int) -> OpCost:
        cost = OpCost(cycles=tally.cycles, energy_fj=self.activity_energy(tally, self.vdd_mv))
        self._cycles += cost.cycles
        self._energy += cost.energy_fj
        self._ops += vectors
        self._conversions += tally.conversions
        self._last = cost
        return cost


def _check_range(a: np.ndarray, lo: int, hi: int, what: str) -> None:
    if a.dtype.kind not in "iu":
        raise ShapeError(f"{what} must be integers, got dtype {a.dtype}")
    if a.size:
        amin, amax = int(a.min()), int(a.max())
        if amin < lo or amax > hi:
            raise ShapeError(f"{what} span {amin}..{amax}, outside the allowed {lo}..{hi}")

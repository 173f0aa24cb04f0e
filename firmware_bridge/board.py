"""The board-side controller: the device end's ``Controller`` over the fabric of ``bitstreams/rtl``.

On a PYNQ (Zynq) board the protocol's device end runs on the ARM: ``cimlab.firmware_bridge.bridge.Bridge`` over a
``FabricController``, which drives the fabric through a ``FabricBus``: ``PynqBus`` (``pynq.MMIO``) on the board,
or the RTL twin's simulated AXI4-Lite master (``cimlab.chip_sim.rtl``). One implementation of the device end
serves the Python twin, the RTL twin and a board.

What the processor does, per request: validate (the bridge has already checked shapes and ranges), pack the data
into the input buffer (``cimlab.firmware_bridge.fabric``), start the sequencer for as many runs as the buffers
need, wait for each to finish (a deadline per run), read the output buffer back, and finish what the fabric leaves
to software (the ADC's full-scale scaling and the ``offset`` storage correction of ``MacroSpec.recombine``). The
MacroSpec, the buffer sizes and the operating limits are read from the fabric's registers: nothing is restated.
Cycle counts are the fabric's own counters. Energy is an estimate from the activity (``EnergyModel``); a board
without one reports 0.

This module runs on the board: Python 3.10, numpy < 2, no torch, no host code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
from cimlab.firmware_bridge.controller import Controller, Counters, Identity, OpCost
from cimlab.firmware_bridge.errors import ArtifactError, BackendUnavailable, DeviceError, VersionMismatch
from cimlab.firmware_bridge.fabric import Activity, FabricLayout, input_activity
from cimlab.firmware_bridge.files import package_version
from cimlab.firmware_bridge.messages import Status
from cimlab.firmware_bridge.registers import (
    ID_MAGIC,
    IN_BUF_BASE,
    OUT_BUF_BASE,
    REGMAP_VERSION,
    SEQ_BUSY,
    SEQ_DONE,
    SEQ_MAC,
    SEQ_MAC_RAW,
    SEQ_READ_WEIGHTS,
    SEQ_REFUSED,
    SEQ_WRITE_WEIGHTS,
    STORAGE_CODES,
    byte_offset,
    check_write,
    host_register,
    signed32,
)
from cimlab.firmware_bridge.spec import MacroSpec

EnergyModel = Callable[[Activity, int], int]
"""``(activity, vdd_mv) -> femtojoules``: the energy estimate of one operation at a supply."""

RUN_TIMEOUT_S = 10.0
"""Default deadline for one run of the sequencer, seconds."""


class FabricBus(Protocol):
    """The processor's view of the fabric: 32-bit words at byte offsets of its AXI4-Lite port."""

    def read32(self, offset: int) -> int:
        """The word at byte ``offset``."""

    def write32(self, offset: int, value: int) -> None:
        """Write a word at byte ``offset``."""

    def read_block(self, offset: int, n_words: int) -> np.ndarray:
        """``n_words`` consecutive words from byte ``offset`` (uint32)."""

    def write_block(self, offset: int, words: np.ndarray) -> None:
        """Write consecutive words (uint32) from byte ``offset``."""

    def wait_irq(self, timeout_s: float) -> bool:
        """Wait until the fabric's interrupt (a run finished) is raised; False after ``timeout_s`` seconds."""



class FabricController(Controller):
    """The device end's controller over a fabric (see the module docstring).

    Args:
        bus: the fabric's AXI4-Lite port.
        chip_id: reported in HELLO (at most 255 bytes).
        energy: the energy estimate per operation; None reports 0.
        run_timeout_s: deadline for one run of the sequencer, seconds.
        bitstream_id: reported in HELLO (default: ``cimlab_ctrl-`` and the fabric's BUILD_ID).
    """

    def __init__(
        self,
        bus: FabricBus,
        *,
        chip_id: str = "board",
        energy: EnergyModel | None = None,
        run_timeout_s: float = RUN_TIMEOUT_S,
        bitstream_id: str | None = None,
    ) -> None:
        self.bus = bus
        self.energy_model = energy
        self.run_timeout_s = run_timeout_s
        magic = bus.read32(byte_offset("ID"))
        if magic != ID_MAGIC:
            raise ArtifactError(f"no cimlab controller on this bus: ID reads 0x{magic:08x}, not 0x{ID_MAGIC:08x}")
        regmap = bus.read32(byte_offset("REGMAP"))
        if regmap != REGMAP_VERSION:
            raise VersionMismatch(
                f"the fabric implements register map v{regmap}; this software expects v{REGMAP_VERSION}"
            )
        self.spec = self._read_spec()
        self.layout = FabricLayout(self.spec, self._g("G_BUS_BITS"), self._g("G_IN_WORDS"), self._g("G_OUT_WORDS"))
        self.vdd_range = (self._g("G_VDD_MIN_MV"), self._g("G_VDD_MAX_MV"))
        self.temp_range = (signed32(self._g("G_TEMP_MIN_CC")), signed32(self._g("G_TEMP_MAX_CC")))
        build = self._g("BUILD_ID")
        self._identity = Identity(
            chip_id, f"cimlab-board {package_version()}", bitstream_id or f"cimlab_ctrl-{build:08x}"
        )
        rows_pad = self.spec.n_groups * self.spec.rows_per_conversion
        self._rowsum = np.zeros(rows_pad, dtype=np.int64)
        self._energy = 0
        self._last = OpCost(0, 0)
        self._vdd_mv = 0
        self.reset(clear_weights=True)

    # ---- identity and state -----------------------------------------------------------------------------
    def _g(self, name: str) -> int:
        return self.bus.read32(byte_offset(name))

    def _read_spec(self) -> MacroSpec:
        storage = {v: k for k, v in STORAGE_CODES.items()}.get(self._g("G_WEIGHT_STORAGE"))
        if storage is None:
            raise ArtifactError("the fabric reports an unknown weight storage code")
        return MacroSpec(
            rows=self._g("G_ROWS"),
            cols=self._g("G_COLS"),
            weight_bits=self._g("G_WEIGHT_BITS"),
            weight_storage=storage,
            cell_bits=self._g("G_CELL_BITS"),
            input_bits=self._g("G_INPUT_BITS"),
            input_slice_bits=self._g("G_INPUT_SLICE_BITS"),
            rows_per_conversion=self._g("G_ROWS_PER_CONV"),
            adc_bits=self._g("G_ADC_BITS"),
            adc_full_scale=self._g("G_ADC_FULL_SCALE"),
            clock_hz=self._g("G_CLOCK_HZ"),
        )

    def identity(self) -> Identity:
        return self._identity

    def reset(self, clear_weights: bool) -> None:
        """SOFT_RESET (a run in progress stops); zero the weights first when asked, so the counters end at 0."""
        self.bus.write32(byte_offset("SOFT_RESET"), 1)
        if clear_weights:
            self._write_rows(0, np.zeros((self.spec.rows, self.spec.cols), dtype=np.int64))
            self.bus.write32(byte_offset("SOFT_RESET"), 1)
        self._energy = 0
        self._last = OpCost(0, 0)
        self._vdd_mv = self.bus.read32(byte_offset("VDD_MV"))

    def counters(self) -> Counters:
        lo, hi = self._g("CYCLES_LO"), self._g("CYCLES_HI")
        clo, chi = self._g("CONV_LO"), self._g("CONV_HI")
        return Counters(
            busy=bool(self._g("SEQ_STATUS") & SEQ_BUSY),
            error_flags=self._g("ERR_FLAGS"),
            cycles=(hi << 32) | lo,
            ops=self._g("OPS"),
            conversions=(chi << 32) | clo,
            energy_fj=self._energy,
            last=self._last,
        )

    def note_error(self, flags: int) -> None:
        self.bus.write32(byte_offset("ERR_SET"), flags & 0xFFFFFFFF)

    # ---- registers --------------------------------------------------------------------------------------
    def read_reg(self, addr: int) -> int:
        host_register(addr)
        return self.bus.read32(4 * addr)

    def write_reg(self, addr: int, value: int) -> int:
        reg = check_write(addr, value, vdd_range_mv=self.vdd_range, temp_range_cc=self.temp_range)
        self.bus.write32(4 * addr, value)
        if reg.name == "CTRL" and value & 1:
            self._energy = 0
            self._last = OpCost(0, 0)
        if reg.name == "VDD_MV":
            self._vdd_mv = value
        return self.bus.read32(4 * addr)

    # ---- the sequencer ----------------------------------------------------------------------------------
    def _run(self, op: int, first: int, span: int, count: int) -> int:
        """One run of the sequencer; returns the cycles it took (the fabric's RUN_CYCLES)."""
        bus = self.bus
        if bus.read32(byte_offset("SEQ_STATUS")) & SEQ_BUSY:
            raise DeviceError(
                "the sequencer is still busy with an earlier run (RESET stops it)", status=Status.BUSY
            )
        bus.write32(byte_offset("SEQ_FIRST"), first)
        bus.write32(byte_offset("SEQ_SPAN"), span)
        bus.write32(byte_offset("SEQ_COUNT"), count)
        bus.write32(byte_offset("SEQ_START"), op)
        bus.wait_irq(self.run_timeout_s)
        status = bus.read32(byte_offset("SEQ_STATUS"))
        if status & SEQ_REFUSED:
            raise DeviceError(
                f"the fabric refused a run (op {op}, first {first}, span {span}, count {count})",
                status=Status.INTERNAL,
            )
        if not status & SEQ_DONE:
            raise DeviceError(
                f"the sequencer did not finish a run within {self.run_timeout_s:g} s (op {op});"
                " it stays busy until RESET",
                status=Status.INTERNAL,
            )
        return bus.read32(byte_offset("RUN_CYCLES"))

    def _account(self, cycles: int, activity: Activity) -> OpCost:
        energy = self.energy_model(activity, self._vdd_mv) if self.energy_model is not None else 0
        self._energy += energy
        self._last = OpCost(cycles=cycles, energy_fj=energy)
        return self._last

    # ---- weights ----------------------------------------------------------------------------------------
    def _write_rows(self, row_start: int, weights: np.ndarray) -> int:
        lay = self.layout
        records = lay.pack_weight_rows(weights)
        cycles = 0
        for first, n in lay.runs(weights.shape[0], lay.rows_per_run(write=True)):
            self.bus.write_block(IN_BUF_BASE, records[first : first + n].ravel())
            cycles += self._run(SEQ_WRITE_WEIGHTS, row_start + first, 0, n)
        digits = self.spec.weights_to_slices(weights).reshape(weights.shape[0], -1).astype(np.int64)
        self._rowsum[row_start : row_start + weights.shape[0]] = digits.sum(axis=1)
        return cycles

    def write_weights(self, row_start: int, weights: np.ndarray) -> None:
        w = np.asarray(weights, dtype=np.int64)
        cycles = self._write_rows(row_start, w)
        bits = w.shape[0] * self.spec.physical_cols * self.spec.cell_bits
        self._account(cycles, Activity(bits_written=bits))

    def read_weights(self, row_start: int, n_rows: int) -> np.ndarray:
        lay = self.layout
        out = np.empty((n_rows, self.spec.cols), dtype=np.int64)
        cycles = 0
        per_row = lay.row_words * lay.lanes
        for first, n in lay.runs(n_rows, lay.rows_per_run(write=False)):
            cycles += self._run(SEQ_READ_WEIGHTS, row_start + first, 0, n)
            words = self.bus.read_block(OUT_BUF_BASE, n * per_row).reshape(n, per_row)
            out[first : first + n] = lay.unpack_weight_rows(words)
        self._account(cycles, Activity())
        return out

    # ---- MAC --------------------------------------------------------------------------------------------
    def _macs(self, row_start: int, x: np.ndarray, raw: bool) -> tuple[np.ndarray, OpCost]:
        spec, lay = self.spec, self.layout
        batch, n_rows = x.shape
        g0, g1 = spec.group_span(row_start, n_rows)
        span = g1 - g0
        records = lay.pack_inputs(row_start, x)
        per_out = lay.out_words_per_vector(span, raw) * lay.lanes
        out = (
            np.empty((batch, *spec.raw_shape_for(row_start, n_rows)), spec.code_dtype)
            if raw
            else np.empty((batch, spec.cols), np.int64)
        )
        cycles = 0
        for first, n in lay.runs(batch, lay.vectors_per_run(span, raw)):
            self.bus.write_block(IN_BUF_BASE, records[first : first + n].ravel())
            cycles += self._run(SEQ_MAC_RAW if raw else SEQ_MAC, g0, span, n)
            words = self.bus.read_block(OUT_BUF_BASE, n * per_out).reshape(n, per_out)
            out[first : first + n] = lay.unpack_raw(words, span) if raw else lay.unpack_mac(words)
        pulses, level_sum = input_activity(spec, self._rowsum, row_start, x)
        activity = Activity(
            conversions=batch * spec.n_planes * span * spec.physical_cols,
            level_sum=level_sum,
            wordline_pulses=pulses,
            vectors=batch,
        )
        return out, self._account(cycles, activity)

    def mac(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        x = np.asarray(inputs)
        acc, cost = self._macs(row_start, x, raw=False)
        return self.spec.scale_accumulated(acc, x).astype(np.int32), cost

    def mac_raw(self, row_start: int, inputs: np.ndarray) -> tuple[np.ndarray, OpCost]:
        return self._macs(row_start, np.asarray(inputs), raw=True)


class PynqBus:
    """``FabricBus`` over ``pynq.MMIO`` on a PYNQ board (the controller's AXI4-Lite port in the overlay).

    Args:
        mmio: a ``pynq.MMIO`` (or an overlay IP's ``.mmio``) spanning the controller's address window.
        poll_s: longest sleep between two polls of SEQ_STATUS while waiting for a run, seconds.
    """

    def __init__(self, mmio: object, *, poll_s: float = 1e-3) -> None:
        self.mmio = mmio
        self.poll_s = poll_s
        self._words = mmio.array  # type: ignore[attr-defined]  # a uint32 view of the window

    def read32(self, offset: int) -> int:
        return int(self.mmio.read(offset))  # type: ignore[attr-defined]

    def write32(self, offset: int, value: int) -> None:
        self.mmio.write(offset, int(value))  # type: ignore[attr-defined]

    def read_block(self, offset: int, n_words: int) -> np.ndarray:
        return np.array(self._words[offset // 4 : offset // 4 + n_words], dtype=np.uint32)

    def write_block(self, offset: int, words: np.ndarray) -> None:
        self._words[offset // 4 : offset // 4 + len(words)] = np.asarray(words, dtype=np.uint32)

    def wait_irq(self, timeout_s: float) -> bool:
        """Poll SEQ_STATUS (done or refused) with a growing sleep, until ``timeout_s`` seconds have passed."""
        deadline = time.monotonic() + timeout_s
        delay = 20e-6
        while True:
            if self.read32(byte_offset("SEQ_STATUS")) & (SEQ_DONE | SEQ_REFUSED):
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, self.poll_s)


def open_pynq_overlay(bitfile: str, ip_name: str = "cimlab_ctrl_0") -> tuple[object, PynqBus]:
    """Load an overlay with ``pynq``; return it and a bus on its controller IP (BackendUnavailable: no pynq)."""
    try:
        import pynq  # noqa: PLC0415 - only on a board
    except (ImportError, OSError, RuntimeError) as err:
        raise BackendUnavailable(
            f"the board needs the pynq package ({err}); install cimlab[board] on the board"
        ) from err
    overlay = pynq.Overlay(bitfile)
    try:
        ip = getattr(overlay, ip_name)
    except AttributeError:
        ips = ", ".join(sorted(getattr(overlay, "ip_dict", {}))) or "none"
        raise ArtifactError(f"overlay {bitfile!r} has no IP {ip_name!r} (it has: {ips})") from None
    return overlay, PynqBus(ip.mmio)


__all__ = ["EnergyModel", "FabricBus", "FabricController", "PynqBus", "open_pynq_overlay"]

"""Reference mode: the RTL sequencer (``bitstreams/rtl/cimlab_seq.sv``) stepped one clock at a time in Python.

The states, their lengths and their order are the RTL's, one for one (``cimlab.firmware_bridge.fabric`` gives the
formulas; ``tests/rtl`` checks the cycle counts against the RTL's counters)::

    DECODE(op_overhead) once per run
    WRITE_WEIGHTS  per row:    WLOAD(row_words + 1) -> WWRITE(write_row_cycles)
    READ_WEIGHTS   per row:    RREAD(read_row_cycles) -> RSTORE(row_words)
    MAC, MAC_RAW   per vector: VLOAD(span * group_words + 1) -> per input plane, most significant first:
                               VPULSE(wl_pulse) -> per row group: VCONV(adc_cycles) [-> VCODES(conv_words) raw]
                               -> MAC: VDRAIN(2: the accumulate pipeline) -> VOUT(mac_words)

A request runs as several runs when its data do not fit the fabric's buffers (``FabricLayout.runs``). A state's
action happens on its last clock: WWRITE stores the row, RREAD takes the row from the SRAM, VLOAD latches the
vector (and draws its random items), VCONV converts every physical column of one row group for one plane, each on
its own (integer partial sums, then ``Converter.convert_one``), VOUT and the last VCODES finish the vector. This
is deliberately slow and independent of the fast path's arithmetic; tests check that both give the same codes,
cycles and energy, and that both equal the RTL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from cimlab.firmware_bridge.fabric import ACC_PIPELINE

if TYPE_CHECKING:
    from cimlab.chip_sim.controller import Tally, TwinController


class State(Enum):
    """The sequencer's states (the RTL's S_* codes)."""

    IDLE = 0
    DECODE = 1
    WLOAD = 2
    WWRITE = 3
    RREAD = 4
    RSTORE = 5
    VLOAD = 6
    VPULSE = 7
    VCONV = 8
    VCODES = 9
    VDRAIN = 10
    VOUT = 11


class Op(Enum):
    """What a run does."""

    WRITE = "write"
    READ = "read"
    MAC = "mac"
    RAW = "raw"


@dataclass
class Run:
    """One run of the sequencer: its operation, its items and what it produced."""

    op: Op
    first: int
    count: int
    span: int = 0
    rows: np.ndarray | None = None
    """WRITE: stored digits [count, n_slices, cols]."""
    vectors: np.ndarray | None = None
    """MAC: input slices [count, planes, span * rows_per_conversion] (int64)."""
    out: list[np.ndarray] = field(default_factory=list)
    """READ: digit rows; MAC: codes [planes, span, physical_cols] of each vector, in order."""


class ReferenceFSM:
    """The clocked sequencer of one twin (shares its SRAM, converter, random stream and vector counter)."""

    def __init__(self, twin: TwinController) -> None:
        self.twin = twin
        self.spec = twin.spec
        self.layout = twin.layout
        self.timing = twin.timing
        self.state = State.IDLE
        self.cycles = 0
        self.run_: Run | None = None
        self.item = 0
        self.count = 0
        self.plane = 0
        self.group = 0
        self.conv_left = 0
        self.codes = np.zeros(0, dtype=np.int64)
        self.items: list[int] | None = None
        self.tally: Tally | None = None

    # ---- the clock --------------------------------------------------------------------------------------
    def start(self, run: Run) -> None:
        """SEQ_START: a run begins (DECODE, or its first item at once when op_overhead is 0)."""
        self.run_ = run
        self.item = 0
        if self.timing.op_overhead_cycles > 0:
            self.state, self.count = State.DECODE, self.timing.op_overhead_cycles - 1
        else:
            self._begin_item()

    def tick(self) -> None:
        """Advance one clock."""
        if self.state is State.IDLE:
            return
        self.cycles += 1
        step = getattr(self, f"_tick_{self.state.name.lower()}")
        step()

    def run_to_idle(self) -> None:
        """Clock until the run is over."""
        while self.state is not State.IDLE:
            self.tick()

    def _begin_item(self) -> None:
        run = self.run_
        assert run is not None
        self.count = 0
        if run.op is Op.WRITE:
            self.state = State.WLOAD
        elif run.op is Op.READ:
            self.state, self.count = State.RREAD, self.timing.read_row_cycles - 1
        else:
            self.state = State.VLOAD

    def _end_item(self) -> None:
        run = self.run_
        assert run is not None
        self.item += 1
        if self.item == run.count:
            self.state = State.IDLE
        else:
            self._begin_item()

    # ---- states -----------------------------------------------------------------------------------------
    def _tick_decode(self) -> None:
        if self.count == 0:
            self._begin_item()
        else:
            self.count -= 1

    def _tick_wload(self) -> None:
        if self.count == self.layout.row_words:
            self.state, self.count = State.WWRITE, self.timing.write_row_cycles - 1
        else:
            self.count += 1

    def _tick_wwrite(self) -> None:
        if self.count:
            self.count -= 1
            return
        run = self.run_
        assert run is not None and run.rows is not None
        self.twin._store_rows(run.first + self.item, run.rows[self.item : self.item + 1])
        self._end_item()

    def _tick_rread(self) -> None:
        if self.count:
            self.count -= 1
            return
        run = self.run_
        assert run is not None
        run.out.append(self.twin._digits[run.first + self.item].copy())
        self.state, self.count = State.RSTORE, 0

    def _tick_rstore(self) -> None:
        if self.count == self.layout.row_words - 1:
            self._end_item()
        else:
            self.count += 1

    def _tick_vload(self) -> None:
        run = self.run_
        assert run is not None
        if self.count < run.span * self.layout.group_words:
            self.count += 1
            return
        twin, spec = self.twin, self.spec
        stream = twin._stream
        self.items = stream.draw(twin.vector_counter, 1)[0].tolist() if stream is not None else None
        twin.vector_counter += 1
        self.codes = np.zeros((spec.n_planes, run.span, spec.physical_cols), dtype=np.int64)
        self.plane, self.group = spec.n_planes - 1, 0
        self.state, self.count = State.VPULSE, self.timing.wl_pulse_cycles - 1

    def _tick_vpulse(self) -> None:
        if self.count:
            self.count -= 1
            return
        run = self.run_
        assert run is not None and run.vectors is not None and self.tally is not None
        xp = run.vectors[self.item, self.plane]
        self.tally.wordline_pulses += int(np.count_nonzero(xp))
        self.state, self.conv_left = State.VCONV, self.timing.adc_cycles

    def _tick_vconv(self) -> None:
        self.conv_left -= 1
        if self.conv_left:
            return
        self._convert()
        run = self.run_
        assert run is not None
        if run.op is Op.RAW:
            self.state, self.count = State.VCODES, 0
        else:
            self._next_conversion()

    def _tick_vcodes(self) -> None:
        if self.count == self.layout.conv_words - 1:
            self._next_conversion()
        else:
            self.count += 1

    def _tick_vdrain(self) -> None:
        if self.count == ACC_PIPELINE - 1:
            self.state, self.count = State.VOUT, 0
        else:
            self.count += 1

    def _tick_vout(self) -> None:
        if self.count == self.layout.mac_words - 1:
            self._finish_vector()
        else:
            self.count += 1

    def _next_conversion(self) -> None:
        run = self.run_
        assert run is not None
        if self.group + 1 < run.span:
            self.group += 1
            self.state, self.conv_left = State.VCONV, self.timing.adc_cycles
        elif self.plane > 0:
            self.plane, self.group = self.plane - 1, 0
            self.state, self.count = State.VPULSE, self.timing.wl_pulse_cycles - 1
        elif run.op is Op.RAW:
            self._finish_vector()
        else:
            self.state, self.count = State.VDRAIN, 0

    def _finish_vector(self) -> None:
        run = self.run_
        assert run is not None and self.tally is not None
        run.out.append(self.codes)
        self.tally.vectors += 1
        self._end_item()

    def _convert(self) -> None:
        """One conversion: every physical column of row group ``first + group`` for input plane ``plane``."""
        twin, spec, run = self.twin, self.spec, self.run_
        assert run is not None and run.vectors is not None and self.tally is not None
        R, G, J = spec.rows_per_conversion, spec.n_groups, spec.physical_cols
        g = run.first + self.group
        xp = run.vectors[self.item, self.plane, self.group * R : (self.group + 1) * R].tolist()
        compute = twin._compute[g * R : (g + 1) * R].tolist()
        rowsum = twin._rowsum[g * R : (g + 1) * R].tolist()
        for j in range(J):
            s = sum(x * row[j] for x, row in zip(xp, compute, strict=True) if x)
            item = self.items[(self.plane * G + g) * J + j] if self.items is not None else 0
            self.codes[self.plane, self.group, j] = twin.converter.convert_one(s, j, item)
        self.tally.level_sum += sum(x * r for x, r in zip(xp, rowsum, strict=True))
        self.tally.conversions += J

    # ---- operations -------------------------------------------------------------------------------------
    def write_weights(self, row_start: int, slices: np.ndarray) -> int:
        """Store digit rows [n, n_slices, cols] from ``row_start``; returns the cycles taken."""
        self.cycles = 0
        for first, n in self.layout.runs(slices.shape[0], self.layout.rows_per_run(write=True)):
            self.start(Run(Op.WRITE, row_start + first, n, rows=slices[first : first + n]))
            self.run_to_idle()
        return self.cycles

    def read_weights(self, row_start: int, n_rows: int) -> tuple[np.ndarray, int]:
        """Logical weights [n_rows, cols] read through the SRAM's read port, and the cycles taken."""
        spec = self.spec
        self.cycles = 0
        rows: list[np.ndarray] = []
        for first, n in self.layout.runs(n_rows, self.layout.rows_per_run(write=False)):
            run = Run(Op.READ, row_start + first, n)
            self.start(run)
            self.run_to_idle()
            rows += run.out
        digits = np.stack(rows).reshape(n_rows, spec.n_slices, spec.cols)
        return spec.slices_to_weights(digits), self.cycles

    def run(self, row_start: int, x: np.ndarray, *, raw: bool) -> tuple[np.ndarray, Tally]:
        """Codes [batch, P, groups spanned, K, C] of inputs [batch, n_rows] at ``row_start``, and the tally."""
        from cimlab.chip_sim.controller import Tally

        spec = self.spec
        batch, n_rows = x.shape
        g0, g1 = spec.group_span(row_start, n_rows)
        span = g1 - g0
        R = spec.rows_per_conversion
        full = np.zeros((batch, span * R), dtype=np.int64)
        full[:, row_start - g0 * R : row_start - g0 * R + n_rows] = x
        planes = spec.inputs_to_planes(full).astype(np.int64)
        self.cycles = 0
        self.tally = Tally()
        vectors: list[np.ndarray] = []
        for first, n in self.layout.runs(batch, self.layout.vectors_per_run(span, raw)):
            run = Run(Op.RAW if raw else Op.MAC, g0, n, span=span, vectors=planes[first : first + n])
            self.start(run)
            self.run_to_idle()
            vectors += run.out
        codes = np.stack(vectors).reshape(batch, spec.n_planes, span, spec.n_slices, spec.cols)
        tally, self.tally = self.tally, None
        tally.cycles = self.cycles
        return codes.astype(spec.code_dtype), tally

"""Reference mode: the controller FSM advanced one clock at a time, each conversion computed on its own.

States and their durations (clock cycles, from ``profile.timing``; see ``cimlab.chip_sim.controller``)::

    MAC:    DECODE(op_overhead) -> per vector: LOAD(input words) -> per input slice p: PULSE(wl_pulse)
            -> per spanned row group g: CONVERT(adc_cycles) -> ... -> READOUT(output words) -> next vector | DONE
    WRITE:  DECODE(op_overhead) -> per row: BUS(row words) -> WRITE(write_row_cycles) -> next row | DONE

A state's action happens on its last clock: LOAD latches the input vector (and its random items), CONVERT
converts every physical column of group ``g`` for slice ``p`` (integer partial sums, then
``Converter.convert_one``), READOUT moves the codes to the output FIFO, WRITE stores a row. A state of zero
cycles acts at once. This is deliberately slow and independent of the fast path's arithmetic layout; tests
check that both give the same codes, cycles and energy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cimlab.chip_sim.controller import Tally, TwinController


class ReferenceFSM:
    """The clocked controller of one twin (shares its SRAM, converter, random stream and vector counter)."""

    def __init__(self, twin: TwinController) -> None:
        self.twin = twin
        self.state = "IDLE"
        self._remaining = 0
        self._on_done: Callable[[], None] | None = None
        self.cycles = 0

    # ---- the clock --------------------------------------------------------------------------------------
    def _enter(self, state: str, cycles: int, on_done: Callable[[], None]) -> None:
        self.state = state
        self._remaining = cycles
        self._on_done = on_done
        if cycles == 0:
            self._finish()

    def _finish(self) -> None:
        action, self._on_done = self._on_done, None
        if action is not None:
            action()

    def tick(self) -> None:
        """Advance one clock."""
        if self.state in ("IDLE", "DONE"):
            return
        self.cycles += 1
        self._remaining -= 1
        if self._remaining == 0:
            self._finish()

    def _run_to_done(self) -> int:
        while self.state != "DONE":
            self.tick()
        self.state = "IDLE"
        return self.cycles

    # ---- WRITE_WEIGHTS ----------------------------------------------------------------------------------
    def write_weights(self, row_start: int, slices: np.ndarray) -> Tally:
        """Store digit rows [n, n_slices, cols] one row at a time."""
        from cimlab.chip_sim.controller import Tally

        twin = self.twin
        spec, t = twin.spec, twin.profile.timing
        words = math.ceil(spec.cols * spec.weight_bits / t.bus_bits)
        n = slices.shape[0]
        self.cycles = 0
        row = 0

        def next_row() -> None:
            if row == n:
                self._enter("DONE", 0, lambda: None)
            else:
                self._enter("BUS", words, lambda: self._enter("WRITE", t.write_row_cycles, store))

        def store() -> None:
            nonlocal row
            twin._store_rows(row_start + row, slices[row : row + 1])
            row += 1
            next_row()

        self._enter("DECODE", t.op_overhead_cycles, next_row)
        cycles = self._run_to_done()
        return Tally(cycles=cycles, bits_written=n * spec.physical_cols * spec.cell_bits)

    # ---- MAC / MAC_RAW ----------------------------------------------------------------------------------
    def run(self, row_start: int, x: np.ndarray, *, raw: bool) -> tuple[np.ndarray, Tally]:
        """Codes [batch, P, groups spanned, K, C] of inputs [batch, n_rows] at ``row_start``, and the tally."""
        from cimlab.chip_sim.controller import Tally

        twin = self.twin
        spec, t = twin.spec, twin.profile.timing
        P, G, R = spec.n_planes, spec.n_groups, spec.rows_per_conversion
        K, C, J = spec.n_slices, spec.cols, spec.physical_cols
        batch, n_rows = x.shape
        g0, g1 = spec.group_span(row_start, n_rows)
        load_words = math.ceil(n_rows * spec.input_bits / t.bus_bits)
        out_bits = P * (g1 - g0) * J * 8 * spec.code_dtype.itemsize if raw else C * 32
        readout_words = math.ceil(out_bits / t.bus_bits)
        compute = twin._compute.tolist()
        levels = twin._level_digits.tolist()
        fifo = np.zeros((batch, P, g1 - g0, K, C), dtype=spec.code_dtype)
        tally = Tally(conversions=0)
        self.cycles = 0
        st = {"v": 0, "p": 0, "g": 0}
        buf: dict[str, object] = {}

        def start_vector() -> None:
            if st["v"] == batch:
                self._enter("DONE", 0, lambda: None)
            else:
                self._enter("LOAD", load_words, latch)

        def latch() -> None:
            full = [0] * (G * R)
            for i, value in enumerate(x[st["v"]].tolist()):
                full[row_start + i] = value
            buf["slices"] = [
                [(value >> (spec.input_slice_bits * p)) & spec.slice_max for value in full] for p in range(P)
            ]
            stream = twin._stream
            items = stream.draw(twin.vector_counter, 1)[0].tolist() if stream is not None else None
            buf["items"] = items
            buf["codes"] = np.zeros((P, g1 - g0, J), dtype=np.int64)
            twin.vector_counter += 1
            st["p"] = 0
            pulse()

        def pulse() -> None:
            xp = buf["slices"][st["p"]]  # type: ignore[index]
            tally.wordline_pulses += sum(1 for value in xp if value)
            st["g"] = g0
            self._enter("PULSE", t.wl_pulse_cycles, lambda: self._enter("CONVERT", t.adc_cycles, convert))

        def convert() -> None:
            p, g = st["p"], st["g"]
            xp = buf["slices"][p]  # type: ignore[index]
            items = buf["items"]
            codes = buf["codes"]
            for j in range(J):
                s = 0
                level = 0
                for r in range(g * R, (g + 1) * R):
                    if xp[r]:
                        s += xp[r] * compute[r][j]
                        level += xp[r] * levels[r][j]
                item = items[(p * G + g) * J + j] if items is not None else 0  # type: ignore[index]
                codes[p, g - g0, j] = twin.converter.convert_one(s, j, item)  # type: ignore[index]
                tally.level_sum += level
                tally.conversions += 1
            st["g"] += 1
            if st["g"] < g1:
                self._enter("CONVERT", t.adc_cycles, convert)
            else:
                st["p"] += 1
                if st["p"] < P:
                    pulse()
                else:
                    self._enter("READOUT", readout_words, readout)

        def readout() -> None:
            fifo[st["v"]] = np.asarray(buf["codes"]).reshape(P, g1 - g0, K, C)
            st["v"] += 1
            tally.vectors += 1
            start_vector()

        self._enter("DECODE", t.op_overhead_cycles, start_vector)
        tally.cycles = self._run_to_done()
        return fifo, tally

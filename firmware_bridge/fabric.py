"""How data sits in the fabric's buffers, and how long the sequencer takes: one definition for the board-side
controller that packs the buffers, the Python twin that models them, and the RTL parameters.

The fabric (``bitstreams/rtl``) has two block RAMs, ``bus_bits`` wide on the sequencer's side and reached by the
processor as 32-bit words over AXI4-Lite (bit ``b`` of a record is bit ``b % 32`` of its 32-bit word ``b // 32``):

- the **input buffer** holds, for MAC and MAC_RAW, one record per vector: for each row group it spans, the group's
  ``rows_per_conversion`` input codes of ``input_bits`` each (row ``r`` of the group at bits ``r * input_bits``),
  padded to whole bus words; rows outside the request are 0. For WRITE_WEIGHTS it holds one record per row: the
  stored value of each column (``weight + offset`` in ``n_slices * cell_bits`` bits, column ``c`` first), padded
  to whole bus words;
- the **output buffer** receives, per vector, either the MAC accumulators (one signed 32-bit word per column,
  padded to whole bus words) or, per conversion, the codes of every physical column ``j = k * cols + c`` in
  ``8 * code bytes`` bits each (padded to whole bus words); for READ_WEIGHTS, weight rows as above.

A request whose data do not fit the buffers runs as several **runs** of the sequencer, each paying the operation
overhead. The sequencer's cycles (``Timing``; ``A`` = the macro's conversion time, ``Gs`` = row groups spanned)::

    run            op_overhead + items x per item
    WRITE row      row_words + 1 + write_row_cycles          (+1: the buffer's read latency)
    READ row       read_row_cycles + row_words
    MAC vector     Gs * group_words + 1 + P * (wl_pulse + Gs * A) + 2 + mac_words   (+2: the accumulate pipeline)
    MAC_RAW vector Gs * group_words + 1 + P * (wl_pulse + Gs * (A + conv_words))

Input planes are converted most significant first (the accumulators shift by ``input_slice_bits`` per plane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

ACC_BITS = 32
"""Width of a MAC accumulator in the fabric (and of a MAC output on the wire)."""
ACC_PIPELINE = 2
"""Cycles between a MAC vector's last conversion and its accumulators being final (slice sum, then accumulate)."""
AUTO_VECTORS = 32
"""An automatically sized buffer holds this many full-row vectors (or weight rows)."""


@dataclass(frozen=True)
class Timing:
    """The sequencer's own cycle costs (the macro's conversion time ``adc_cycles`` is the macro's)."""

    op_overhead_cycles: int
    wl_pulse_cycles: int
    write_row_cycles: int
    read_row_cycles: int
    adc_cycles: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class FabricLayout:
    """Buffer layout of one macro on one fabric build.

    Args:
        spec: the macro.
        bus_bits: width of the buffers' sequencer port, bits (a multiple of 32).
        in_words: input buffer depth in bus words (0: sized automatically).
        out_words: output buffer depth in bus words (0: sized automatically).
    """

    spec: MacroSpec
    bus_bits: int
    in_words: int = 0
    out_words: int = 0

    def __post_init__(self) -> None:
        lanes = self.bus_bits // 32
        if self.bus_bits % 32 or lanes & (lanes - 1) or not 32 <= self.bus_bits <= 4096:
            raise ConfigError(f"bus_bits={self.bus_bits}: the fabric needs 32 times a power of two, up to 4096")
        spec = self.spec
        if self.in_words == 0:
            need = max(self.group_words * spec.n_groups, self.row_words)
            object.__setattr__(self, "in_words", _next_pow2(AUTO_VECTORS * need))
        if self.out_words == 0:
            need = max(
                AUTO_VECTORS * self.mac_words,
                AUTO_VECTORS * self.row_words,
                spec.n_planes * spec.n_groups * self.conv_words,
            )
            object.__setattr__(self, "out_words", _next_pow2(need))
        for name in ("in_words", "out_words"):
            words = getattr(self, name)
            if words < 2 or words & (words - 1):
                raise ConfigError(f"{name}={words}: a buffer's depth must be a power of two, at least 2")
            if words * self.bus_bits // 8 > 0x40000:
                raise ConfigError(
                    f"{name}={getattr(self, name)} bus words of {self.bus_bits} bits exceed the "
                    "buffer's 256 KiB address window"
                )
        checks = (
            ("in_words", self.in_words, self.group_words * spec.n_groups, "one full-row input vector"),
            ("in_words", self.in_words, self.row_words, "one weight row"),
            (
                "out_words",
                self.out_words,
                spec.n_planes * spec.n_groups * self.conv_words,
                "one vector's raw codes",
            ),
        )
        for name, have, need, what in checks:
            if have < need:
                raise ConfigError(f"{name}={have} bus words cannot hold {what} ({need} words)")
        if self.acc_bound() >= 2 ** (ACC_BITS - 1):
            raise ConfigError(f"MAC accumulators up to {self.acc_bound()} do not fit {ACC_BITS} signed bits")

    # ---- record sizes, bus words --------------------------------------------------------------------------
    def _words(self, bits: int) -> int:
        return math.ceil(bits / self.bus_bits)

    @property
    def group_words(self) -> int:
        """Bus words of one row group's inputs."""
        return self._words(self.spec.rows_per_conversion * self.spec.input_bits)

    @property
    def stored_bits(self) -> int:
        """Bits of one stored weight (``n_slices * cell_bits``)."""
        return self.spec.n_slices * self.spec.cell_bits

    @property
    def row_words(self) -> int:
        """Bus words of one weight row."""
        return self._words(self.spec.cols * self.stored_bits)

    @property
    def mac_words(self) -> int:
        """Bus words of one vector's MAC accumulators."""
        return self._words(self.spec.cols * ACC_BITS)

    @property
    def code_bits(self) -> int:
        """Bits of one code in the output buffer (its wire dtype's size)."""
        return 8 * self.spec.code_dtype.itemsize

    @property
    def conv_words(self) -> int:
        """Bus words of one conversion's codes (every physical column)."""
        return self._words(self.spec.physical_cols * self.code_bits)

    @property
    def lanes(self) -> int:
        """32-bit words per bus word."""
        return self.bus_bits // 32

    def acc_bound(self) -> int:
        """Largest magnitude a MAC accumulator reaches (before the processor's scaling)."""
        s = self.spec
        plane_sum = (2 ** (s.input_slice_bits * s.n_planes) - 1) // s.slice_max
        slice_sum = (2 ** (s.cell_bits * s.n_slices) - 1) // s.cell_max
        return s.n_groups * s.adc_max * plane_sum * slice_sum

    # ---- runs ---------------------------------------------------------------------------------------------
    def out_words_per_vector(self, span: int, raw: bool) -> int:
        """Output buffer words one vector fills."""
        return self.spec.n_planes * span * self.conv_words if raw else self.mac_words

    def vectors_per_run(self, span: int, raw: bool) -> int:
        """Most vectors one run takes over ``span`` row groups."""
        return min(
            self.in_words // (span * self.group_words), self.out_words // self.out_words_per_vector(span, raw)
        )

    def rows_per_run(self, write: bool) -> int:
        """Most weight rows one run writes (``write``) or reads."""
        return (self.in_words if write else self.out_words) // self.row_words

    @staticmethod
    def runs(items: int, per_run: int) -> list[tuple[int, int]]:
        """``(first, count)`` of each run that moves ``items`` items, ``per_run`` at most."""
        return [(i, min(per_run, items - i)) for i in range(0, items, per_run)]

    # ---- cycles -------------------------------------------------------------------------------------------
    def vector_cycles(self, span: int, raw: bool, t: Timing) -> int:
        """Sequencer cycles one MAC (or MAC_RAW) vector over ``span`` row groups takes."""
        load = span * self.group_words + 1
        P = self.spec.n_planes
        if raw:
            return load + P * (t.wl_pulse_cycles + span * (t.adc_cycles + self.conv_words))
        return load + P * (t.wl_pulse_cycles + span * t.adc_cycles) + ACC_PIPELINE + self.mac_words

    def row_cycles(self, write: bool, t: Timing) -> int:
        """Sequencer cycles one weight row takes to write or to read."""
        if write:
            return self.row_words + 1 + t.write_row_cycles
        return t.read_row_cycles + self.row_words

    def mac_cycles(self, batch: int, span: int, raw: bool, t: Timing) -> int:
        """Cycles of a whole MAC request (its runs included)."""
        runs = math.ceil(batch / self.vectors_per_run(span, raw))
        return runs * t.op_overhead_cycles + batch * self.vector_cycles(span, raw, t)

    def weight_cycles(self, n_rows: int, write: bool, t: Timing) -> int:
        """Cycles of a whole WRITE_WEIGHTS or READ_WEIGHTS request (its runs included)."""
        runs = math.ceil(n_rows / self.rows_per_run(write))
        return runs * t.op_overhead_cycles + n_rows * self.row_cycles(write, t)

    # ---- packing (numpy, little-endian bit records) ---------------------------------------------------------
    def _pack(self, values: np.ndarray, bits: int, words: int) -> np.ndarray:
        """Unsigned values [..., n] of ``bits`` bits each -> uint32 records [..., words * lanes]."""
        v = np.asarray(values, dtype=np.uint64)
        shifts = np.arange(bits, dtype=np.uint64)
        b = ((v[..., None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(*v.shape[:-1], -1)
        pad = words * self.bus_bits - b.shape[-1]
        b = np.concatenate([b, np.zeros((*b.shape[:-1], pad), np.uint8)], axis=-1)
        return np.packbits(b, axis=-1, bitorder="little").view("<u4")

    def _unpack(self, words: np.ndarray, bits: int, n: int) -> np.ndarray:
        """uint32 records [..., w] -> the first ``n`` unsigned values of ``bits`` bits each [..., n] (int64)."""
        w = np.ascontiguousarray(words, dtype="<u4")
        b = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")[..., : n * bits]
        b = b.reshape(*w.shape[:-1], n, bits).astype(np.int64)
        return (b << np.arange(bits, dtype=np.int64)).sum(axis=-1)

    def pack_inputs(self, row_start: int, x: np.ndarray) -> np.ndarray:
        """Inputs [batch, n_rows] at ``row_start`` -> input buffer records [batch, span * group_words * lanes]."""
        spec = self.spec
        batch, n_rows = x.shape
        g0, g1 = spec.group_span(row_start, n_rows)
        R = spec.rows_per_conversion
        full = np.zeros((batch, g1 - g0, R), dtype=np.int64)
        full.reshape(batch, -1)[:, row_start - g0 * R : row_start - g0 * R + n_rows] = x
        return self._pack(full, spec.input_bits, self.group_words).reshape(batch, -1)

    def pack_weight_rows(self, weights: np.ndarray) -> np.ndarray:
        """Logical weights [n, cols] -> input buffer records [n, row_words * lanes]."""
        mask = (1 << self.stored_bits) - 1
        stored = (np.asarray(weights, dtype=np.int64) + self.spec.weight_offset) & mask
        return self._pack(stored, self.stored_bits, self.row_words)

    def unpack_weight_rows(self, words: np.ndarray) -> np.ndarray:
        """Output buffer records [n, row_words * lanes] -> logical weights [n, cols] (int64)."""
        stored = self._unpack(words, self.stored_bits, self.spec.cols)
        digits = stored[:, None, :] >> (self.spec.cell_bits * np.arange(self.spec.n_slices))[None, :, None]
        return self.spec.slices_to_weights(digits & self.spec.cell_max)

    def unpack_mac(self, words: np.ndarray) -> np.ndarray:
        """Output buffer records [n, mac_words * lanes] -> accumulators [n, cols] (int64)."""
        acc = np.ascontiguousarray(words, dtype="<u4")[:, : self.spec.cols].view("<i4")
        return acc.astype(np.int64)

    def unpack_raw(self, words: np.ndarray, span: int) -> np.ndarray:
        """Output buffer records [n, P * span * conv_words * lanes] -> codes [n, P, span, K, C] (code dtype).

        The fabric converts planes most significant first; the codes come back in the wire's plane order.
        """
        spec = self.spec
        n = words.shape[0]
        per_conv = self.conv_words * self.lanes
        w = np.ascontiguousarray(words, dtype="<u4").reshape(n, spec.n_planes, span, per_conv)
        codes = w.view(spec.code_dtype)[..., : spec.physical_cols]
        return codes[:, ::-1].reshape(n, spec.n_planes, span, spec.n_slices, spec.cols)


@dataclass
class Activity:
    """What one operation did to the macro, from which its energy is estimated (``EnergyModel``)."""

    conversions: int = 0
    """Column conversions."""
    level_sum: int = 0
    """Sum of the ideal partial sums of every conversion, levels (stored digits times input slices)."""
    wordline_pulses: int = 0
    """Word-line pulses of rows with a nonzero input slice."""
    vectors: int = 0
    """MAC vectors."""
    bits_written: int = 0
    """Cell bits written."""


def input_activity(spec: MacroSpec, rowsum: np.ndarray, row_start: int, x: np.ndarray) -> tuple[int, int]:
    """``(wordline_pulses, level_sum)`` of MAC inputs [batch, n_rows] at ``row_start``.

    ``rowsum`` [n_groups * rows_per_conversion] is the sum of each row's stored digits over every physical column.
    """
    R = spec.rows_per_conversion
    g0, g1 = spec.group_span(row_start, x.shape[1])
    full = np.zeros((x.shape[0], (g1 - g0) * R), dtype=np.int64)
    first = row_start - g0 * R
    full[:, first : first + x.shape[1]] = x
    planes = spec.inputs_to_planes(full).astype(np.int64)
    return int(np.count_nonzero(planes)), int((planes @ rowsum[g0 * R : g1 * R]).sum())

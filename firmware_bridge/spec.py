"""MacroSpec: the one description of a CIM macro, shared by both ends of the wire.

The chip reports its MacroSpec in HELLO; the twin is built from one; training, deploy and bench read it from
the chip or a profile. Everything about array layouts and value ranges is derived here, nowhere else.

The unit everything shares is the **conversion**: one ADC reading of one physical column for one input
slice (bit plane) and one row group. For input slice ``p``, row group ``g``, weight slice ``k`` and output
column ``c`` its ideal value is the analog partial sum::

    s[p, g, k, c] = sum over rows r in group g of  x_p[r] * w_k[r, c]          (an integer level)

where ``x_p`` is slice ``p`` of the unsigned input code and ``w_k`` is digit ``k`` of the stored weight.
The ADC maps ``s`` to a code in ``0 .. 2**adc_bits - 1``; ideally ``code = round(s / adc_lsb)``, clipped.
The macro's digital back end recombines the codes::

    y[c] = adc_lsb * sum_{p,g,k} code[p,g,k,c] * plane_weight[p] * slice_weight[k]  -  offset_correction

Array layouts on the wire and in numpy (C order):

- weights: ``[rows, cols]`` signed logical values (what the user programs and reads back);
- inputs: ``[batch, rows]`` unsigned codes;
- MAC outputs: ``[batch, cols]`` int32, in units of ``adc_lsb`` levels (equal to ``x @ W`` on an ideal macro
  whose ADC resolves every level);
- MAC_RAW codes: ``[batch, n_planes, n_groups, n_slices, cols]`` for a request that drives every row; a request
  for rows ``row_start .. row_start+n_rows-1`` converts only the row groups holding those rows
  (``group_span``), as the macro's sequencer skips idle groups, and MAC recombines only those.

Each (weight slice ``k``, output column ``c``) pair is one physical bit-line column with its own ADC; its index
is ``j = k * cols + c`` (MAC_RAW's last two axes flattened). Error models are indexed by ``j``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cimlab.firmware_bridge.errors import ConfigError

WEIGHT_STORAGES = ("twos", "offset", "unsigned", "differential")
"""How a signed weight becomes stored digits (the wire carries the index into this tuple).

- ``twos``: bit-sliced two's complement, one cell bit per column; the MSB column counts negative.
- ``offset``: stored ``w + 2**(weight_bits-1)`` (unsigned), the offset removed digitally using ``sum(x)``.
- ``unsigned``: unipolar weights ``0 .. 2**weight_bits - 1``, one array (NVM crossbars without a reference
  column). A network's negative-only tiles are programmed as magnitudes and negated digitally; a tile of both signs
  is stored by the compiler on a pair of adjacent columns (``cimlab.deploy.schedule``).
- ``differential``: ``w = G+ - G-`` on two arrays of the same size: ``weight_bits`` is the magnitude held by each
  side, so weights span ``-(2**weight_bits - 1) .. 2**weight_bits - 1``. Slices ``0 .. n_slices/2 - 1`` are the
  digits of ``max(w, 0)`` (the positive array), the rest the digits of ``max(-w, 0)`` (the negative array, which
  counts negative in the recombination); every side is converted by its own ADC and subtracted digitally.
"""


@dataclass(frozen=True)
class MacroSpec:
    """Geometry, number formats and timing of one CIM macro.

    Attributes:
        rows: word lines (weight rows = input vector length).
        cols: output channels (logical columns; each uses ``n_slices`` physical columns).
        weight_bits: bits of each logical weight (for ``differential``: of the magnitude each side holds).
        weight_storage: one of ``WEIGHT_STORAGES``.
        cell_bits: bits per memory cell: 1 for SRAM, 2 or 4 for multi-level (NVM) cells.
        input_bits: bits of each unsigned input code.
        input_slice_bits: input bits applied per step: 1 is bit-serial, ``input_bits`` is one multi-bit pulse.
        rows_per_conversion: rows summed on a bit line per ADC conversion (row-group size).
        adc_bits: ADC resolution, bits.
        adc_full_scale: ideal level ``s`` that maps to the top code; ``2**adc_bits - 1`` means one level per
            code (levels above it clip).
        clock_hz: controller/macro clock, Hz.
    """

    rows: int = 256
    cols: int = 64
    weight_bits: int = 4
    weight_storage: str = "twos"
    cell_bits: int = 1
    input_bits: int = 4
    input_slice_bits: int = 1
    rows_per_conversion: int = 16
    adc_bits: int = 5
    adc_full_scale: int = 31
    clock_hz: int = 100_000_000

    FIELD_RANGES: ClassVar[dict[str, tuple[int, int]]] = {
        "rows": (1, 65535),
        "cols": (1, 65535),
        "weight_bits": (1, 16),
        "cell_bits": (1, 8),
        "input_bits": (1, 16),
        "input_slice_bits": (1, 16),
        "rows_per_conversion": (1, 65535),
        "adc_bits": (1, 16),
        "adc_full_scale": (1, 2**31 - 1),
        "clock_hz": (1, 2**32 - 1),
    }

    def __post_init__(self) -> None:
        for name, (lo, hi) in self.FIELD_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ConfigError(f"MacroSpec.{name} must be an integer, got {value!r}")
            if not lo <= value <= hi:
                raise ConfigError(f"MacroSpec.{name}={value} is outside the allowed range {lo}..{hi}")
        if self.weight_storage not in WEIGHT_STORAGES:
            raise ConfigError(
                f"MacroSpec.weight_storage={self.weight_storage!r} is not one of {', '.join(WEIGHT_STORAGES)}"
            )
        if self.weight_storage == "twos" and self.cell_bits != 1:
            raise ConfigError("MacroSpec.weight_storage='twos' needs cell_bits=1 (bit-sliced two's complement)")
        if self.weight_storage == "twos" and self.weight_bits < 2:
            raise ConfigError("MacroSpec.weight_bits must be >= 2 for weight_storage='twos'")
        if self.input_slice_bits > self.input_bits:
            raise ConfigError(
                f"MacroSpec.input_slice_bits={self.input_slice_bits} exceeds input_bits={self.input_bits}"
            )
        if self.rows_per_conversion > self.rows:
            raise ConfigError(
                f"MacroSpec.rows_per_conversion={self.rows_per_conversion} exceeds rows={self.rows}"
            )
        plane_sum = (2 ** (self.input_slice_bits * self.n_planes) - 1) // self.slice_max
        slice_sum = self.sides * ((2 ** (self.cell_bits * self.slices_per_side) - 1) // self.cell_max)
        bound = self.n_groups * self.adc_full_scale * plane_sum * slice_sum
        bound += self.weight_offset * self.rows * self.input_max
        if bound >= 2**31:
            raise ConfigError(
                f"MacroSpec: outputs up to {bound} do not fit the int32 MAC reply; reduce rows or bits"
            )

    # ---- derived geometry -------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Row groups per column (conversions per column per input slice)."""
        return math.ceil(self.rows / self.rows_per_conversion)

    @property
    def n_slices(self) -> int:
        """Physical columns (cells) per logical weight (both sides of a ``differential`` pair)."""
        return self.sides * self.slices_per_side

    @property
    def slices_per_side(self) -> int:
        """Cells per stored magnitude: ``ceil(weight_bits / cell_bits)``."""
        return math.ceil(self.weight_bits / self.cell_bits)

    @property
    def sides(self) -> int:
        """Arrays one logical weight occupies: 2 for ``differential`` (G+ and G-), else 1."""
        return 2 if self.weight_storage == "differential" else 1

    @property
    def n_planes(self) -> int:
        """Input slices streamed per MAC (bit planes when bit-serial)."""
        return math.ceil(self.input_bits / self.input_slice_bits)

    @property
    def physical_cols(self) -> int:
        """Bit-line columns in the array: ``cols * n_slices``."""
        return self.cols * self.n_slices

    @property
    def conversions_per_vector(self) -> int:
        """ADC conversions one input vector takes: planes x groups x slices x cols."""
        return self.n_planes * self.n_groups * self.n_slices * self.cols

    @property
    def raw_shape(self) -> tuple[int, int, int, int]:
        """Shape of one vector's MAC_RAW codes: (planes, groups, slices, cols)."""
        return (self.n_planes, self.n_groups, self.n_slices, self.cols)

    def group_span(self, row_start: int, n_rows: int) -> tuple[int, int]:
        """Row groups ``(first, end)`` (end exclusive) that hold rows ``row_start .. row_start+n_rows-1``."""
        r = self.rows_per_conversion
        return row_start // r, -(-(row_start + n_rows) // r)

    def raw_shape_for(self, row_start: int, n_rows: int) -> tuple[int, int, int, int]:
        """Shape of one vector's MAC_RAW codes for a row range: (planes, groups spanned, slices, cols)."""
        g0, g1 = self.group_span(row_start, n_rows)
        return (self.n_planes, g1 - g0, self.n_slices, self.cols)

    @property
    def input_streaming(self) -> str:
        """``"bit_serial"`` or ``"multi_bit"``."""
        return "bit_serial" if self.input_slice_bits == 1 else "multi_bit"

    # ---- value ranges -----------------------------------------------------------------------------------
    @property
    def cell_max(self) -> int:
        """Largest digit one cell stores."""
        return 2**self.cell_bits - 1

    @property
    def slice_max(self) -> int:
        """Largest value of one input slice."""
        return 2**self.input_slice_bits - 1

    @property
    def s_max(self) -> int:
        """Largest ideal partial sum of one conversion (levels)."""
        return self.rows_per_conversion * self.cell_max * self.slice_max

    @property
    def n_levels(self) -> int:
        """Number of distinct ideal levels ``0 .. s_max``."""
        return self.s_max + 1

    @property
    def adc_max(self) -> int:
        """Top ADC code."""
        return 2**self.adc_bits - 1

    @property
    def n_codes(self) -> int:
        """Number of ADC codes."""
        return 2**self.adc_bits

    @property
    def adc_lsb(self) -> float:
        """Ideal levels per ADC code."""
        return self.adc_full_scale / self.adc_max

    @property
    def weight_min(self) -> int:
        """Smallest logical weight."""
        if self.weight_storage == "unsigned":
            return 0
        if self.weight_storage == "differential":
            return -(2**self.weight_bits - 1)
        return -(2 ** (self.weight_bits - 1))

    @property
    def weight_max(self) -> int:
        """Largest logical weight."""
        if self.weight_storage in ("unsigned", "differential"):
            return 2**self.weight_bits - 1
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def input_max(self) -> int:
        """Largest unsigned input code."""
        return 2**self.input_bits - 1

    # ---- wire dtypes ------------------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> np.dtype:
        """Little-endian dtype of logical weights on the wire."""
        for dt in ("<i1", "<i2", "<i4"):
            info = np.iinfo(dt)
            if info.min <= self.weight_min and self.weight_max <= info.max:
                return np.dtype(dt)
        raise ConfigError("MacroSpec weight range does not fit int32")  # unreachable: weight_bits <= 16

    @property
    def input_dtype(self) -> np.dtype:
        """Little-endian dtype of input codes on the wire."""
        return np.dtype("<u1") if self.input_bits <= 8 else np.dtype("<u2")

    @property
    def code_dtype(self) -> np.dtype:
        """Little-endian dtype of ADC codes on the wire."""
        return np.dtype("<u1") if self.adc_bits <= 8 else np.dtype("<u2")

    output_dtype: ClassVar[np.dtype] = np.dtype("<i4")

    # ---- number formats ---------------------------------------------------------------------------------
    def plane_weights(self) -> np.ndarray:
        """Weight of each input slice in the recombination, shape [n_planes], int64."""
        return (2 ** (self.input_slice_bits * np.arange(self.n_planes))).astype(np.int64)

    def slice_weights(self) -> np.ndarray:
        """Signed weight of each stored digit in the recombination, shape [n_slices], int64."""
        w = (2 ** (self.cell_bits * np.arange(self.slices_per_side))).astype(np.int64)
        if self.weight_storage == "twos":
            w[-1] = -w[-1]
        if self.weight_storage == "differential":
            w = np.concatenate([w, -w])
        return w

    @property
    def weight_offset(self) -> int:
        """Offset added to weights before storage (removed digitally): nonzero only for ``offset``."""
        return 2 ** (self.weight_bits - 1) if self.weight_storage == "offset" else 0

    def weights_to_slices(self, weights: np.ndarray) -> np.ndarray:
        """Logical weights [rows, cols] -> stored digits [rows, n_slices, cols] (uint8)."""
        w = np.asarray(weights, dtype=np.int64)
        shifts = (self.cell_bits * np.arange(self.slices_per_side)).reshape(1, -1, 1)
        if self.weight_storage == "differential":
            sides = [np.maximum(w, 0), np.maximum(-w, 0)]
            return np.concatenate([((m[:, None, :] >> shifts) & self.cell_max) for m in sides], axis=1).astype(np.uint8)
        stored = (w + self.weight_offset) & ((1 << (self.n_slices * self.cell_bits)) - 1)
        return ((stored[:, None, :] >> shifts) & self.cell_max).astype(np.uint8)

    def slices_to_weights(self, digits: np.ndarray) -> np.ndarray:
        """Stored digits [rows, n_slices, cols] -> logical weights [rows, cols] (int64)."""
        d = np.asarray(digits, dtype=np.int64)
        w = np.einsum("rkc,k->rc", d, self.slice_weights())
        return w - self.weight_offset

    def inputs_to_planes(self, inputs: np.ndarray) -> np.ndarray:
        """Input codes [batch, rows] -> slices [batch, n_planes, rows] (uint8 or uint16)."""
        x = np.asarray(inputs)
        shifts = (self.input_slice_bits * np.arange(self.n_planes)).reshape(1, -1, 1)
        planes = (x[:, None, :].astype(np.int64) >> shifts) & self.slice_max
        return planes.astype(np.uint8 if self.slice_max < 256 else np.uint16)

    def ideal_levels(self, inputs: np.ndarray, weights: np.ndarray, row_start: int = 0) -> np.ndarray:
        """Ideal partial sums ``s`` [batch, planes, groups spanned, slices, cols] (int64): the reference definition.

        ``inputs`` [batch, n_rows] drive rows ``row_start ..``; other rows see 0; only the row groups holding
        driven rows are converted (``group_span``). ``weights`` [rows, cols].
        """
        x = np.asarray(inputs, dtype=np.int64)
        batch, n_rows = x.shape
        full = np.zeros((batch, self.n_groups * self.rows_per_conversion), dtype=np.int64)
        full[:, row_start : row_start + n_rows] = x
        g0, g1 = self.group_span(row_start, n_rows)
        g, r = g1 - g0, self.rows_per_conversion
        planes = self.inputs_to_planes(full[:, g0 * r : g1 * r]).astype(np.float64)
        digits = np.zeros((self.n_groups * r, self.n_slices, self.cols), dtype=np.float64)
        digits[: self.rows] = self.weights_to_slices(weights)
        # one matmul per row group: [G, batch*P, R] @ [G, R, K*C]; float64 sums of small integers are exact
        xg = planes.reshape(batch * self.n_planes, g, r).transpose(1, 0, 2)
        wg = digits[g0 * r : g1 * r].reshape(g, r, self.n_slices * self.cols)
        s = np.matmul(xg, wg).reshape(g, batch, self.n_planes, self.n_slices, self.cols)
        return s.transpose(1, 2, 0, 3, 4).astype(np.int64)

    def ideal_codes(self, levels: np.ndarray) -> np.ndarray:
        """The ideal ADC transfer: ``clip(round(s / adc_lsb), 0, adc_max)`` as int64."""
        s = np.asarray(levels, dtype=np.int64)
        if self.adc_full_scale == self.adc_max:
            return np.clip(s, 0, self.adc_max)
        # round half up in exact integer arithmetic: floor((2 s adc_max + fs) / (2 fs))
        return np.clip((2 * s * self.adc_max + self.adc_full_scale) // (2 * self.adc_full_scale), 0, self.adc_max)

    def recombine(self, codes: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        """Raw codes [batch, planes, groups, slices, cols] -> MAC outputs [batch, cols] int64.

        Outputs are in units of ``adc_lsb`` levels, rounded to the nearest integer (exact when
        ``adc_lsb == 1``). ``inputs`` [batch, rows] are needed for the ``offset`` storage correction.
        """
        c = np.asarray(codes, dtype=np.int64)
        acc = np.einsum("bpgkc,p,k->bc", c, self.plane_weights(), self.slice_weights(), optimize=True)
        return self.scale_accumulated(acc, inputs)

    def scale_accumulated(self, acc: np.ndarray, inputs: np.ndarray) -> np.ndarray:
        """Accumulated codes [batch, cols] (``sum code * plane_weight * slice_weight``) -> MAC outputs (int64).

        The last step of ``recombine``: the ADC's full-scale ratio (rounded to the nearest integer) and the
        ``offset`` storage correction. A controller whose hardware accumulates the codes applies it in software.
        """
        out = np.asarray(acc, dtype=np.int64)
        if self.adc_full_scale != self.adc_max:
            out = np.rint(out * self.adc_full_scale / self.adc_max).astype(np.int64)
        if self.weight_offset:
            xsum = np.asarray(inputs, dtype=np.int64).sum(axis=1, keepdims=True)
            out = out - self.weight_offset * xsum
        return out

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON/TOML friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MacroSpec:
        """Build from a dict; unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise ConfigError(f"MacroSpec must be a table of fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"MacroSpec has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**data)

    def replace(self, **changes: Any) -> MacroSpec:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for humans."""
        return (
            f"{self.rows}x{self.cols} macro, {self.weight_bits}-bit weights ({self.weight_storage}, "
            f"{self.cell_bits}-bit cells), {self.input_bits}-bit inputs ({self.input_streaming}), "
            f"{self.rows_per_conversion} rows/conversion, {self.adc_bits}-bit ADC, {self.clock_hz / 1e6:g} MHz"
        )

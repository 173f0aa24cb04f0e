"""Arrays on the wire, packed at their bit width: the one packing both ends use.

A field of ``bits`` bits carries integers, signed (two's complement) or unsigned. An array of ``n`` values packs
into ``ceil(n * bits / 8)`` bytes: the values in C order, each value's bits least significant first, filling each
byte from its least significant bit; the last byte is padded with zero bits. So 4-bit values ``1, 2, 3`` pack into
``0x21 0x03``, and a field of 8, 16 or 32 bits is plain little-endian bytes.

The fields of each bulk array follow from the MacroSpec (and, for MAC outputs, from the rows a request drives):

===============  ================================  ============================================================
array            field                             why
===============  ================================  ============================================================
weights          ``weight_bits``, signed unless    the logical weight range (``differential``: a magnitude
                 ``weight_storage == "unsigned"``  of ``weight_bits`` and its sign, ``weight_bits + 1`` bits)
inputs           ``input_bits``, unsigned          the input code range
MAC_RAW codes    ``adc_bits``, unsigned            the ADC's codes
MAC outputs      the fewest bits that hold every   ``output_range``: every code of the row groups the request
                 output the request can produce    spans at its extreme, and the ``offset`` correction
===============  ================================  ============================================================

Works with numpy >= 1.21 (a PYNQ board's) as with numpy 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cimlab.firmware_bridge.errors import PayloadError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec

_CONTAINERS = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8"))


@dataclass(frozen=True)
class BitField:
    """Integers of ``bits`` bits (1..64), two's complement when ``signed``."""

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 64 or (self.signed and self.bits < 2):
            raise ShapeError(f"a {'signed' if self.signed else 'unsigned'} field of {self.bits} bits is not allowed")

    @property
    def lo(self) -> int:
        """Smallest value the field holds."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        """Largest value the field holds."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def nbytes(self, count: int) -> int:
        """Bytes that ``count`` values take packed."""
        return -(-count * self.bits // 8)

    def capacity(self, nbytes: int) -> int:
        """How many values fit in ``nbytes`` bytes."""
        return max(0, nbytes) * 8 // self.bits

    @property
    def _container(self) -> np.dtype:
        return next(dt for dt in _CONTAINERS if dt.itemsize * 8 >= self.bits)

    def pack(self, values: np.ndarray, what: str = "values") -> bytes:
        """Pack integer ``values`` (any shape, C order); ShapeError when one does not fit the field."""
        v = np.asarray(values)
        if v.dtype.kind not in "iu":
            raise ShapeError(f"{what} must be integers to go on the wire, got dtype {v.dtype}")
        if v.size and (int(v.min()) < self.lo or int(v.max()) > self.hi):
            raise ShapeError(
                f"{what} span {int(v.min())}..{int(v.max())}, outside the {self.bits}-bit field's {self.lo}..{self.hi}"
            )
        container = self._container
        # two's complement in the container's width, then keep the field's low bits
        u = np.ascontiguousarray(v.ravel().astype(container.str.replace("u", "i")).view(container))
        if self.bits == container.itemsize * 8:
            return u.tobytes()
        if 8 % self.bits == 0:  # several values a byte: shift them into place
            per = 8 // self.bits
            u = np.concatenate([u & ((1 << self.bits) - 1), np.zeros(-len(u) % per, dtype=u.dtype)])
            shifts = (self.bits * np.arange(per)).astype(np.uint8)
            return np.bitwise_or.reduce(u.reshape(-1, per) << shifts, axis=1).astype(np.uint8).tobytes()
        bits = np.unpackbits(u.view(np.uint8).reshape(-1, container.itemsize), axis=1, bitorder="little")
        return np.packbits(bits[:, : self.bits], bitorder="little").tobytes()

    def unpack(self, data: bytes | bytearray | memoryview, count: int, what: str = "values") -> np.ndarray:
        """``count`` values (int64, 1-D) from exactly ``nbytes(count)`` bytes; PayloadError otherwise."""
        expected = self.nbytes(count)
        if len(data) != expected:
            raise PayloadError(f"{what}: {len(data)} bytes, expected {expected} for {count} {self.bits}-bit values")
        raw = np.frombuffer(data, dtype=np.uint8)
        container = self._container
        width = container.itemsize * 8
        if self.bits == width:
            u = raw.view(container).astype(np.int64)
        elif 8 % self.bits == 0:  # several values a byte
            shifts = (self.bits * np.arange(8 // self.bits)).astype(np.uint8)
            u = ((raw[:, None] >> shifts) & ((1 << self.bits) - 1)).reshape(-1)[:count].astype(np.int64)
        else:
            bits = np.zeros((count, width), dtype=np.uint8)
            bits[:, : self.bits] = np.unpackbits(raw, count=count * self.bits, bitorder="little").reshape(
                count, self.bits
            )
            u = np.packbits(bits, axis=1, bitorder="little").reshape(-1).view(container).astype(np.int64)
        if self.signed and self.bits < 64:
            sign = np.int64(1 << (self.bits - 1))
            u = (u ^ sign) - sign
        return u


def signed_bits(lo: int, hi: int) -> BitField:
    """The narrowest field holding every integer in ``lo .. hi`` (unsigned when ``lo >= 0``)."""
    if lo >= 0:
        return BitField(max(1, int(hi).bit_length()), False)
    need = max((-int(lo) - 1).bit_length(), int(hi).bit_length()) + 1
    return BitField(max(2, need), True)


def weight_field(spec: MacroSpec) -> BitField:
    """Logical weights: ``weight_bits`` bits, signed unless stored unsigned; a ``differential`` weight is a magnitude
    of ``weight_bits`` bits with its sign (``weight_bits + 1`` bits, signed)."""
    if spec.weight_storage == "differential":
        return BitField(spec.weight_bits + 1, True)
    return BitField(spec.weight_bits, spec.weight_storage != "unsigned")


def input_field(spec: MacroSpec) -> BitField:
    """Input codes: ``input_bits`` bits, unsigned."""
    return BitField(spec.input_bits, False)


def code_field(spec: MacroSpec) -> BitField:
    """ADC codes: ``adc_bits`` bits, unsigned."""
    return BitField(spec.adc_bits, False)


def output_range(spec: MacroSpec, row_start: int, n_rows: int) -> tuple[int, int]:
    """Smallest and largest MAC output a request driving rows ``row_start .. +n_rows`` can produce.

    Every conversion of the row groups it spans at code 0 or ``adc_max``, recombined as ``MacroSpec.recombine``
    does (rounded to ``adc_lsb`` units, then the ``offset`` storage correction over ``n_rows`` inputs).
    """
    g0, g1 = spec.group_span(row_start, n_rows)
    planes = int(spec.plane_weights().sum())
    slices = spec.slice_weights()
    top = (g1 - g0) * spec.adc_max * planes
    acc_hi = top * int(slices[slices > 0].sum())
    acc_lo = top * int(slices[slices < 0].sum())
    if spec.adc_full_scale != spec.adc_max:
        acc_hi = math.ceil(acc_hi * spec.adc_full_scale / spec.adc_max)
        acc_lo = math.floor(acc_lo * spec.adc_full_scale / spec.adc_max)
    return acc_lo - spec.weight_offset * n_rows * spec.input_max, acc_hi


def output_field(spec: MacroSpec, row_start: int, n_rows: int) -> BitField:
    """MAC outputs of a request driving rows ``row_start .. +n_rows``: the fewest bits ``output_range`` needs."""
    return signed_bits(*output_range(spec, row_start, n_rows))


__all__ = [
    "BitField",
    "code_field",
    "input_field",
    "output_field",
    "output_range",
    "signed_bits",
    "weight_field",
]

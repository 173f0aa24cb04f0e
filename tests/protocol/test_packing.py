"""The one packing both ends use: against a bit-by-bit reference in plain Python, and the output widths against what
``MacroSpec.recombine`` can produce."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimlab.firmware_bridge.errors import PayloadError, ShapeError
from cimlab.firmware_bridge.packing import (
    BitField,
    code_field,
    input_field,
    output_field,
    output_range,
    signed_bits,
    weight_field,
)
from cimlab.firmware_bridge.spec import MacroSpec


def reference_pack(values: list[int], bits: int) -> bytes:
    """Each value's ``bits`` low bits (two's complement), least significant first, into bytes LSB first."""
    acc = 0
    for i, v in enumerate(values):
        acc |= (v & ((1 << bits) - 1)) << (i * bits)
    return acc.to_bytes(-(-len(values) * bits // 8), "little")


@st.composite
def fields_and_values(draw: st.DrawFn) -> tuple[BitField, list[int]]:
    signed = draw(st.booleans())
    field = BitField(draw(st.integers(2 if signed else 1, 64)), signed)
    values = draw(st.lists(st.integers(field.lo, field.hi), max_size=70))
    return field, values


@settings(max_examples=300, deadline=None)
@given(fv=fields_and_values())
def test_pack_matches_the_reference_and_unpacks(fv: tuple[BitField, list[int]]) -> None:
    field, values = fv
    arr = np.array(values, dtype=np.int64 if field.bits < 64 or field.signed else np.uint64)
    packed = field.pack(arr)
    assert packed == reference_pack(values, field.bits)
    assert len(packed) == field.nbytes(len(values))
    assert field.unpack(packed, len(values)).astype(arr.dtype).tolist() == values


def test_hand_written_vectors() -> None:
    assert BitField(4, False).pack(np.array([1, 2, 3])) == bytes.fromhex("2103")
    assert BitField(4, True).pack(np.array([-1, -8, 7])) == bytes.fromhex("8f07")
    assert BitField(5, False).pack(np.array([31, 1, 2])) == bytes.fromhex("3f08")  # 15 bits in 2 bytes
    assert BitField(1, False).pack(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1])) == bytes.fromhex("0d01")
    assert BitField(16, True).pack(np.array([-2, 258])) == bytes.fromhex("feff0201")
    assert BitField(17, True).pack(np.array([-1])) == bytes.fromhex("ffff01")


def test_values_outside_the_field_and_wrong_lengths_are_refused() -> None:
    with pytest.raises(ShapeError, match="outside the 4-bit"):
        BitField(4, True).pack(np.array([8]))
    with pytest.raises(ShapeError, match="integers"):
        BitField(4, False).pack(np.array([0.5]))
    with pytest.raises(PayloadError, match="expected 2"):
        BitField(4, False).unpack(b"\x00", 3)
    with pytest.raises(ShapeError):
        BitField(1, True)


def test_signed_bits_is_the_narrowest() -> None:
    assert signed_bits(0, 1) == BitField(1, False)
    assert signed_bits(0, 255) == BitField(8, False)
    assert signed_bits(-1, 0) == BitField(2, True)
    assert signed_bits(-128, 127) == BitField(8, True)
    assert signed_bits(-129, 0) == BitField(9, True)
    assert signed_bits(-3720, 3255) == BitField(13, True)


SPECS = {
    "default": MacroSpec(),
    "large": MacroSpec(rows=1152, cols=256, weight_bits=8, input_bits=8, rows_per_conversion=128, adc_bits=7,
                       adc_full_scale=127),
    "offset": MacroSpec(rows=64, cols=8, weight_storage="offset", cell_bits=2, rows_per_conversion=16),
    "unsigned-nvm": MacroSpec(rows=64, cols=8, weight_bits=2, weight_storage="unsigned", cell_bits=2,
                              input_bits=3, input_slice_bits=3, rows_per_conversion=8, adc_bits=6,
                              adc_full_scale=63),
    "coarse adc": MacroSpec(rows=64, cols=4, rows_per_conversion=32, adc_bits=4, adc_full_scale=32),
}


def _extreme_outputs(spec: MacroSpec, row_start: int, n_rows: int) -> tuple[int, int]:
    """Smallest and largest output ``recombine`` gives for every code at 0 or adc_max (inputs 0 or input_max)."""
    shape = (1, *spec.raw_shape_for(row_start, n_rows))
    positive = spec.slice_weights() > 0
    high = np.where(positive[None, None, None, :, None], spec.adc_max, 0) * np.ones(shape, dtype=np.int64)
    low = spec.adc_max * np.ones(shape, dtype=np.int64) - high
    x0 = np.zeros((1, n_rows), dtype=np.int64)
    x_max = np.full((1, n_rows), spec.input_max)
    return int(spec.recombine(low, x_max).min()), int(spec.recombine(high, x0).max())


@pytest.mark.parametrize("name", list(SPECS))
def test_output_range_is_what_recombine_reaches(name: str) -> None:
    spec = SPECS[name]
    r = spec.rows_per_conversion
    for row_start, n_rows in [(0, spec.rows), (0, 1), (r - 1, 2), (r, r), (1, spec.rows - 1)]:
        lo, hi = output_range(spec, row_start, n_rows)
        assert (lo, hi) == _extreme_outputs(spec, row_start, n_rows), (row_start, n_rows)
        field = output_field(spec, row_start, n_rows)
        assert field.lo <= lo and hi <= field.hi
        assert signed_bits(lo, hi) == field


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_any_codes_recombine_inside_the_output_field(name: str, seed: int) -> None:
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    n_rows = int(rng.integers(1, spec.rows + 1))
    row_start = int(rng.integers(0, spec.rows - n_rows + 1))
    codes = rng.integers(0, spec.adc_max + 1, size=(8, *spec.raw_shape_for(row_start, n_rows)))
    x = rng.integers(0, spec.input_max + 1, size=(8, n_rows))
    y = spec.recombine(codes, x)
    field = output_field(spec, row_start, n_rows)
    assert np.array_equal(field.unpack(field.pack(y), y.size).reshape(y.shape), y)


def test_the_default_macro_moves_far_fewer_bytes() -> None:
    spec = MacroSpec()
    assert (weight_field(spec), input_field(spec), code_field(spec)) == (
        BitField(4, True), BitField(4, False), BitField(5, False))
    assert output_field(spec, 0, spec.rows).bits == 17  # 16 row groups: -59520 .. 52080
    # one vector of MAC: 256 inputs and 64 outputs took 256 + 256 bytes unpacked; packed 128 + 136
    assert input_field(spec).nbytes(256) + output_field(spec, 0, 256).nbytes(64) == 264

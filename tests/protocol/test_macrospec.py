"""MacroSpec: validation messages, weight digits for every storage, and recombination of ideal conversions.

The references here are written from the definitions in spec.py's docstring with plain numpy (digit expansion,
shifts, a loop over row groups), independent of MacroSpec's own einsum implementation.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import WEIGHT_STORAGES, MacroSpec


# ---- validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MacroSpec.FIELD_RANGES))
def test_each_range_is_enforced_and_named(name: str) -> None:
    lo, hi = MacroSpec.FIELD_RANGES[name]
    for value in (lo - 1, hi + 1):
        with pytest.raises(
            ConfigError, match=rf"MacroSpec\.{name}={value} is outside the allowed range {lo}\.\.{hi}"
        ):
            MacroSpec(**{name: value})


@pytest.mark.parametrize("value", [4.0, "4", True, None])
def test_non_integers_are_rejected_by_name(value: object) -> None:
    with pytest.raises(ConfigError, match=r"MacroSpec\.weight_bits must be an integer"):
        MacroSpec(weight_bits=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (
            {"weight_storage": "sign_magnitude"},
            r"weight_storage='sign_magnitude' is not one of twos, offset, unsigned",
        ),
        ({"weight_storage": "twos", "cell_bits": 2}, r"weight_storage='twos' needs cell_bits=1"),
        ({"weight_storage": "twos", "weight_bits": 1}, r"weight_bits must be >= 2"),
        ({"input_bits": 4, "input_slice_bits": 5}, r"input_slice_bits=5 exceeds input_bits=4"),
        ({"rows": 8, "rows_per_conversion": 9}, r"rows_per_conversion=9 exceeds rows=8"),
        (
            {"rows": 65535, "rows_per_conversion": 1, "input_bits": 16, "adc_bits": 16, "adc_full_scale": 65535},
            r"do not fit the int32",
        ),
    ],
)
def test_cross_field_rules_name_the_fields(fields: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        MacroSpec(**fields)


def test_from_dict_names_unknown_fields_and_accepts_numpy_ints() -> None:
    with pytest.raises(ConfigError, match=r"no field.*colums"):
        MacroSpec.from_dict({"rows": 8, "colums": 4})
    with pytest.raises(ConfigError, match="table of fields"):
        MacroSpec.from_dict([("rows", 8)])  # type: ignore[arg-type]
    spec = MacroSpec.from_dict({"rows": np.int64(64), "rows_per_conversion": np.uint8(8)})
    assert spec.rows == 64 and spec.n_groups == 8
    assert MacroSpec.from_dict(MacroSpec().to_dict()) == MacroSpec()
    with pytest.raises(ConfigError, match="rows_per_conversion=300 exceeds rows=256"):
        MacroSpec().replace(rows_per_conversion=300)


def test_derived_geometry_of_the_default_macro() -> None:
    s = (
        MacroSpec()
    )  # 256 rows, 64 cols, 4-bit twos weights, 4-bit bit-serial inputs, 16 rows/conversion, 5-bit ADC
    assert (s.n_groups, s.n_slices, s.n_planes) == (16, 4, 4)
    assert s.raw_shape == (4, 16, 4, 64) and s.conversions_per_vector == 4 * 16 * 4 * 64
    assert s.physical_cols == 256 and s.s_max == 16 and s.adc_max == 31 and s.adc_lsb == 1.0
    assert (s.weight_min, s.weight_max, s.input_max) == (-8, 7, 15)
    assert s.slice_weights().tolist() == [1, 2, 4, -8] and s.plane_weights().tolist() == [1, 2, 4, 8]
    assert (
        s.weight_dtype == np.dtype("<i1") and s.input_dtype == np.dtype("<u1") and s.code_dtype == np.dtype("<u1")
    )


# ---- weight digits ------------------------------------------------------------------------------------------
def _reference_digits(w: np.ndarray, spec: MacroSpec) -> np.ndarray:
    """Digits [rows, n_slices, cols] by the storage's definition, one Python int at a time."""
    cb, ns = spec.cell_bits, spec.n_slices
    out = np.zeros((w.shape[0], ns, w.shape[1]), dtype=np.int64)
    for (r, c), value in np.ndenumerate(w):
        value = int(value)
        if spec.weight_storage == "differential":  # G+ digits, then G- digits
            half = ns // 2
            for k in range(half):
                out[r, k, c] = (max(value, 0) >> (cb * k)) % (2**cb)
                out[r, half + k, c] = (max(-value, 0) >> (cb * k)) % (2**cb)
            continue
        if spec.weight_storage == "twos":
            stored = value % (2**spec.weight_bits)
        elif spec.weight_storage == "offset":
            stored = value + 2 ** (spec.weight_bits - 1)
        else:
            stored = value
        for k in range(ns):
            out[r, k, c] = (stored >> (cb * k)) % (2**cb)
    return out


def _value_of_digits(d: np.ndarray, spec: MacroSpec) -> np.ndarray:
    """Logical weights from digits: sum of digit * 2**(cell_bits*k), MSB negative for twos, minus the offset."""
    total = np.zeros((d.shape[0], d.shape[2]), dtype=np.int64)
    half = spec.n_slices // 2
    for k in range(spec.n_slices):
        place = 2 ** (spec.cell_bits * k)
        if spec.weight_storage == "twos" and k == spec.n_slices - 1:
            place = -place
        if spec.weight_storage == "differential":  # the second array counts negative
            place = 2 ** (spec.cell_bits * (k % half)) * (1 if k < half else -1)
        total += d[:, k, :].astype(np.int64) * place
    if spec.weight_storage == "offset":
        total -= 2 ** (spec.weight_bits - 1)
    return total


@st.composite
def storage_specs(draw: st.DrawFn) -> MacroSpec:
    storage = draw(st.sampled_from(WEIGHT_STORAGES))
    cell_bits = 1 if storage == "twos" else draw(st.sampled_from([1, 2, 4]))
    weight_bits = draw(st.integers(2 if storage == "twos" else 1, 16))
    rows = draw(st.integers(1, 12))
    return MacroSpec(
        rows=rows,
        cols=draw(st.integers(1, 6)),
        weight_bits=weight_bits,
        weight_storage=storage,
        cell_bits=cell_bits,
        input_bits=1,
        rows_per_conversion=1,
        adc_bits=1,
        adc_full_scale=1,
    )


@settings(max_examples=150, deadline=None)
@given(spec=storage_specs(), data=st.data())
def test_weight_digits_round_trip(spec: MacroSpec, data: st.DataObject) -> None:
    values = st.one_of(
        st.integers(spec.weight_min, spec.weight_max), st.sampled_from([spec.weight_min, spec.weight_max])
    )
    flat = data.draw(st.lists(values, min_size=spec.rows * spec.cols, max_size=spec.rows * spec.cols))
    w = np.array(flat, dtype=np.int64).reshape(spec.rows, spec.cols)
    digits = spec.weights_to_slices(w)
    assert digits.shape == (spec.rows, spec.n_slices, spec.cols) and digits.dtype == np.uint8
    assert int(digits.max()) <= spec.cell_max
    np.testing.assert_array_equal(digits, _reference_digits(w, spec))
    np.testing.assert_array_equal(_value_of_digits(digits, spec), w)
    back = spec.slices_to_weights(digits)
    np.testing.assert_array_equal(back, w)
    # every weight fits the wire dtype
    np.testing.assert_array_equal(w.astype(spec.weight_dtype).astype(np.int64), w)


def test_weight_range_ends_per_storage() -> None:
    assert (MacroSpec(weight_bits=8).weight_min, MacroSpec(weight_bits=8).weight_max) == (-128, 127)
    off = MacroSpec(weight_bits=8, weight_storage="offset", cell_bits=2)
    assert (off.weight_min, off.weight_max, off.weight_offset, off.n_slices) == (-128, 127, 128, 4)
    uns = MacroSpec(weight_bits=16, weight_storage="unsigned", cell_bits=4, rows=16, rows_per_conversion=1)
    assert (uns.weight_min, uns.weight_max, uns.weight_dtype) == (0, 65535, np.dtype("<i4"))


# ---- ideal conversions recombine to x @ W ----------------------------------------------------------------------
@st.composite
def ideal_specs(draw: st.DrawFn) -> MacroSpec:
    """Specs whose ADC resolves every level: adc_full_scale == adc_max >= s_max."""
    storage = draw(st.sampled_from(WEIGHT_STORAGES))
    cell_bits = 1 if storage == "twos" else draw(st.sampled_from([1, 2, 4]))
    weight_bits = draw(st.integers(2 if storage == "twos" else 1, 8))
    input_bits = draw(st.integers(1, 8))
    input_slice_bits = draw(st.integers(1, input_bits))
    rows = draw(st.integers(1, 24))
    rpc = draw(st.integers(1, rows))
    s_max = rpc * (2**cell_bits - 1) * (2**input_slice_bits - 1)
    adc_bits = max(1, int(s_max).bit_length()) + draw(st.integers(0, 1))
    assume(adc_bits <= 16)
    try:
        spec = MacroSpec(
            rows=rows,
            cols=draw(st.integers(1, 5)),
            weight_bits=weight_bits,
            weight_storage=storage,
            cell_bits=cell_bits,
            input_bits=input_bits,
            input_slice_bits=input_slice_bits,
            rows_per_conversion=rpc,
            adc_bits=adc_bits,
            adc_full_scale=2**adc_bits - 1,
        )
    except ConfigError:
        assume(False)
    assert spec.s_max <= spec.adc_max == spec.adc_full_scale
    return spec


@settings(max_examples=120, deadline=None)
@given(spec=ideal_specs(), seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 4))
def test_ideal_conversions_recombine_to_matmul(spec: MacroSpec, seed: int, batch: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(spec.rows, spec.cols))
    w[0, 0] = spec.weight_min  # make the extremes appear
    w[-1, -1] = spec.weight_max
    x = rng.integers(0, spec.input_max + 1, size=(batch, spec.rows))
    x[0, 0] = spec.input_max

    # input slices by shifting, as the docstring defines them
    isb = spec.input_slice_bits
    n_planes = -(-spec.input_bits // isb)
    planes = np.stack([(x >> (isb * p)) & (2**isb - 1) for p in range(n_planes)], axis=1)
    np.testing.assert_array_equal(spec.inputs_to_planes(x), planes)

    # s[b, p, g, k, c] = sum over rows r of group g of x_p[r] * w_k[r, c]
    digits = _reference_digits(w, spec)
    n_groups = -(-spec.rows // spec.rows_per_conversion)
    s = np.zeros((batch, n_planes, n_groups, spec.n_slices, spec.cols), dtype=np.int64)
    for g in range(n_groups):
        rows = slice(g * spec.rows_per_conversion, (g + 1) * spec.rows_per_conversion)
        s[:, :, g] = np.einsum("bpr,rkc->bpkc", planes[:, :, rows], digits[rows])
    assert s.shape[1:] == spec.raw_shape
    assert 0 <= s.min() and s.max() <= spec.adc_max

    y = spec.recombine(s, x)  # ideal conversion: code == s
    np.testing.assert_array_equal(y, x @ w)
    assert np.abs(y).max() < 2**31


def test_recombine_scales_codes_by_the_adc_lsb() -> None:
    # 2 rows in one group, 2-bit twos weights (slice weights 1, -2), 1-bit inputs, 2-bit ADC
    spec = MacroSpec(
        rows=2, cols=1, weight_bits=2, input_bits=1, rows_per_conversion=2, adc_bits=2, adc_full_scale=6
    )
    assert spec.adc_lsb == 2.0
    codes = np.array([1, 1]).reshape(1, 1, 1, 2, 1)  # one code per weight slice
    assert spec.recombine(codes, np.ones((1, 2))).tolist() == [[2 * (1 * 1 + 1 * -2)]]
    # full scale 5 over codes 0..3: one code is 5/3 levels; 1 code -> round(1.67) = 2
    spec5 = spec.replace(adc_full_scale=5)
    assert spec5.recombine(np.array([1, 0]).reshape(1, 1, 1, 2, 1), np.ones((1, 2))).tolist() == [[2]]

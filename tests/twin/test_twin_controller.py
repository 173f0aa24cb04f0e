"""The twin's controller: exact on the ideal profile, registers, counters, costs, identity, input validation."""

from __future__ import annotations


import numpy as np
import pytest

from cimlab import chip_sim
from cimlab.chip_sim.controller import TwinController
from cimlab.firmware_bridge.bridge import Bridge
from cimlab.firmware_bridge.controller import Controller
from cimlab.firmware_bridge.errors import ConfigError, DeviceError, ShapeError
from cimlab.firmware_bridge.frame import Framer, encode_frame
from cimlab.firmware_bridge.messages import MacInputs, MacResult, Opcode, Status, WeightRows
from cimlab.firmware_bridge.registers import BY_NAME, ERR_BAD_FRAME, ERR_BAD_REQUEST, ID_MAGIC


def _random(twin: TwinController, batch: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    spec = twin.spec
    rng = np.random.default_rng(seed)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (batch, spec.rows)).astype(spec.input_dtype)
    return w, x


IDEAL_VARIANTS = [
    {},
    {"weight_storage": "offset"},
    {"weight_storage": "unsigned"},
    {"weight_storage": "offset", "cell_bits": "2", "input_slice_bits": "2", "rows_per_conversion": "8",
     "adc_bits": "7", "adc_full_scale": "127"},
    {"weight_bits": "8", "input_bits": "8", "rows": "96", "cols": "5", "rows_per_conversion": "32",
     "adc_bits": "6", "adc_full_scale": "63"},
    {"input_slice_bits": "4", "rows_per_conversion": "2", "adc_bits": "5", "adc_full_scale": "31",
     "rows": "40"},
]


@pytest.mark.parametrize("overrides", IDEAL_VARIANTS)
def test_ideal_profile_is_exactly_x_at_w(overrides: dict[str, str]) -> None:
    twin = chip_sim.make_twin("ideal", 0, overrides)
    spec = twin.spec
    assert spec.s_max <= spec.adc_max and spec.adc_full_scale == spec.adc_max
    w, x = _random(twin, 37)
    twin.write_weights(0, w)
    np.testing.assert_array_equal(twin.read_weights(0, spec.rows), w)
    y, _ = twin.mac(0, x)
    assert y.dtype == np.int32 and y.shape == (37, spec.cols)
    np.testing.assert_array_equal(y, x.astype(np.int64) @ w)
    codes, _ = twin.mac_raw(0, x[:5])
    assert codes.shape == (5, *spec.raw_shape) and codes.dtype == spec.code_dtype
    np.testing.assert_array_equal(codes, spec.ideal_codes(spec.ideal_levels(x[:5], w)))
    # a row range: rows outside it see input 0
    lo, n = spec.rows // 3, spec.rows // 2
    y2, _ = twin.mac(lo, x[:6, :n])
    np.testing.assert_array_equal(y2, x[:6, :n].astype(np.int64) @ w[lo : lo + n])
    codes2, _ = twin.mac_raw(lo, x[:6, :n])
    assert codes2.shape == (6, *spec.raw_shape_for(lo, n))
    np.testing.assert_array_equal(codes2, spec.ideal_codes(spec.ideal_levels(x[:6, :n], w, lo)))


def test_ideal_adc_that_does_not_resolve_every_level_follows_the_ideal_transfer() -> None:
    # 2 levels per LSB: ideal codes round half up and clip; MAC = recombine of those codes
    twin = chip_sim.make_twin("ideal", 0, {"rows_per_conversion": "64", "adc_full_scale": "62"})
    spec = twin.spec
    assert spec.adc_lsb == 2
    w, x = _random(twin, 9)
    twin.write_weights(0, w)
    codes, _ = twin.mac_raw(0, x)
    np.testing.assert_array_equal(codes, spec.ideal_codes(spec.ideal_levels(x, w)))
    y, _ = twin.mac(0, x)
    np.testing.assert_array_equal(y, spec.recombine(codes, x))


def test_partial_weight_writes_and_reset() -> None:
    twin = chip_sim.make_twin("ideal", 0)
    spec = twin.spec
    w, _ = _random(twin, 1)
    twin.write_weights(10, w[:20])
    np.testing.assert_array_equal(twin.read_weights(10, 20), w[:20])
    np.testing.assert_array_equal(twin.read_weights(0, 10), np.zeros((10, spec.cols)))
    twin.reset(clear_weights=False)
    np.testing.assert_array_equal(twin.read_weights(10, 20), w[:20])
    twin.reset(clear_weights=True)
    np.testing.assert_array_equal(twin.read_weights(0, spec.rows), np.zeros((spec.rows, spec.cols)))


def test_offset_storage_clears_to_logical_zero() -> None:
    twin = chip_sim.make_twin("ideal", 0, {"weight_storage": "offset"})
    np.testing.assert_array_equal(twin.read_weights(0, twin.spec.rows), 0)
    x = np.full((2, twin.spec.rows), 7, dtype=np.uint8)
    np.testing.assert_array_equal(twin.mac(0, x)[0], 0)


def test_identity_and_controller_interface() -> None:
    twin = chip_sim.make_twin("ideal", 42)
    assert isinstance(twin, Controller)
    ident = twin.identity()
    assert ident.chip_id == "twin-ideal-s42"
    assert ident.firmware_id.startswith("cimlab-twin ")
    assert ident.bitstream_id == "twin"


def test_registers() -> None:
    twin = chip_sim.make_twin("default", 0)
    reg = {name: r.addr for name, r in BY_NAME.items()}
    assert twin.read_reg(reg["ID"]) == ID_MAGIC
    assert twin.write_reg(reg["SCRATCH"], 0xDEADBEEF) == 0xDEADBEEF
    assert twin.read_reg(reg["SCRATCH"]) == 0xDEADBEEF
    with pytest.raises(DeviceError) as info:
        twin.read_reg(0x7F)
    assert info.value.status == Status.BAD_REGISTER
    with pytest.raises(DeviceError) as info:
        twin.write_reg(0x7F, 1)
    assert info.value.status == Status.BAD_REGISTER
    for name in ("ID", "PROTO", "REGMAP", "CYCLES_LO", "CYCLES_HI", "OPS"):
        with pytest.raises(DeviceError) as info:
            twin.write_reg(reg[name], 1)
        assert info.value.status == Status.READ_ONLY
    # ERR_FLAGS: sticky, write 1 to clear
    twin.note_error(ERR_BAD_FRAME | ERR_BAD_REQUEST)
    assert twin.read_reg(reg["ERR_FLAGS"]) == 3
    assert twin.write_reg(reg["ERR_FLAGS"], ERR_BAD_FRAME) == ERR_BAD_REQUEST
    assert twin.counters().error_flags == ERR_BAD_REQUEST
    # VDD and temperature: accepted inside the profile's window, refused outside it
    assert twin.write_reg(reg["VDD_MV"], 700) == 700
    assert twin.vdd_mv == 700
    with pytest.raises(DeviceError) as info:
        twin.write_reg(reg["VDD_MV"], 5000)
    assert info.value.status == Status.BAD_ARGUMENT and "600..1000" in str(info.value)
    minus_ten = (-1000) & 0xFFFFFFFF
    assert twin.write_reg(reg["TEMP_CC"], minus_ten) == minus_ten
    assert twin.temp_c == -10.0
    with pytest.raises(DeviceError):
        twin.write_reg(reg["TEMP_CC"], 20000)
    twin.reset(clear_weights=False)
    assert twin.vdd_mv == 800 and twin.temp_c == 25.0 and twin.read_reg(reg["SCRATCH"]) == 0


def test_counters_costs_and_ctrl_clear() -> None:
    twin = chip_sim.make_twin("default", 0)
    spec = twin.spec
    reg = {name: r.addr for name, r in BY_NAME.items()}
    w, x = _random(twin, 10)
    # cycle counts of the default profile worked out by hand from the RTL's states (bitstreams/rtl/cimlab_seq.sv;
    # tests/rtl checks them against the RTL's own counters): a weight row is 4 bus words, +1 read latency, +2 write
    # cycles; the 512-word input buffer takes 128 rows a run, each run pays 8 cycles of decode
    twin.write_weights(0, w)
    write_cycles = 2 * 8 + 256 * (4 + 1 + 2)
    assert twin.counters().cycles == write_cycles == 1808
    # a vector: 16 group words +1, then 4 planes x (2 pulse + 16 groups x 6), 2 to finish the accumulate, 32 words
    _, cost = twin.mac(0, x)
    per_vector = 16 + 1 + 4 * (2 + 16 * 6) + 2 + 32
    assert twin.vector_cycles(0, spec.rows, raw=False) == per_vector
    assert cost.cycles == 8 + 10 * per_vector
    # raw codes: 32 output words per conversion, and the 2048-word output buffer holds one vector a run
    _, raw_cost = twin.mac_raw(0, x[:2])
    assert raw_cost.cycles == 2 * (8 + 16 + 1 + 4 * (2 + 16 * (6 + 32)))
    c = twin.counters()
    assert c.cycles == write_cycles + cost.cycles + raw_cost.cycles
    assert c.ops == 12 and c.conversions == 12 * spec.conversions_per_vector
    assert c.last == raw_cost and not c.busy
    assert cost.energy_fj > 0 and c.energy_fj > cost.energy_fj
    assert twin.read_reg(reg["CYCLES_LO"]) == c.cycles & 0xFFFFFFFF
    assert twin.read_reg(reg["CYCLES_HI"]) == c.cycles >> 32
    assert twin.read_reg(reg["OPS"]) == 12
    twin.read_weights(0, 3)
    assert twin.counters().last.cycles == 8 + 3 * (2 + 4)  # the SRAM's read port, then 4 words out
    assert twin.write_reg(reg["CTRL"], 1) == 0  # self-clearing
    c = twin.counters()
    assert (c.cycles, c.ops, c.conversions, c.energy_fj) == (0, 0, 0, 0)
    assert twin.latency_s(cost) == cost.cycles / spec.clock_hz


def test_a_row_range_converts_only_its_groups() -> None:
    twin = chip_sim.make_twin("default", 0)
    spec = twin.spec
    x = np.ones((3, 20), dtype=np.uint8)
    codes, cost = twin.mac_raw(30, x)  # rows 30..49: groups 1..3 of 16 rows
    assert spec.group_span(30, 20) == (1, 4)
    assert codes.shape == (3, spec.n_planes, 3, spec.n_slices, spec.cols)
    assert twin.counters().conversions == 3 * spec.n_planes * 3 * spec.physical_cols
    _, mac_cost = twin.mac(30, x)
    assert mac_cost.cycles == 8 + 3 * (3 + 1 + 4 * (2 + 3 * 6) + 2 + 32)
    assert cost.cycles > mac_cost.cycles


def test_energy_follows_the_data() -> None:
    twin = chip_sim.make_twin("ideal", 0)
    spec = twin.spec
    twin.write_weights(0, np.full((spec.rows, spec.cols), -1))  # every cell bit set
    zeros = np.zeros((4, spec.rows), dtype=np.uint8)
    ones = np.full((4, spec.rows), spec.input_max, dtype=np.uint8)
    _, quiet = twin.mac(0, zeros)
    _, busy = twin.mac(0, ones)
    assert quiet.cycles == busy.cycles
    e = twin.profile.energy
    conversions = 4 * spec.conversions_per_vector
    assert quiet.energy_fj == round(e.adc_fj * conversions + e.digital_fj_per_vector * 4)
    levels = 4 * spec.n_planes * spec.rows * spec.physical_cols
    pulses = 4 * spec.n_planes * spec.rows
    assert busy.energy_fj == round(
        e.adc_fj * conversions + e.bitline_fj_per_level * levels + e.wordline_fj * pulses
        + e.digital_fj_per_vector * 4
    )


@pytest.mark.parametrize(
    ("row_start", "shape", "dtype", "words"),
    [
        (0, (3,), np.uint8, ["shape"]),
        (0, (0, 256), np.uint8, ["batch"]),
        (200, (2, 100), np.uint8, ["rows 200..299", "0..255"]),
        (0, (2, 10), np.float32, ["integers"]),
    ],
)
def test_bad_inputs_raise_shape_errors(
    row_start: int, shape: tuple[int, ...], dtype: type, words: list[str]
) -> None:
    twin = chip_sim.make_twin("ideal", 0)
    with pytest.raises(ShapeError) as info:
        twin.mac(row_start, np.zeros(shape, dtype=dtype))
    for word in words:
        assert word in str(info.value)


def test_out_of_range_values_raise() -> None:
    twin = chip_sim.make_twin("ideal", 0)
    with pytest.raises(ShapeError, match="0..15"):
        twin.mac(0, np.full((1, 4), 16, dtype=np.uint8))
    with pytest.raises(ShapeError, match="-8..7"):
        twin.write_weights(0, np.full((1, 64), 8))
    with pytest.raises(ShapeError, match="cols=64"):
        twin.write_weights(0, np.zeros((1, 63), dtype=np.int64))
    with pytest.raises(ConfigError, match="seed"):
        chip_sim.make_twin("ideal", -1)


def test_twin_behind_the_bridge_answers_mac_frames() -> None:
    twin = chip_sim.make_twin("ideal", 0)
    spec = twin.spec
    bridge = Bridge(twin)
    w, x = _random(twin, 3)
    frames = [
        encode_frame(Opcode.WRITE_WEIGHTS, 1, WeightRows.of(spec, 0, w).encode()),
        encode_frame(Opcode.MAC, 2, MacInputs.of(spec, 0, x).encode()),
    ]
    framer = Framer()
    replies = [ev for f in frames for out in bridge.receive(f) for ev in framer.feed(out)]
    assert [r.status for r in replies] == [Status.OK, Status.OK]
    body = MacResult.decode(replies[1].payload)
    y = body.outputs(spec, 0, spec.rows)
    np.testing.assert_array_equal(y, x.astype(np.int64) @ w)
    assert body.cost.cycles == twin.counters().last.cycles

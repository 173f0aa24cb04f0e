"""NVM crossbars on the wire and in the twin: differential storage packs and computes exactly, the device stage
draws what the published figures say, and the twin's codes for the SRAM profiles did not move."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest

from cimlab.chip_sim import make_twin
from cimlab.chip_sim.profiles import load_profile
from cimlab.driver import Chip
from cimlab.firmware_bridge import messages as m
from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.firmware_bridge.packing import BitField, weight_field
from cimlab.firmware_bridge.spec import MacroSpec

DIFF = MacroSpec(rows=32, cols=4, weight_bits=2, weight_storage="differential", cell_bits=2, input_bits=4,
                 rows_per_conversion=16, adc_bits=6, adc_full_scale=63)


# ---- the wire --------------------------------------------------------------------------------------------------
def test_differential_weights_pack_as_a_signed_magnitude_plus_sign() -> None:
    field = weight_field(DIFF)
    assert field == BitField(3, True) and (DIFF.weight_min, DIFF.weight_max) == (-3, 3)
    # 3 = 011, -3 = 101, 0 = 000, 1 = 001, least significant bit first: 0b00_101_011, 0b0000_0010
    assert field.pack(np.array([3, -3, 0, 1])) == bytes([0b00101011, 0b00000010])
    assert field.unpack(bytes([0b00101011, 0b00000010]), 4).tolist() == [3, -3, 0, 1]
    unipolar = MacroSpec(rows=32, cols=4, weight_bits=2, weight_storage="unsigned", cell_bits=2)
    assert weight_field(unipolar).pack(np.array([3, 0, 2, 1])) == bytes([0b01100011])
    with pytest.raises(ShapeError, match="outside"):
        m.WeightRows.of(unipolar, 0, np.array([[-1, 0, 0, 0]]))


def test_differential_spec_in_hello_golden_bytes() -> None:
    raw = m._MACRO_SPEC.build(m.spec_to_wire(DIFF))
    golden = struct.pack("<HHBBBBBHBII", 32, 4, 2, 3, 2, 4, 1, 16, 6, 63, 100_000_000)
    assert raw == golden  # weight_storage code 3 = differential; the codes 0..2 keep their meaning
    assert m.spec_from_wire(m._MACRO_SPEC.parse(golden)) == DIFF


def test_differential_storage_definition() -> None:
    assert DIFF.n_slices == 2 and DIFF.sides == 2 and DIFF.slice_weights().tolist() == [1, -1]
    four = DIFF.replace(weight_bits=4, cell_bits=2)  # two 2-bit cells per side
    assert four.n_slices == 4 and four.slice_weights().tolist() == [1, 4, -1, -4]
    d = four.weights_to_slices(np.array([[13, -6]]))
    assert d[0, :, 0].tolist() == [1, 3, 0, 0] and d[0, :, 1].tolist() == [0, 0, 2, 1]  # 13 = 3*4+1, 6 = 1*4+2


def test_a_differential_twin_computes_exactly_over_the_wire() -> None:
    overrides = {k: str(v) for k, v in DIFF.to_dict().items()}
    url = "sim://?profile=ideal&" + "&".join(f"{k}={v}" for k, v in overrides.items())
    rng = np.random.default_rng(5)
    w = rng.integers(-3, 4, (32, 4))
    x = rng.integers(0, 16, (20, 32))
    with Chip.open(url) as chip:
        assert chip.spec == DIFF
        chip.write_weights(w)
        assert np.array_equal(chip.read_weights(), w)
        assert np.array_equal(chip.mac(x), x @ w)
        raw = chip.mac_raw(x[:2])
        assert raw.shape == (2, *DIFF.raw_shape)


# ---- the device stage ------------------------------------------------------------------------------------------
def _milo_wan_sigma_levels(g_min: float, g_max: float, cell_bits: int) -> np.ndarray:
    """Static error per level from the published fits, written out here: Milo 2021 programming error
    (4.782321 - 0.009107 G uS) and Wan 2022 relaxation (3.35 uS), in level steps."""
    levels = 2**cell_bits - 1
    step = (g_max - g_min) / levels
    g = g_min + step * np.arange(levels + 1)
    return np.sqrt((4.782321 - 0.009107 * g) ** 2 + 3.35**2) / step


@pytest.mark.parametrize("name", ["nvm-2bit", "nvm-4bit"])
def test_programmed_cells_spread_as_the_published_figures(name: str) -> None:
    profile = load_profile(name, {"stuck_at_0": 0, "stuck_at_1": 0})
    spec = profile.spec
    want = _milo_wan_sigma_levels(50.0, 225.0, spec.cell_bits)
    np.testing.assert_allclose(profile.device.sigma_levels(spec), want, rtol=1e-9)
    twin = make_twin(name, seed=11, overrides={"stuck_at_0": 0, "stuck_at_1": 0})
    conv = twin.converter
    for level in (0, spec.cell_max // 2, spec.cell_max):
        digits = np.full((spec.rows, spec.physical_cols), level, dtype=np.uint8)
        got = conv.compute_digits(digits, 0) / conv.cell_grid - level  # the cell's error, in levels
        assert abs(got.mean()) < 4 * want[level] / math.sqrt(got.size) + 2 / conv.cell_grid
        assert got.std() == pytest.approx(want[level], rel=0.03)


def test_level_overlap_is_worse_for_4_bit_cells() -> None:
    two, four = load_profile("nvm-2bit"), load_profile("nvm-4bit")
    o2 = two.device.level_overlap(two.spec)
    o4 = four.device.level_overlap(four.spec)
    assert o2 < 1e-6 < 0.1 < o4  # 2-bit levels 58 uS apart stay apart; 4-bit levels 11.7 uS apart overlap
    # the inner levels of a 4-bit cell: P(|error| > half a step) = erfc(0.5 / (sigma sqrt 2))
    s = _milo_wan_sigma_levels(50.0, 225.0, 4)
    expect = np.mean([math.erfc(0.5 / (v * math.sqrt(2))) * (1 if k in (0, 15) else 2) / 2 for k, v in enumerate(s)])
    assert o4 == pytest.approx(expect, rel=1e-9)


def test_read_noise_widens_the_conversion_noise() -> None:
    quiet = make_twin("nvm-2bit", overrides={"read_sigma_rel": 0})
    loud = make_twin("nvm-2bit")
    assert loud.converter.noise_lsb > quiet.converter.noise_lsb == pytest.approx(0.1)
    g = 50.0 + 175.0 / 3 * np.arange(4)
    per_conversion = 0.01 * math.sqrt(8 * np.mean(g**2)) / (175.0 / 3)  # 8 of 16 rows driven, levels equally used
    assert loud.converter.noise_lsb == pytest.approx(math.hypot(0.1, per_conversion), rel=1e-9)


def test_device_stage_turns_off_and_rejects_an_inverted_window() -> None:
    off = make_twin("nvm-2bit", overrides={"g_max_us": 0})
    assert off.converter.device is None
    with pytest.raises(ConfigError, match="g_max_us"):
        load_profile("nvm-2bit", {"g_min_us": 300})


def test_sram_profiles_keep_their_codes() -> None:
    """Codes of the SRAM profiles for one seed, pinned at the commit before the device stage existed (their costs
    follow the RTL sequencer's cycle model, which tests/rtl checks)."""
    h = hashlib.sha256()
    for prof in ("default", "large", "ideal"):
        t = make_twin(prof, seed=3)
        rng = np.random.default_rng(0)
        s = t.spec
        t.write_weights(0, rng.integers(s.weight_min, s.weight_max + 1, (s.rows, s.cols)))
        codes, _ = t.mac_raw(0, rng.integers(0, s.input_max + 1, (8, s.rows)))
        h.update(codes.tobytes())
    assert h.hexdigest() == "69a6e4733c2a57e9db140dcc5ab46db4d08fe23ddbdd4bdf90826eaf22fc7081"


def test_characterize_sweeps_both_arrays_of_a_differential_macro(tmp_path) -> None:  # noqa: ANN001
    """Every physical column of both arrays gets every level, and on an ideal twin reads the ideal code."""
    from click.testing import CliRunner

    from cimlab.cli import cli
    from cimlab.firmware_bridge.errmodel import ErrorModel

    url = "sim://?profile=ideal&" + "&".join(f"{k}={v}" for k, v in DIFF.replace(cols=2).to_dict().items())
    r = CliRunner().invoke(cli, ["characterize", "--link", url, "--out", str(tmp_path), "--repeats", "2",
                                 "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    model = ErrorModel.load(tmp_path / "dmacem.npz")
    spec = model.spec
    assert spec.weight_storage == "differential" and model.counts.shape[0] == spec.physical_cols == 4
    per_level = model.counts.sum(axis=2)  # [column, level]
    assert (per_level[:, : spec.s_max + 1] >= 2).all()  # both arrays' columns, every level
    codes = model.counts.argmax(axis=2)
    np.testing.assert_array_equal(codes, np.broadcast_to(spec.ideal_codes(np.arange(spec.n_levels)), codes.shape))

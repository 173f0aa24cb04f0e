"""The analog model: default is close to ideal but not equal; VDD, temperature and stuck cells act as stated."""

from __future__ import annotations

import numpy as np
import pytest

from cimlab import chip_sim
from cimlab.chip_sim.analog import SUB_LEVEL, AnalyticConverter, normal_quantiles
from cimlab.chip_sim.controller import TwinController
from cimlab.firmware_bridge.registers import BY_NAME

VDD = BY_NAME["VDD_MV"].addr
TEMP = BY_NAME["TEMP_CC"].addr


def _programmed(profile: str, seed: int = 0, overrides: dict[str, str] | None = None,
                batch: int = 200) -> tuple[TwinController, np.ndarray, np.ndarray]:
    twin = chip_sim.make_twin(profile, seed, overrides)
    spec = twin.spec
    rng = np.random.default_rng(seed + 100)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (batch, spec.rows)).astype(spec.input_dtype)
    twin.write_weights(0, w)
    return twin, w, x


def test_default_profile_is_statistically_close_to_ideal() -> None:
    twin, w, x = _programmed("default")
    spec = twin.spec
    codes, _ = twin.mac_raw(0, x[:100])
    ideal = spec.ideal_codes(spec.ideal_levels(x[:100], w))
    err = codes.astype(np.int64) - ideal
    wrong = np.mean(err != 0)
    assert 1e-4 < wrong < 0.02  # non-ideal, but most conversions read the ideal code
    assert np.abs(err).max() <= 2
    y, _ = twin.mac(0, x)
    ref = x.astype(np.int64) @ w
    assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.995
    assert np.sqrt(np.mean((y - ref) ** 2)) / ref.std() < 0.1
    assert np.mean(y != ref) > 0.05


@pytest.mark.parametrize("profile", ["large", "nvm-2bit"])
def test_other_profiles_track_x_at_w(profile: str) -> None:
    twin, w, x = _programmed(profile, batch=16)
    y, _ = twin.mac(0, x)
    ref = x.astype(np.int64) @ w
    assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.9
    assert not np.array_equal(y, ref)


def _mean_and_spread(twin: TwinController, level: int, n: int = 400) -> tuple[float, float]:
    """Mean and std of column 0's codes for a fixed partial sum ``level`` in every group (weights all 1)."""
    spec = twin.spec
    x = np.zeros((n, spec.rows), dtype=spec.input_dtype)
    for g in range(spec.n_groups):
        x[:, g * spec.rows_per_conversion : g * spec.rows_per_conversion + level] = 1
    codes, _ = twin.mac_raw(0, x)
    c = codes[:, 0, :, 0, :].astype(np.float64)  # plane 0, LSB slice: level `level` everywhere
    return float(c.mean()), float(c.std())


def test_vdd_changes_gain_noise_and_energy() -> None:
    overrides = {"noise_sigma_lsb": "0.5", "cell_sigma": "0", "gain_sigma": "0", "offset_sigma_lsb": "0",
                 "adc_dnl_sigma_lsb": "0", "adc_inl_bow_lsb": "0"}
    twin = chip_sim.make_twin("default", 0, overrides)
    spec = twin.spec
    twin.write_weights(0, np.ones((spec.rows, spec.cols), dtype=np.int64))
    mean_nom, spread_nom = _mean_and_spread(twin, 12)
    assert abs(mean_nom - 12) < 0.1
    x = np.ones((8, spec.rows), dtype=np.uint8)
    _, e_nom = twin.mac(0, x)
    twin.write_reg(VDD, 640)  # -20 %
    mean_low, spread_low = _mean_and_spread(twin, 12)
    _, e_low = twin.mac(0, x)
    a = twin.profile.analog
    expected_gain = 1 + a.gain_vdd_coeff * (640 - 800) / 800
    assert mean_low == pytest.approx(12 * expected_gain, abs=0.15)
    assert spread_low > spread_nom * 1.2  # noise rises as VDD falls (noise_vdd_coeff < 0)
    assert e_low.cycles == e_nom.cycles
    assert e_low.energy_fj == pytest.approx(e_nom.energy_fj * (640 / 800) ** 2, rel=1e-6)


def test_temperature_drifts_gain() -> None:
    overrides = {"noise_sigma_lsb": "0", "gain_tempco_ppm": "-2000", "offset_tempco_lsb": "0"}
    twin = chip_sim.make_twin("ideal", 0, overrides)
    spec = twin.spec
    twin.write_weights(0, np.ones((spec.rows, spec.cols), dtype=np.int64))
    cold, _ = _mean_and_spread(twin, 16, n=4)
    twin.write_reg(TEMP, 12500)  # 125 degC: gain -20 %
    hot, _ = _mean_and_spread(twin, 16, n=4)
    assert cold == 16 and hot == pytest.approx(16 * 0.8, abs=0.51)


def test_stuck_cells_change_compute_but_not_readback() -> None:
    twin, w, x = _programmed("ideal", overrides={"stuck_at_1": "0.2"}, batch=20)
    spec = twin.spec
    np.testing.assert_array_equal(twin.read_weights(0, spec.rows), w)
    codes, _ = twin.mac_raw(0, x)
    ideal = spec.ideal_codes(spec.ideal_levels(x, w))
    assert (codes >= ideal).all() and (codes > ideal).mean() > 0.1
    conv = twin.converter
    assert isinstance(conv, AnalyticConverter)
    assert abs(conv.stuck1.mean() - 0.2) < 0.02 and not conv.stuck0.any()


def test_clipping_at_full_scale() -> None:
    # 64 rows per conversion into a 5-bit ADC resolving one level per code: levels above 31 clip to 31
    twin = chip_sim.make_twin("ideal", 0, {"rows_per_conversion": "64"})
    spec = twin.spec
    twin.write_weights(0, np.ones((spec.rows, spec.cols), dtype=np.int64))
    codes, _ = twin.mac_raw(0, np.ones((1, spec.rows), dtype=np.uint8))
    assert codes[0, 0, :, 0, :].max() == 31


def test_noise_table_is_a_standard_normal() -> None:
    q = normal_quantiles()
    assert q.size == 65536 and abs(q.mean()) < 1e-12 and q.std() == pytest.approx(1.0, abs=2e-3)
    conv = chip_sim.make_twin("default", 0).converter
    assert isinstance(conv, AnalyticConverter)
    sigma_bins = conv.noise_table.astype(np.float64).std()
    assert sigma_bins == pytest.approx(conv.noise_lsb * conv.spec.adc_lsb * SUB_LEVEL, rel=2e-3)


def test_adc_thresholds_have_inl_and_dnl() -> None:
    conv = chip_sim.make_twin("default", 0).converter
    assert isinstance(conv, AnalyticConverter)
    ideal = np.arange(conv.spec.adc_max) + 0.5
    err = conv.thresholds - ideal
    assert 0 < np.abs(err).max() < 0.5
    assert np.all(np.diff(conv.thresholds) >= 0)
    ideal_conv = chip_sim.make_twin("ideal", 0).converter
    np.testing.assert_array_equal(ideal_conv.thresholds, ideal)

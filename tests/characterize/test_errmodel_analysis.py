"""cimlab.errmodel.MacErrorModel: probabilities, moments, line and analog fits, merging, sampling, files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cimlab.errmodel import MacErrorModel
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec

SPEC = MacroSpec(rows=32, cols=8)  # 16 rows/conversion, 5-bit ADC: 17 levels, 32 codes, J = 32


def identity_model(spec: MacroSpec = SPEC, n: int = 10) -> MacErrorModel:
    counts = np.zeros((spec.physical_cols, spec.n_levels, spec.n_codes), dtype=np.int64)
    s = np.arange(spec.n_levels)
    counts[:, s, spec.ideal_codes(s)] = n
    return MacErrorModel.from_counts(spec, counts, chip_id="chip-a", conditions={"vdd_mv": 800})


def probit_model(gain: np.ndarray, offset: np.ndarray, noise: float, n: int, seed: int) -> MacErrorModel:
    """Counts drawn from the analog model the fit assumes: code = clip(floor(g s + o + noise + 1/2))."""
    rng = np.random.default_rng(seed)
    J, L, C = SPEC.physical_cols, SPEC.n_levels, SPEC.n_codes
    s = np.repeat(np.arange(L), n)
    a = gain[:, None] * s[None, :] + offset[:, None] + noise * rng.standard_normal((J, s.size))
    code = np.clip(np.floor(a + 0.5), 0, C - 1).astype(np.int64)
    counts = np.zeros((J, L, C), dtype=np.int64)
    np.add.at(counts, (np.arange(J)[:, None], s[None, :], code), 1)
    return MacErrorModel.from_counts(SPEC, counts)


def test_identity_views() -> None:
    m = identity_model()
    s = np.arange(SPEC.n_levels)
    p = m.probabilities()
    assert np.all(p[:, s, s] == 1.0)
    np.testing.assert_array_equal(m.mean_transfer(), np.broadcast_to(s, (SPEC.physical_cols, s.size)))
    np.testing.assert_array_equal(m.mean_transfer(pooled=True), s)
    assert np.all(m.slope() == 1.0)
    assert np.all(m.sigma() == 0.0) and np.all(m.sigma(pooled=True) == 0.0)
    assert np.all(m.column_spread() == 0.0)
    fit = m.gain_offset()
    np.testing.assert_allclose(fit.gain, 1.0)
    np.testing.assert_allclose(fit.offset, 0.0, atol=1e-12)
    assert (fit.levels_used == SPEC.n_levels - 1).all()  # level 0 sits on the bottom rail
    inl, dnl = m.inl_dnl()
    np.testing.assert_allclose(inl[1:], 0.0, atol=1e-12)
    assert np.isnan(inl[0])
    np.testing.assert_allclose(dnl[1:], 0.0, atol=1e-12)
    edges, hist = m.error_histogram()
    assert hist.sum() == m.counts.sum() == hist[edges == 0][0]
    summary = m.summary()
    assert summary["exact_code_rate"] == 1.0 and summary["conversions"] == 32 * 17 * 10


def test_probabilities_smoothing_and_unobserved_rows() -> None:
    counts = np.zeros((SPEC.physical_cols, SPEC.n_levels, SPEC.n_codes), dtype=np.int64)
    counts[0, 3, 3] = 6
    counts[0, 3, 4] = 2
    m = MacErrorModel.from_counts(SPEC, counts)
    p = m.probabilities()
    assert p[0, 3, 3] == 0.75 and p[0, 3, 4] == 0.25
    assert np.isnan(p[1, 3]).all() and np.isnan(p[0, 4]).all()
    ps = m.probabilities(alpha=0.5)
    assert ps[0, 3].sum() == pytest.approx(1.0)
    assert ps[0, 3, 3] == pytest.approx(6.5 / (8 + 0.5 * 32))
    assert ps[0, 3, 0] > 0
    pooled = m.probabilities(pooled=True)
    assert pooled.shape == (SPEC.n_levels, SPEC.n_codes) and pooled[3, 3] == 0.75
    assert m.mean_transfer()[0, 3] == pytest.approx(3.25)
    assert m.sigma()[0, 3] == pytest.approx(np.sqrt(0.75 * 0.25))
    with pytest.raises(ConfigError, match="alpha"):
        m.probabilities(alpha=-1)


def test_analog_fit_recovers_gain_offset_and_noise() -> None:
    rng = np.random.default_rng(3)
    J = SPEC.physical_cols
    gain = 0.85 * (1 + 0.01 * rng.standard_normal(J))
    offset = 0.1 * rng.standard_normal(J)
    noise = 0.2
    fit = probit_model(gain, offset, noise, n=600, seed=4).fit_analog()
    assert fit.resolved.all()
    # each estimate within 5 of its own standard errors, and those errors small
    assert np.all(np.abs(fit.gain - gain) < 5 * fit.gain_se) and fit.gain_se.max() < 0.003
    assert np.all(np.abs(fit.offset - offset) < 5 * fit.offset_se) and fit.offset_se.max() < 0.03
    assert np.all(np.abs(fit.noise - noise) < 5 * fit.noise_se) and fit.noise_se.max() < 0.02
    # the straight line through the mean codes is biased by the steps of the staircase; the analog fit is not
    line = MacErrorModel.gain_offset(probit_model(gain, offset, noise, n=600, seed=4))
    assert np.sqrt(np.mean((fit.gain - gain) ** 2)) < np.sqrt(np.mean((line.gain - gain) ** 2))


def test_analog_fit_says_when_the_codes_do_not_resolve_the_noise() -> None:
    fit = identity_model().fit_analog()
    assert not fit.resolved.any()
    np.testing.assert_allclose(fit.gain, 1.0, atol=0.05)
    # no code ever changed: the data only bound the noise from above (at 0.2 LSB, 1 % of the codes would flip)
    assert np.all(np.isfinite(fit.noise)) and np.all(fit.noise < 0.2)


def test_merge_adds_counts_and_refuses_other_specs() -> None:
    a, b = identity_model(n=3), identity_model(n=4)
    b.model.chip_id = "chip-b"
    with pytest.raises(ArtifactError, match="2 chips .*--allow-mixed-chips"):
        MacErrorModel.merge([a, b])
    m = MacErrorModel.merge([a, b], allow_mixed_chips=True)
    np.testing.assert_array_equal(m.counts, a.counts + b.counts)
    assert m.model.chip_id == "chip-a+chip-b"
    assert m.meta["provenance"]["chip_ids"] == ["chip-a", "chip-b"]
    assert m.model.conditions == {"vdd_mv": 800}
    other = identity_model(MacroSpec(rows=48, cols=8))
    with pytest.raises(ArtifactError, match="rows: model 0 32 vs model 1 48"):
        MacErrorModel.merge([a, other])
    with pytest.raises(ConfigError):
        MacErrorModel.merge([])


def test_files_round_trip_without_pickle(tmp_path: Path) -> None:
    m = identity_model()
    path = m.save(tmp_path / "dmacem.npz")
    with np.load(path, allow_pickle=False) as raw:
        assert raw["counts"].dtype.kind == "i" and raw["counts"].shape == (32, 17, 32)
    back = MacErrorModel.load(path)
    np.testing.assert_array_equal(back.counts, m.counts)
    assert back.spec == SPEC and back.model.chip_id == "chip-a"
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ArtifactError):
        MacErrorModel.load(tmp_path / "bad.npz")


def test_sampling_follows_the_measured_distribution() -> None:
    counts = np.zeros((SPEC.physical_cols, SPEC.n_levels, SPEC.n_codes), dtype=np.int64)
    s = np.arange(SPEC.n_levels)
    counts[:, s, s] = 3
    counts[:, s[1:], s[1:] - 1] = 1  # P(code = s - 1 | s) = 1/4 above level 0
    m = MacErrorModel.from_counts(SPEC, counts)
    rng = np.random.default_rng(0)
    levels = np.full((20000, SPEC.n_slices, SPEC.cols), 9)
    codes = m.sample(levels, rng)
    assert codes.shape == levels.shape
    assert set(np.unique(codes)) == {8, 9}
    assert np.mean(codes == 8) == pytest.approx(0.25, abs=0.01)
    flat = m.sample(np.zeros((5, SPEC.physical_cols), dtype=np.int64), rng)
    assert (flat == 0).all()
    with pytest.raises(ShapeError, match="last axes"):
        m.sample(np.zeros((5, 7), dtype=np.int64), rng)


def test_coarse_adc_line_fit_is_near_ideal() -> None:
    spec = MacroSpec(rows=64, cols=2, rows_per_conversion=64, adc_bits=5, adc_full_scale=62)  # 2 levels per code
    m = identity_model(spec)
    fit = m.gain_offset(pooled=True)
    assert fit.gain[0] == pytest.approx(1.0, abs=0.02)
    assert fit.offset[0] == pytest.approx(0.0, abs=0.3)

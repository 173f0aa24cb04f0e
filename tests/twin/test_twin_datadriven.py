"""Data-driven twin: characterizing it gives back the error model it was built from, within sampling error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cimlab import chip_sim
from cimlab.chip_sim.controller import TwinController
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError


def _characterize(twin: TwinController, vectors: int, seed: int) -> ErrorModel:
    """Random weights and inputs through MAC_RAW; counts of (column, ideal level, code)."""
    spec = twin.spec
    rng = np.random.default_rng(seed)
    model = ErrorModel.empty(spec, chip_id=twin.identity().chip_id)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    twin.write_weights(0, w)
    for _ in range(vectors // 50):
        # sparse-to-dense inputs so low and high levels are both visited
        density = rng.uniform(0.1, 0.9)
        x = (rng.random((50, spec.rows)) < density) * rng.integers(0, spec.input_max + 1, (50, spec.rows))
        x = x.astype(spec.input_dtype)
        codes, _ = twin.mac_raw(0, x)
        model.add(spec.ideal_levels(x, w), codes)
    return model


def test_round_trip_within_sampling_error(tmp_path: Path) -> None:
    source = chip_sim.make_twin("default", 0, {"noise_sigma_lsb": "0.4"})
    measured = _characterize(source, 200, seed=1)
    path = measured.save(tmp_path / "chip.npz")

    twin = chip_sim.make_twin("default", 9, {"error_model": str(path)})
    again = _characterize(twin, 300, seed=2)

    p = measured.probabilities()
    obs = again.counts.astype(np.float64)
    n_row = obs.sum(axis=2, keepdims=True)
    expected = n_row * p
    # a data-driven twin never reads a code its model never saw for that (column, level)
    assert not np.any((p == 0) & (obs > 0))
    # Pearson chi-square over well-populated cells against its expectation sum(1 - p)
    cells = expected >= 5
    chi2 = float((((obs - expected) ** 2)[cells] / expected[cells]).sum())
    mean = float((1 - p)[cells].sum())
    assert cells.sum() > 500
    assert abs(chi2 - mean) < 6 * np.sqrt(2 * mean), (chi2, mean)
    # and the error statistics a user would look at agree: P(code != ideal code) per level
    busy = again.counts.sum(axis=(0, 2)) > 20000
    np.testing.assert_allclose(_wrong_rate(again)[busy], _wrong_rate(measured)[busy], atol=0.01)
    assert _wrong_rate(measured)[busy].max() > 0.01


def _wrong_rate(model: ErrorModel) -> np.ndarray:
    """Per level, the fraction of conversions (all columns) that read another code than the ideal one."""
    spec = model.spec
    ideal = spec.ideal_codes(np.arange(spec.n_levels))
    c = model.counts.sum(axis=0)
    return 1 - c[np.arange(spec.n_levels), ideal] / np.maximum(c.sum(axis=1), 1)


def test_data_driven_twin_reports_its_identity_and_tracks_x_at_w(tmp_path: Path) -> None:
    source = chip_sim.make_twin("default", 0)
    path = _characterize(source, 100, seed=3).save(tmp_path / "chip.npz")
    twin = chip_sim.make_twin("default", 0, {"error_model": str(path)})
    assert twin.profile.error_model == str(path.resolve())
    spec = twin.spec
    rng = np.random.default_rng(4)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (64, spec.rows)).astype(np.uint8)
    twin.write_weights(0, w)
    y, cost = twin.mac(0, x)
    ref = x.astype(np.int64) @ w
    assert np.corrcoef(y.ravel(), ref.ravel())[0, 1] > 0.99
    assert cost.cycles > 0 and cost.energy_fj > 0


def test_model_of_another_macro_is_refused(tmp_path: Path) -> None:
    source = chip_sim.make_twin("default", 0, {"rows": "64"})
    path = _characterize(source, 50, seed=5).save(tmp_path / "small.npz")
    with pytest.raises(ConfigError, match="rows: model 64 vs profile 256"):
        chip_sim.make_twin("default", 0, {"error_model": str(path)})
    assert chip_sim.make_twin("default", 0, {"rows": "64", "error_model": str(path)}).spec.rows == 64


def test_missing_model_file_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="absent.npz"):
        chip_sim.make_twin("default", 0, {"error_model": str(tmp_path / "absent.npz")})

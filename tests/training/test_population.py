"""One network for many chips: the per-output deploy-time correction and population training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from training_helpers import SMALL_TWOS, noisy_model, train_population_twice

from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.training.layers import CIMLinear, calibrate_columns, cim_layers, clear_columns, convert
from cimlab.training.loop import TrainConfig, fit
from cimlab.training.macro import ColumnCorrection
from cimlab.training.models import digits_mlp
from cimlab.training.tasks import load_task
from cimlab.training.transfer import Transfer


def test_column_fit_recovers_a_known_line_per_column() -> None:
    gen = torch.Generator().manual_seed(0)
    ideal = torch.randint(-500, 500, (200, 3), generator=gen).double()
    gain = torch.tensor([0.9, 1.0, 1.2], dtype=torch.float64)
    offset = torch.tensor([-40.0, 0.0, 13.5], dtype=torch.float64)
    fit = ColumnCorrection.fit(ideal * gain + offset, ideal)
    assert torch.allclose(fit.gain, gain) and torch.allclose(fit.offset, offset)
    assert torch.allclose(fit.apply(ideal * gain + offset), ideal)


def test_column_fit_of_a_constant_column_keeps_gain_one() -> None:
    ideal = torch.zeros(10, 2, dtype=torch.float64)
    fit = ColumnCorrection.fit(ideal + torch.tensor([3.0, -2.0]), ideal)
    assert fit.gain.tolist() == [1.0, 1.0] and fit.offset.tolist() == [3.0, -2.0]
    with pytest.raises(ShapeError):
        ColumnCorrection.fit(ideal, ideal[:, :1])
    with pytest.raises(ConfigError):
        ColumnCorrection(torch.tensor([0.0]), torch.tensor([1.0]))


def test_calibrated_layer_matches_the_exact_matmul_on_a_chip_with_column_offsets() -> None:
    """A chip whose columns have large offsets and gains but no noise: after the deploy-time step the layer's
    outputs are close to the exact integer product, and far from it before."""
    spec = SMALL_TWOS
    chip = Transfer.from_model(noisy_model(spec, seed=3, noise=0.0, offset=1.5, gain=0.08), pooled=False)
    torch.manual_seed(0)
    layer = CIMLinear(40, 7, spec, transfer=chip)
    x = torch.rand(300, 40)
    with torch.no_grad():
        layer.act.lo.fill_(0.0)
        layer.act.hi.fill_(1.0)
        codes = layer.macro_matrix_inputs(x)
        q, _ = layer.quantized_weights()
        w = torch.round(q).T
        exact = codes.double() @ w.double()
        before = layer.macro.forward_values(codes, w)
        model = nn.Sequential(layer)
        calibrate_columns(model, [x[:150]])
        after = layer.macro.forward_values(codes, w)
    err_before = (before - exact).abs().mean()
    err_after = (after - exact).abs().mean()
    assert err_after < 0.25 * err_before
    clear_columns(model)
    assert layer.macro.correction is None


def test_population_training_with_calibration_is_deterministic_and_ends_on_a_chip_of_the_population() -> None:
    chips, models = train_population_twice(1)
    for model in models:
        layers = list(cim_layers(model))
        assert all(layer.transfer in chips for _, layer in layers)
        assert all(layer.macro.correction is not None for _, layer in layers)
    states = [m.state_dict() for m in models]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_population_of_other_macros_is_refused() -> None:
    from training_helpers import SMALL_ODD

    data = load_task("digits", limit=16)
    model = convert(digits_mlp(hidden=8), SMALL_TWOS, seed=0)
    chips = [Transfer.from_model(noisy_model(SMALL_TWOS, seed=1)), Transfer.from_model(noisy_model(SMALL_ODD))]
    with pytest.raises(ConfigError, match="MacroSpecs"):
        fit(model, data, TrainConfig(epochs=1), population=chips)


def test_trim_fitted_from_a_characterization_recovers_each_columns_gain_and_offset() -> None:
    """The error model is drawn from known per-column gains and offsets (dithered by noise): the trim's line fit
    gives them back."""
    from cimlab.training.transfer import ColumnTrim

    spec = SMALL_TWOS
    rng = np.random.default_rng(1)  # noisy_model's own draws, repeated: gain first, then offset
    gain = 1.0 + 0.05 * rng.standard_normal(spec.physical_cols)
    offset = 0.4 * rng.standard_normal(spec.physical_cols)
    model = noisy_model(spec, seed=1, noise=0.6, offset=0.4, gain=0.05, draws=2000)
    trim = ColumnTrim.from_model(model)
    assert np.allclose(1.0 / trim.scale, gain, atol=0.02)
    assert np.allclose(trim.offset, offset, atol=0.08)

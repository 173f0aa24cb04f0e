"""The per-chip deploy step's batch-norm re-estimation, and training through many placements of a chip's columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from training_helpers import SMALL_TWOS, noisy_model, train_population_twice

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.training.layers import CIMLinear, calibrate_columns, cim_layers
from cimlab.training.loop import TrainConfig, fit
from cimlab.training.tasks import load_task
from cimlab.training.transfer import ColumnDecoder, Transfer, splitmix_uniforms


def _net(chip: Transfer) -> nn.Sequential:
    torch.manual_seed(0)
    first = CIMLinear(40, 6, SMALL_TWOS, transfer=chip)
    with torch.no_grad():
        first.act.lo.fill_(0.0)
        first.act.hi.fill_(1.0)
    return nn.Sequential(first, nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_deploy_step_measures_batch_norm_statistics_on_the_chip() -> None:
    """After the step, each batch norm's running mean and variance are those of its inputs on this chip
    (measured independently by a hook, in eval mode, with the fitted correction in place); stale statistics
    learned elsewhere are gone. With ``batch_norm=False`` they are left as they were."""
    chip = Transfer.from_model(noisy_model(SMALL_TWOS, seed=2, noise=0.3, offset=1.0, gain=0.1), pooled=False)
    x = torch.rand(256, 40, generator=torch.Generator().manual_seed(0))
    model = _net(chip)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.fill_(50.0)
        bn.running_var.fill_(1e4)
    calibrate_columns(model, [x[:128], x[128:]], batch_norm=False)
    assert torch.all(bn.running_mean == 50.0) and torch.all(bn.running_var == 1e4)

    model[0].macro.reseed(1)
    calibrate_columns(model, [x[:128], x[128:]])
    seen: list[torch.Tensor] = []
    handle = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        model[0].macro.reseed(12345)  # other draws than the calibration's: statistics of the chip, not of a draw
        for xb in (x[:128], x[128:]):
            model(xb)
    handle.remove()
    inputs = torch.cat(seen)
    assert torch.all((bn.running_mean - inputs.mean(0)).abs() < 0.2 * inputs.std(0))  # another draw's noise
    assert torch.allclose(bn.running_var, inputs.var(0), rtol=0.25)
    assert bn.momentum == 0.1 and not bn.training  # the model's own settings are put back


def test_permuted_transfer_reads_each_column_from_its_new_place() -> None:
    spec = SMALL_TWOS
    base = Transfer.from_model(noisy_model(spec, seed=4, noise=0.5, offset=0.8), pooled=False)
    base = base.decoded(ColumnDecoder.from_model(noisy_model(spec, seed=4, noise=0.5, offset=0.8, draws=50)))
    order = np.random.default_rng(0).permutation(spec.physical_cols)
    moved = base.permuted(order)
    J, L = spec.physical_cols, spec.n_levels
    levels = torch.arange(L).repeat_interleave(J).reshape(L, J)
    u = splitmix_uniforms(7, torch.arange(L * J, dtype=torch.int64)).reshape(L, J)
    got = moved.codes_from_uniforms(levels, moved.table_index(np.arange(J)), u)
    want = base.codes_from_uniforms(levels, base.table_index(order), u)
    assert torch.equal(got, want)
    assert np.array_equal(moved.mean, base.mean[order])
    assert np.array_equal(moved.decoder.table, base.decoder.table[order])
    assert not np.array_equal(moved.mean, base.mean)
    with pytest.raises(ConfigError, match="permutation"):
        base.permuted(np.zeros(J, dtype=np.int64))


def test_training_through_shuffled_placements_is_deterministic_and_uses_permuted_chips() -> None:
    chips, models = train_population_twice(2, shuffle_columns=True)
    for model in models:
        used = next(layer for _, layer in cim_layers(model)).transfer
        assert used not in chips  # a placement of one of them, not the measured order
        assert any(np.array_equal(np.sort(used.probs, axis=0), np.sort(c.probs, axis=0)) for c in chips)
    states = [m.state_dict() for m in models]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    with pytest.raises(ConfigError, match="population"):
        fit(models[0], load_task("digits", limit=64), TrainConfig(epochs=1), shuffle_columns=True)

"""E-PACT: PACT-style gradients for both bounds, and the bounds move under training (per variant)."""

from __future__ import annotations

import pytest
import torch
from training_helpers import SMALL_TWOS

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.training.layers import calibrate, cim_layers, convert
from cimlab.training.loop import TrainConfig, fit
from cimlab.training.models import digits_mlp
from cimlab.training.quant import InputQuantizer
from cimlab.training.tasks import load_task


def test_bounds_get_gradients_only_from_clipped_inputs() -> None:
    q = InputQuantizer(15, "epact", lo=-1.0, hi=2.0)
    x = torch.tensor([-3.0, -1.0, 0.3, 1.1, 2.0, 5.0], requires_grad=True)
    codes, delta, lo = q(x)
    w = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    ((lo + delta * codes) * w).sum().backward()  # the dequantized value, as the layer's output sees it
    assert q.lo.grad.item() == pytest.approx(1.0 + 2.0)  # x <= lo
    assert q.hi.grad.item() == pytest.approx(16.0 + 32.0)  # x >= hi
    assert x.grad.tolist() == pytest.approx([0.0, 0.0, 4.0, 8.0, 0.0, 0.0])  # straight through inside


def test_codes_are_unsigned_integers_over_the_bounds() -> None:
    q = InputQuantizer(15, "epact", lo=-1.0, hi=2.0)
    codes, delta, lo = q(torch.linspace(-2, 3, 101))
    assert codes.min().item() == 0 and codes.max().item() == 15
    assert torch.equal(codes, codes.round())
    assert delta.item() == pytest.approx(3.0 / 15)
    assert lo.item() == -1.0


@pytest.mark.parametrize(("learn", "lo_moves", "hi_moves"),
                         [("epact", True, True), ("pact", False, True), ("fixed", False, False)])
def test_bounds_move_under_training_as_the_variant_says(learn: str, lo_moves: bool, hi_moves: bool) -> None:
    data = load_task("digits", limit=96)
    torch.manual_seed(0)
    model = convert(digits_mlp(hidden=16), SMALL_TWOS, learn=learn, seed=0)
    calibrate(model, [data.x_train[:64]])
    # tight bounds: many inputs clip at both ends (a signed input would be needed for lo; shift the pixels)
    data.x_train = data.x_train - 0.3
    for _, layer in cim_layers(model):
        with torch.no_grad():
            layer.act.lo.fill_(-0.1)
            layer.act.hi.fill_(0.2)
    before = {n: (layer.act.lo.item(), layer.act.hi.item()) for n, layer in cim_layers(model)}
    fit(model, data, TrainConfig(epochs=2, batch_size=32, lr=2e-2, seed=0), evaluate_each_epoch=False)
    after = {n: (layer.act.lo.item(), layer.act.hi.item()) for n, layer in cim_layers(model)}
    first = next(iter(before))
    assert (after[first][0] != before[first][0]) == lo_moves
    assert (after[first][1] != before[first][1]) == hi_moves
    for n in before:
        assert after[n][1] > after[n][0]


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ConfigError, match="epact"):
        InputQuantizer(15, "lsq")
    with pytest.raises(ConfigError, match="must exceed"):
        InputQuantizer(15, "epact", lo=1.0, hi=1.0)

"""Models on the macro: ResNet20 trains through the error model with bounded chunks; CIFAR-size memory plan."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from training_helpers import noisy_model

from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.training.layers import CIMConv2d, CIMLinear, calibrate, cim_layers, convert
from cimlab.training.macro import DEFAULT_CHUNK_CONVERSIONS
from cimlab.training.models import MODELS, build_model
from cimlab.training.transfer import Transfer

DEFAULT = MacroSpec()


def test_resnet20_forward_and_backward_through_the_error_model_with_bounded_chunks() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20")
    chunk = 1 << 14
    convert(model, DEFAULT, Transfer.from_model(noisy_model(DEFAULT, seed=0, draws=30)), chunk_conversions=chunk)
    layers = dict(cim_layers(model))
    assert len(layers) == 20  # 19 convolutions and the classifier
    x = torch.randn(2, 3, 8, 8)
    calibrate(model, [x])
    model.train()
    loss = F.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    for name, layer in layers.items():
        stats = layer.macro.stats
        assert stats.conversions > 0, name
        assert stats.max_chunk_conversions <= layer.macro.chunk_bound() <= chunk, name
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all(), name
        assert layer.weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["resnet20", "vgg8"])
def test_cifar_models_at_batch_128_keep_every_chunk_within_the_budget(name: str) -> None:
    """Chunks are cut per tile; one vector on one tile is at most a full macro's conversions, far below the
    budget, so every chunk of every layer stays within DEFAULT_CHUNK_CONVERSIONS whatever the batch."""
    model = convert(build_model(name), DEFAULT)
    full_macro = DEFAULT.conversions_per_vector
    assert full_macro <= DEFAULT_CHUNK_CONVERSIONS
    for lname, layer in cim_layers(model):
        assert layer.macro.chunk_bound() <= DEFAULT_CHUNK_CONVERSIONS, lname
    # temporaries of a chunk: a few 4-byte tensors of chunk size (levels, table rows, uniforms, codes, slopes)
    assert 8 * 4 * DEFAULT_CHUNK_CONVERSIONS <= 32 * 2**20


def test_all_models_build_and_convert() -> None:
    shapes = {"digits_mlp": (2, 1, 8, 8), "digits_cnn": (2, 1, 8, 8), "har_cnn": (2, 9, 128),
              "resnet20": (2, 3, 8, 8), "vgg8": (2, 3, 8, 8)}
    for name in MODELS:
        torch.manual_seed(0)
        model = build_model(name, width=4) if name in ("digits_cnn", "har_cnn") else build_model(name)
        x = torch.randn(*shapes[name])
        ref = model.eval()(x)
        convert(model, DEFAULT)
        calibrate(model, [x])
        out = model(x)
        assert out.shape == ref.shape
        assert any(True for _ in cim_layers(model))


def test_convert_keeps_weights_and_refuses_what_the_macro_cannot_do() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    w = net[0].weight.detach().clone()
    convert(net, DEFAULT, exclude=["2"])
    assert isinstance(net[0], CIMConv2d) and torch.equal(net[0].weight.detach(), w)
    assert isinstance(net[2], torch.nn.Linear) and not isinstance(net[2], CIMLinear)
    with pytest.raises(ConfigError, match="groups=1"):
        convert(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2)), DEFAULT)
    with pytest.raises(ConfigError, match="padding_mode"):
        convert(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding_mode="reflect")), DEFAULT)
    with pytest.raises(ConfigError, match="does not have"):
        convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), DEFAULT, exclude=["nope"])
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet56")


def test_wrong_input_shapes_are_shape_errors() -> None:
    lin = CIMLinear(10, 3, DEFAULT)
    with pytest.raises(ShapeError, match=r"\[\.\.\., 10\]"):
        lin(torch.zeros(2, 9))
    conv = CIMConv2d(3, 4, 3, DEFAULT)
    with pytest.raises(ShapeError, match="3 channels"):
        conv(torch.zeros(1, 2, 5, 5))
    with pytest.raises(ShapeError, match="smaller than the kernel"):
        conv(torch.zeros(1, 3, 2, 2))


def test_a_transfer_for_another_macro_is_refused() -> None:
    other = MacroSpec(rows=64, cols=16)
    lin = CIMLinear(10, 3, DEFAULT)
    with pytest.raises(ConfigError, match="MacroSpec"):
        lin.set_transfer(Transfer.ideal(other))
    with pytest.raises(ConfigError, match="MacroSpec"):
        convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), DEFAULT, Transfer.ideal(other))

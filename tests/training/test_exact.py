"""Bit-exact agreement of the CIM layers with the twin's ideal MAC, tile by tile, on random layers and macros.

The layer reports the codes it drives, the weights it programs and the MAC outputs it computed
(``macro_operands``); the twin (profile ``ideal`` with the spec's fields as overrides) gets the same tiles through
the driver, and its MAC outputs, tiles of one column range added, must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import SMALL_LOSSY, SMALL_ODD, SMALL_TWOS, ideal_model, sim_url

from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.driver import Chip
from cimlab.training.layers import CIMConv1d, CIMConv2d, CIMLayer, CIMLinear, MacroOperands
from cimlab.training.transfer import Transfer

DEFAULT = MacroSpec()


def chip_mac(chip: Chip, ops: MacroOperands) -> np.ndarray:
    """The layer's MAC outputs as the chip computes them: program each tile (a paired tile's pairs on its two
    columns), drive its rows, add the tiles (a pair's second column subtracted)."""
    spec = chip.spec
    lm = ops.layer_map
    total = np.zeros_like(ops.mac)
    rng = np.random.default_rng(7)
    for t in lm.tiles:
        # the rest of the macro holds other weights: they must not matter (their rows see input 0)
        macro_w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
        rows = slice(t.macro_row, t.macro_row + t.n_rows)
        cols = slice(t.macro_col, t.macro_col + t.macro_cols)
        macro_w[rows, cols] = t.split_pairs(t.weights(ops.weights))  # a paired tile: max(w, 0), max(-w, 0)
        assert chip.write_weights(macro_w) == []
        y = chip.mac(t.inputs(ops.inputs), row_start=t.macro_row)
        total[:, t.col0 : t.col1] += t.join_pairs(y[:, cols])
    return total


def randomize(layer: CIMLayer, x: torch.Tensor, seed: int) -> None:
    """Random weights and E-PACT bounds that put codes over the whole range (some clipped at both ends)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        lo, hi = float(x.quantile(0.05)), float(x.quantile(0.95))
        layer.act.lo.fill_(lo)
        layer.act.hi.fill_(hi)


@pytest.mark.parametrize("spec", [SMALL_LOSSY, SMALL_ODD, SMALL_TWOS],
                         ids=["offset-clipping", "unsigned-odd", "twos"])
def test_linear_layers_larger_than_the_macro_match_the_twin(spec: MacroSpec) -> None:
    rng = np.random.default_rng(spec.rows)
    with Chip.open(sim_url(spec)) as chip:
        assert chip.spec == spec
        for trial in range(3):
            k = int(rng.integers(spec.rows + 1, 3 * spec.rows))
            m = int(rng.integers(spec.cols + 1, 3 * spec.cols))
            layer = CIMLinear(k, m, spec)
            x = torch.from_numpy(rng.standard_normal((int(rng.integers(1, 9)), k)).astype(np.float32))
            randomize(layer, x, trial)
            ops = layer.macro_operands(x)
            assert len(ops.layer_map.tiles) >= 4
            assert ops.inputs.min() == 0 and ops.inputs.max() == spec.input_max
            assert np.array_equal(ops.mac, chip_mac(chip, ops))
            assert np.array_equal(ops.mac, ops.layer_map.ideal_mac(ops.inputs, ops.weights))


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "per-column"])
def test_sampling_path_with_an_ideal_error_model_matches_the_twin(pooled: bool) -> None:
    """A measured transfer whose table is the ideal ADC goes through the sampler and must still be exact."""
    spec = SMALL_TWOS
    rng = np.random.default_rng(3)
    with Chip.open(sim_url(spec)) as chip:
        layer = CIMLinear(75, 19, spec, transfer=Transfer.from_model(ideal_model(spec), pooled=pooled))
        assert not layer.macro.fast_exact
        x = torch.from_numpy(rng.standard_normal((6, 75)).astype(np.float32))
        randomize(layer, x, 1)
        ops = layer.macro_operands(x)
        assert np.array_equal(ops.mac, chip_mac(chip, ops))


def test_conv2d_layer_matches_the_twin_and_the_quantized_convolution() -> None:
    spec = DEFAULT
    rng = np.random.default_rng(4)
    layer = CIMConv2d(30, 70, 3, spec, padding=1, stride=2)  # K = 270 rows > 256, 70 columns > 64
    x = torch.from_numpy(rng.standard_normal((2, 30, 5, 5)).astype(np.float32))
    randomize(layer, x, 2)
    ops = layer.macro_operands(x)
    assert ops.inputs.shape == (2 * 3 * 3, 270)
    with Chip.open(sim_url(spec)) as chip:
        assert np.array_equal(ops.mac, chip_mac(chip, ops))
    # the float output is the convolution of the quantized input (lo + delta * code, zero padding quantized
    # like any activation) with the quantized weights (scale * q)
    with torch.no_grad():
        y = layer(x).double()
        q, scale = layer.quantized_weights()
        wq = (q * scale[:, None]).reshape(layer.weight.shape).double()
        codes, delta, lo = layer.act(torch.nn.functional.pad(x, (1, 1, 1, 1)))
        xq = (lo + delta * codes).double()
        ref = torch.nn.functional.conv2d(xq, wq, stride=2)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_conv2d_decomposed_path_equals_its_fast_path() -> None:
    """Under the ideal lossless ADC the layer takes a plain convolution; the conversion path must agree."""
    spec = SMALL_TWOS
    rng = np.random.default_rng(5)
    layer = CIMConv2d(5, 11, 3, spec, padding=1)
    x = torch.from_numpy(rng.standard_normal((2, 5, 4, 4)).astype(np.float32))
    randomize(layer, x, 3)
    assert layer.macro.fast_exact
    with torch.no_grad():
        fast = layer(x)
        layer.set_transfer(Transfer.from_model(ideal_model(spec)))
        slow = layer(x)
    assert torch.equal(fast, slow)


def test_conv1d_layer_matches_the_twin() -> None:
    spec = SMALL_LOSSY
    rng = np.random.default_rng(6)
    layer = CIMConv1d(9, 8, 5, spec, padding=2)  # K = 45 rows > 40
    x = torch.from_numpy(rng.standard_normal((2, 9, 7)).astype(np.float32))
    randomize(layer, x, 4)
    ops = layer.macro_operands(x)
    assert ops.inputs.shape == (2 * 7, 45)
    with Chip.open(sim_url(spec)) as chip:
        assert np.array_equal(ops.mac, chip_mac(chip, ops))


def test_tiles_placed_anywhere_on_the_macro_match_the_twin() -> None:
    """Placement is part of the definition: rows off a group boundary share conversions with idle rows, columns
    off 0 use other physical columns. Two tiles share one page here."""
    from cimlab.mapping import LayerMap, Tile
    from cimlab.training.macro import LayerMacro

    spec = SMALL_LOSSY  # 40 rows, 8 rows per conversion, 6 columns
    lm = LayerMap(spec, 30, 5, (Tile(0, 13, 0, 5, macro_row=5, macro_col=1, page=0),
                                Tile(13, 30, 0, 2, macro_row=21, macro_col=0, page=0),
                                Tile(13, 30, 2, 5, macro_row=3, macro_col=2, page=1)))
    rng = np.random.default_rng(8)
    x = rng.integers(0, spec.input_max + 1, (4, 30))
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (30, 5))
    for transfer in (Transfer.ideal(spec), Transfer.from_model(ideal_model(spec), pooled=False)):
        mac = LayerMacro(lm, transfer).forward_values(torch.tensor(x, dtype=torch.float32),
                                                      torch.tensor(w, dtype=torch.float32))
        ops = MacroOperands(x, w, mac.to(torch.int64).numpy(), lm)
        with Chip.open(sim_url(spec)) as chip:
            assert np.array_equal(ops.mac, chip_mac(chip, ops))
        assert np.array_equal(ops.mac, lm.ideal_mac(x, w))

"""Training for NVM crossbars: the macro model computes differential digits and column pairs as the twin does, a
unipolar layer never holds a weight of the wrong sign after ``cimlab train``, a unipolar macro stores magnitudes and
pairs (never a digital zero point), uniform ranges are one range for every layer, and compile places every layer by
its polarity so the chip's logits equal the host's on an ideal NVM twin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cimlab.chip_sim.profiles import load_profile
from cimlab.deploy.bench import bench_package, chip_ideal_equal
from cimlab.deploy.compile import compile_checkpoint
from cimlab.deploy.package import DeployPackage
from cimlab.driver import Chip
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import LayerMap, map_layer, map_paired_layer
from cimlab.training.api import model_from_checkpoint, train_run
from cimlab.training.checkpoint import load_checkpoint
from cimlab.training.layers import cim_layers
from cimlab.training.loop import TrainConfig
from cimlab.training.macro import LayerMacro, macro_matmul
from cimlab.training.tasks import load_task
from cimlab.training.transfer import Transfer

DIFF = MacroSpec(rows=24, cols=6, weight_bits=4, weight_storage="differential", cell_bits=2, input_bits=3,
                 rows_per_conversion=8, adc_bits=5, adc_full_scale=31)
"""Two arrays of 2-bit cells, 4-bit magnitudes (two cells a side), an ADC that resolves every level (8 x 3 = 24)."""
DIFF_CLIP = DIFF.replace(adc_bits=3, adc_full_scale=14)
"""The same with a 3-bit ADC of 2 levels a code that clips above 14: the conversions are not a plain product."""
UNI = MacroSpec(rows=24, cols=6, weight_bits=2, weight_storage="unsigned", cell_bits=1, input_bits=3,
                rows_per_conversion=8, adc_bits=4, adc_full_scale=15)
"""A unipolar array of 1-bit cells, 2-bit magnitudes (two cells), a lossless ADC."""
NVM2 = load_profile("nvm-2bit").spec


def ideal_twin(spec: MacroSpec) -> str:
    """The ideal twin (no analog or device errors) of this macro."""
    return "sim://?profile=ideal&" + "&".join(f"{k}={v}" for k, v in spec.to_dict().items())


def ideal_table(spec: MacroSpec) -> ErrorModel:
    """An error model whose every (column, level) reads the ideal code: the sampling path, exactly."""
    counts = np.zeros((spec.physical_cols, spec.n_levels, spec.n_codes), dtype=np.int64)
    counts[:, np.arange(spec.n_levels), spec.ideal_codes(np.arange(spec.n_levels))] = 10
    return ErrorModel(spec, counts, chip_id="ideal-table")


def twin_mac(chip: Chip, lm: LayerMap, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The layer's MACs on the twin: each tile programmed (a pair as max(w, 0), max(-w, 0)), driven, read, added."""
    spec = chip.spec
    out = np.zeros((x.shape[0], lm.n_cols), dtype=np.int64)
    for t in lm.tiles:
        image = np.zeros((spec.rows, spec.cols), dtype=np.int64)
        cols = slice(t.macro_col, t.macro_col + t.macro_cols)
        image[t.macro_row : t.macro_row + t.n_rows, cols] = t.split_pairs(t.weights(w))
        assert chip.write_weights(image) == []
        out[:, t.col0 : t.col1] += t.join_pairs(chip.mac(t.inputs(x), row_start=t.macro_row)[:, cols])
    return out


@pytest.mark.parametrize(("spec", "paired", "transfer"), [
    (DIFF, False, "table"), (DIFF_CLIP, False, "ideal"), (DIFF_CLIP, False, "table"),
    (UNI, True, "table"), (UNI.replace(adc_bits=2, adc_full_scale=6), True, "ideal"),
], ids=["differential-sampled", "differential-clipping", "differential-clipping-sampled", "pairs-sampled",
        "pairs-clipping"])
def test_the_macro_model_computes_differential_digits_and_column_pairs_as_the_twin(
        spec: MacroSpec, paired: bool, transfer: str) -> None:
    rng = np.random.default_rng(spec.adc_bits)
    k, m = 53, 9  # several tiles each way
    lm = (map_paired_layer if paired else map_layer)(spec, k, m)
    tr = Transfer.from_model(ideal_table(spec)) if transfer == "table" else Transfer.ideal(spec)
    macro = LayerMacro(lm, tr, chunk_conversions=300)
    assert not macro.fast_exact
    top = spec.weight_max
    w = rng.integers(-top, top + 1, (k, m))
    x = rng.integers(0, spec.input_max + 1, (7, k))
    got = macro.mac_values(torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32))
    reference = lm.ideal_mac(x, w)  # numpy: MacroSpec's digits, levels, codes and recombination
    np.testing.assert_array_equal(got.numpy().astype(np.int64), reference)
    with Chip.open(ideal_twin(spec)) as chip:
        np.testing.assert_array_equal(twin_mac(chip, lm, x, w), reference)
    if spec.adc_full_scale >= spec.s_max:  # an ADC that loses nothing: the plain product
        np.testing.assert_array_equal(reference, x @ w)


@pytest.mark.parametrize(("spec", "paired"), [(DIFF, False), (UNI, True)], ids=["differential", "pairs"])
def test_through_a_lossless_adc_the_gradients_are_the_plain_straight_through_ones(spec: MacroSpec,
                                                                                  paired: bool) -> None:
    """Slope 1 everywhere: an output's gradient reaches its pair's columns with opposite signs and comes back as
    ``x^T g``; the inputs get ``g W^T``."""
    rng = np.random.default_rng(5)
    lm = (map_paired_layer if paired else map_layer)(spec, 40, 7)
    macro = LayerMacro(lm, Transfer.from_model(ideal_table(spec)), chunk_conversions=500)
    x = torch.tensor(rng.integers(0, 3, (4, 40)), dtype=torch.float32, requires_grad=True)
    q = torch.tensor(rng.integers(-spec.weight_max, spec.weight_max + 1, (40, 7)), dtype=torch.float32,
                     requires_grad=True)
    g = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    macro_matmul(x, q, macro).backward(g)
    assert torch.allclose(x.grad, g @ q.detach().T, atol=1e-4)
    assert torch.allclose(q.grad, x.detach().T @ g, atol=1e-4)


def _train(tmp_path: Path, name: str, **kwargs: object) -> tuple[dict, Path]:
    out = tmp_path / f"{name}.safetensors"
    res = train_run("digits", kwargs.pop("mode", "quant"), out, model_name="digits_mlp",  # type: ignore[arg-type]
                    cfg=TrainConfig(epochs=1, max_steps=int(kwargs.pop("steps", 12)), lr=1e-2), draws=1, limit=300,
                    **kwargs)  # type: ignore[arg-type]
    return res, out


@pytest.mark.parametrize("polarity", ["unipolar-pos", "unipolar-neg"])
def test_cimlab_train_leaves_no_weight_of_the_wrong_sign_and_a_unipolar_macro_stores_magnitudes(
        tmp_path: Path, polarity: str) -> None:
    res, out = _train(tmp_path, polarity, profile="nvm-2bit", polarity=polarity)
    assert set(res["polarity"].values()) == {polarity}
    model = model_from_checkpoint(load_checkpoint(out))
    sign = 1.0 if polarity == "unipolar-pos" else -1.0
    for name, layer in cim_layers(model):
        w = layer.weight.detach() * sign
        assert int((w < 0).sum()) == 0 and int((w > 0).sum()) > 0, name  # trained, and never of the other sign
    pkg = compile_checkpoint(out)
    for name, lp in pkg.layers.items():
        assert lp.weights.min() >= 0 and lp.weights.max() <= NVM2.weight_max  # magnitudes on one array
        assert lp.weights.max() > 0 and (np.sign(lp.scale) == sign).all(), name  # unipolar-neg: scale negated
        assert lp.polarity == polarity
        assert not any(t.paired for t in pkg.schedule.layer_map(name).tiles)


def test_compile_puts_bipolar_layers_on_pairs_and_the_chip_equals_the_host_on_an_ideal_nvm_twin(
        tmp_path: Path) -> None:
    from cimlab.training.api import prepare_model
    from cimlab.training.checkpoint import save_checkpoint

    data = load_task("digits", limit=96)
    net, info = prepare_model(data, "quant", model_name="digits_mlp", spec=NVM2,
                              polarity={"1": "unipolar-pos", "4": "bipolar"})
    ckpt = save_checkpoint(tmp_path / "mixed.safetensors", net.eval(),
                           {"task": "digits", "model": info, "mode": "quant", "spec": NVM2.to_dict()})
    compile_checkpoint(ckpt).save(tmp_path / "mixed.npz")
    pkg = DeployPackage.load(tmp_path / "mixed.npz")
    first, last = pkg.schedule.layer_map("1"), pkg.schedule.layer_map("4")
    assert not any(t.paired for t in first.tiles) and all(t.paired for t in last.tiles)
    assert pkg.layers["4"].weights.min() < 0 < pkg.layers["4"].weights.max()  # both signs, on column pairs
    for t in last.tiles:  # a pair never split: both columns of every output on the tile's page and rows
        assert t.macro_col + t.macro_cols <= NVM2.cols and t.n_cols <= NVM2.cols // 2
    with Chip.open(ideal_twin(NVM2)) as chip:
        r = bench_package(pkg, chip, data.x_test, data.y_test, draws=0)
    assert chip_ideal_equal(r) and r["weight_mismatches"] == 0


def test_a_differential_macro_takes_both_signs_on_its_second_array(tmp_path: Path) -> None:
    from cimlab.training.api import prepare_model
    from cimlab.training.checkpoint import save_checkpoint

    spec = load_profile("nvm-4bit").spec.replace(weight_storage="differential")
    data = load_task("digits", limit=64)
    net, info = prepare_model(data, "quant", model_name="digits_mlp", spec=spec)
    ckpt = save_checkpoint(tmp_path / "diff.safetensors", net.eval(),
                           {"task": "digits", "model": info, "mode": "quant", "spec": spec.to_dict()})
    pkg = compile_checkpoint(ckpt)
    assert not any(t.paired for _, lm in pkg.schedule.layers for t in lm.tiles)
    w = pkg.layers["1"].weights
    assert w.min() == -(2**spec.weight_bits - 1) or w.max() == 2**spec.weight_bits - 1  # range 2**wb - 1 a side
    pkg.save(tmp_path / "diff.npz")
    with Chip.open(ideal_twin(spec)) as chip:
        r = bench_package(DeployPackage.load(tmp_path / "diff.npz"), chip, data.x_test, data.y_test, draws=0)
    assert chip_ideal_equal(r)


@pytest.mark.parametrize("learn", ["epact", "fixed"])
def test_uniform_ranges_are_one_weight_and_one_input_range_for_every_layer(tmp_path: Path, learn: str) -> None:
    res, out = _train(tmp_path, f"uniform-{learn}", profile="nvm-4bit", quant="uniform", learn=learn)
    assert res["quant"] == "uniform"
    ck = load_checkpoint(out)
    model = model_from_checkpoint(ck)
    layers = [layer for _, layer in cim_layers(model)]
    assert len(layers) == 2 and layers[0].act is layers[1].act  # one input quantizer
    scales = torch.cat([layer.quantized_weights()[1] for layer in layers])
    assert torch.allclose(scales, scales[0].expand_as(scales))  # one weight step for every layer and channel
    from cimlab.training.api import prepare_model

    start, _ = prepare_model(load_task("digits", limit=300), "quant", model_name="digits_mlp",
                             spec=load_profile("nvm-4bit").spec, quant="uniform", learn=learn)
    w0 = [np.quantile(layer.weight.detach().abs().numpy(), 0.99) for _, layer in cim_layers(start)]
    start_range = float(start.get_submodule("1").ranges.w_max.detach())
    assert min(w0) < start_range < max(w0)  # the 99th percentile of |w| over both layers, weighted equally
    learned = float(ck.tensors["1.ranges.w_max"])
    assert (learned == start_range) == (learn == "fixed")  # learned (LSQ) or fixed
    pkg = compile_checkpoint(out)
    assert pkg.manifest["quant"] == "uniform"
    assert len({(lp.lo, lp.hi) for lp in pkg.layers.values()}) == 1


def test_the_polarity_search_runs_before_quant_training_and_is_honoured(tmp_path: Path) -> None:
    _, flt = _train(tmp_path, "float", mode="float", steps=30)
    res, out = _train(tmp_path, "searched", profile="nvm-2bit", init=flt, polarity="search",
                      search={"generations": 1, "offspring": 2, "steps": 5})
    ps = res["polarity_search"]
    assert ps["assignment"] == res["polarity"] and 2 <= ps["evaluations"] <= 4
    ck = load_checkpoint(out)
    assert ck.manifest["polarity"] == res["polarity"]
    pkg = compile_checkpoint(out)
    for name, lm in pkg.schedule.layers:
        assert all(t.paired == (res["polarity"][name] == "bipolar") for t in lm.tiles)
    with pytest.raises(ConfigError, match="--init"):
        _train(tmp_path, "no-init", profile="nvm-2bit", polarity="search")
    with pytest.raises(ConfigError, match="--mode quant"):
        _train(tmp_path, "float-search", mode="float", polarity="unipolar-pos")

"""Per-chip column placement (``cimlab compile --place-on``): the scores, the order, the package, and the chip path
on a data-driven twin whose columns are half perfect, half noisy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import DEFAULT_SPEC, digits

from cimlab.deploy.bench import bench_package, chip_ideal_equal
from cimlab.deploy.compile import compile_checkpoint
from cimlab.deploy.package import DeployPackage
from cimlab.deploy.placement import column_scores, decoded_error, quiet_column_order
from cimlab.deploy.program import locate
from cimlab.deploy.schedule import Schedule, plan
from cimlab.driver import Chip
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.training.api import prepare_model
from cimlab.training.checkpoint import save_checkpoint
from cimlab.training.loop import TrainConfig, fit

SPEC = DEFAULT_SPEC
PERFECT_FROM = 40
"""Macro columns PERFECT_FROM.. of the synthetic die read the ideal code always; the others are noisy."""


def split_die(path: Path) -> Path:
    """A die whose macro columns < PERFECT_FROM read the ideal code +-1 half of the time (every slice) and the rest
    read it exactly."""
    J, L, C = SPEC.physical_cols, SPEC.n_levels, SPEC.n_codes
    ideal = SPEC.ideal_codes(np.arange(L))
    counts = np.zeros((J, L, C), dtype=np.int64)
    for j in range(J):
        spread = ((-1, 25), (0, 50), (1, 25)) if j % SPEC.cols < PERFECT_FROM else ((0, 100),)
        for s in range(L):
            for dc, n in spread:
                counts[j, s, int(np.clip(ideal[s] + dc, 0, SPEC.adc_max))] += n
    ErrorModel(SPEC, counts, chip_id="split", provenance={"made_by": "tests/deploy/test_placement"}).save(path)
    return path


@pytest.fixture(scope="module")
def die(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return split_die(tmp_path_factory.mktemp("die") / "split.npz")


@pytest.fixture(scope="module")
def narrow_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits MLP with 16 hidden units: its layers use macro columns 0..15 at training's placement."""
    data = digits()
    net, info = prepare_model(data, "quant", model_name="digits_mlp", model_kwargs={"hidden": 16}, spec=SPEC, seed=0)
    fit(net, data, TrainConfig(epochs=100, max_steps=40, seed=0), evaluate_each_epoch=False)
    net.eval()
    return save_checkpoint(tmp_path_factory.mktemp("narrow") / "mlp16.safetensors", net,
                           {"task": "digits", "model": info, "mode": "quant", "spec": SPEC.to_dict(),
                            "quantizer": "epact"})


def test_decoded_error_matches_a_direct_sum(die: Path) -> None:
    """The table decoder's squared error per column, against a loop over levels and codes: E[s | code] in
    ideal-code units, squared distance to s / adc_lsb, weighted by P(code | s), averaged over the levels."""
    model = ErrorModel.load(die)
    err = decoded_error(model)
    lsb = SPEC.adc_lsb
    for j in (0, SPEC.cols + 3, PERFECT_FROM, SPEC.physical_cols - 1):
        p = model.counts[j].astype(float)
        p /= p.sum(axis=1, keepdims=True)
        value = {c: sum(s * p[s, c] for s in range(SPEC.n_levels)) / p[:, c].sum() / lsb
                 for c in range(SPEC.n_codes) if p[:, c].sum() > 0}
        want = np.mean([sum(p[s, c] * (value[c] - s / lsb) ** 2 for c in value) for s in range(SPEC.n_levels)])
        assert err[j] == pytest.approx(want, rel=1e-9)
    scores = column_scores(SPEC, err)
    assert scores[:PERFECT_FROM].min() > scores[PERFECT_FROM:].max()


def test_the_busiest_logical_columns_go_to_the_best_chip_columns() -> None:
    sched = plan(SPEC, [("a", 64, 20), ("b", 20, 10)])  # columns 0..9 used by both layers, 10..19 by one
    scores = np.arange(SPEC.cols, dtype=float)[::-1].copy()  # the last chip column is the best
    order = quiet_column_order(sched, scores)
    assert sorted(order.tolist()) == list(range(SPEC.cols))
    assert set(order[:10].tolist()) == set(range(SPEC.cols - 10, SPEC.cols))  # used twice: the 10 best
    assert set(order[10:20].tolist()) == set(range(SPEC.cols - 20, SPEC.cols - 10))


def test_a_paired_schedule_moves_whole_pairs() -> None:
    spec = SPEC.replace(weight_storage="unsigned", weight_bits=SPEC.weight_bits - 1)
    sched = plan(spec, [("a", 64, 8)], paired={"a"})
    scores = np.zeros(spec.cols)
    scores[0::2] = 5.0  # every pair scores 5 but pair (40, 41), which scores 0
    scores[40] = 0.0
    order = quiet_column_order(sched, scores)
    assert order[0] == 40 and order[1] == 41
    assert np.array_equal(order[1::2], order[0::2] + 1) and (order[0::2] % 2 == 0).all()
    sched.placed_on(order)  # accepted
    bad = order.copy()
    bad[[0, 1]] = bad[[1, 0]]
    with pytest.raises(ConfigError, match="pairs"):
        sched.placed_on(bad)


def test_a_column_order_must_be_a_permutation() -> None:
    sched = plan(SPEC, [("a", 64, 20)])
    with pytest.raises(ConfigError, match="permutation"):
        sched.placed_on([0] * SPEC.cols)
    data = sched.placed_on(np.arange(SPEC.cols)[::-1]).to_dict()
    assert Schedule.from_dict(SPEC, data).column_order == tuple(range(SPEC.cols))[::-1]
    data["column_order"] = list(range(SPEC.cols - 1))
    with pytest.raises(ArtifactError, match="permutation"):
        Schedule.from_dict(SPEC, data)


def test_a_placed_package_holds_its_weights_on_the_chip_columns(narrow_ckpt: Path, die: Path,
                                                                  tmp_path: Path) -> None:
    plain = compile_checkpoint(narrow_ckpt)
    placed = compile_checkpoint(narrow_ckpt, place_on=die)
    placed.save(tmp_path / "placed.npz")
    back = DeployPackage.load(tmp_path / "placed.npz")
    order = back.schedule.chip_columns()
    assert (order[:16] >= PERFECT_FROM).all()  # the used columns land on the perfect ones
    for mine, theirs in zip(back.pages, plain.pages, strict=True):
        assert np.array_equal(mine[:, order], theirs)
    assert back.manifest["placed_on"]["path"] == str(die)
    read = back.pages[0].copy()
    read[5, order[3]] += 1  # layer 'a' (the first), row 5, its column 3
    (m,) = locate(back, 0, read)
    assert (m.macro_row, m.macro_col, m.layer_row, m.layer_col) == (5, int(order[3]), 5, 3)


def test_on_the_die_the_placed_network_computes_the_ideal_macs(narrow_ckpt: Path, die: Path) -> None:
    """The chip path reads each logical column from its chip column: placed on the perfect columns, the chip's
    logits equal the host's ideal ones bit for bit; at training's columns (noisy) they do not, and the host's
    prediction under the die's error model sees the placement as the chip does."""
    data = digits(120)
    url = f"sim://?profile=default&error_model={die}&seed=1"
    results = {}
    for name, place in (("plain", None), ("placed", die)):
        pkg = compile_checkpoint(narrow_ckpt, place_on=place)
        with Chip.open(url) as chip:
            results[name] = bench_package(pkg, chip, data.x_test, data.y_test, draws=2, error_model=die)
    assert chip_ideal_equal(results["placed"]) and not chip_ideal_equal(results["plain"])
    assert results["placed"]["prediction"]["std"] == 0.0
    assert results["placed"]["prediction"]["mean"] == results["placed"]["accuracy_ideal"]
    assert results["plain"]["prediction"]["std"] > 0.0


def test_the_decoded_chip_path_reads_the_placed_columns(narrow_ckpt: Path, die: Path) -> None:
    """With the die's table decoder (``bench --decode``) the chip returns raw codes and the host decodes each chip
    column with its own row: on the perfect columns every code decodes to its level, so the placed network's logits
    are the ideal ones (to float rounding: decoded sums are not rounded); unplaced, the noisy columns show."""
    from cimlab.training.transfer import ColumnDecoder

    data = digits(60)
    url = f"sim://?profile=default&error_model={die}&seed=1"
    decoder = ColumnDecoder.load(die)
    results = {}
    for name, place in (("plain", None), ("placed", die)):
        pkg = compile_checkpoint(narrow_ckpt, place_on=place)
        with Chip.open(url) as chip:
            results[name] = bench_package(pkg, chip, data.x_test, data.y_test, draws=0, trim=decoder)
    for name, close in (("placed", True), ("plain", False)):
        r = results[name]
        assert np.allclose(r["_chip_logits"].numpy(), r["_ideal_logits"].numpy(), rtol=0, atol=1e-4) == close, name

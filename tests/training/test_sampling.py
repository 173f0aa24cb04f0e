"""Error injection: codes follow the error model's distribution, per column or pooled; deterministic by seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_helpers import SMALL_DIFF, SMALL_LOSSY, SMALL_ODD, SMALL_TWOS, noisy_model

from cimlab.mapping import map_layer
from cimlab.training.layers import CIMLinear, convert, reseed
from cimlab.training.loop import TrainConfig, fit
from cimlab.training.macro import LayerMacro, macro_matmul
from cimlab.training.models import digits_mlp
from cimlab.training.tasks import load_task
from cimlab.training.transfer import Transfer, splitmix_uniforms

N_DRAWS = 40_000


def draw(tr: Transfer, level: int, column: int, n: int = N_DRAWS, seed: int = 0) -> np.ndarray:
    """``n`` codes of one (level, column) from the counter-based uniforms training uses."""
    levels = torch.full((n, 1), float(level))
    tables = tr.table_index(np.array([column]))
    u = splitmix_uniforms(seed, torch.arange(n, dtype=torch.int64)).reshape(n, 1)
    return tr.codes_from_uniforms(levels, tables, u).to(torch.int64).numpy()[:, 0]


def splitmix64_reference(seed: int, words: np.ndarray) -> np.ndarray:
    """SplitMix64's outputs ``words`` (0-based) of a generator seeded ``seed``, in numpy uint64 arithmetic (an
    implementation independent of the library's torch and C ones)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (words.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def test_uniforms_are_splitmix64_halves() -> None:
    """The published first outputs of SplitMix64 seeded 0 (Steele et al. 2014; Java's SplittableRandom), each
    64-bit word giving two conversions their 32-bit uniforms, low half first."""
    words = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [int(v) for v in splitmix64_reference(0, np.arange(3))] == words
    u = splitmix_uniforms(0, torch.arange(6, dtype=torch.int64)).numpy().view(np.uint32)
    assert [int(v) for v in u] == [h for w in words for h in (w & 0xFFFFFFFF, w >> 32)]
    seed = 0xDEADBEEF12345678
    k = np.arange(1 << 12)
    want = splitmix64_reference(seed, k >> 1)
    want = np.where(k & 1, want >> np.uint64(32), want & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    assert np.array_equal(splitmix_uniforms(seed, torch.from_numpy(k)).numpy().view(np.uint32), want)


@pytest.mark.parametrize("spec", [SMALL_TWOS, SMALL_ODD], ids=["twos", "unsigned-odd"])
def test_per_column_codes_follow_the_measured_distribution(spec) -> None:  # noqa: ANN001
    model = noisy_model(spec, seed=1, observed=0.7)
    tr = Transfer.from_model(model, pooled=False)
    probs = model.probabilities()  # the file's fallback rule for unmeasured rows
    rng = np.random.default_rng(2)
    for _ in range(4):
        j, s = int(rng.integers(spec.physical_cols)), int(rng.integers(spec.n_levels))
        freq = np.bincount(draw(tr, s, j), minlength=spec.n_codes) / N_DRAWS
        sd = np.sqrt(probs[j, s] * (1 - probs[j, s]) / N_DRAWS)
        assert np.all(np.abs(freq - probs[j, s]) <= 5 * sd + 1e-9), (j, s)


def test_pooled_codes_follow_the_pooled_distribution_and_ignore_the_column() -> None:
    spec = SMALL_TWOS
    model = noisy_model(spec, seed=3)
    tr = Transfer.from_model(model, pooled=True)
    assert tr.layout == "packed"  # small pooled tables: one look-up and one comparison
    pooled = model.counts.sum(axis=0).astype(float)
    pooled /= pooled.sum(axis=1, keepdims=True)
    for s in (0, spec.n_levels // 2, spec.s_max):
        a, b = draw(tr, s, 0), draw(tr, s, spec.physical_cols - 1)
        assert np.array_equal(a, b)
        freq = np.bincount(a, minlength=spec.n_codes) / N_DRAWS
        sd = np.sqrt(pooled[s] * (1 - pooled[s]) / N_DRAWS)
        assert np.all(np.abs(freq - pooled[s]) <= 5 * sd + 1e-9)


def test_gaussian_transfer_matches_mean_and_sigma() -> None:
    spec = SMALL_TWOS
    model = noisy_model(spec, seed=4, noise=0.8, offset=0.0, gain=0.0)
    tr = Transfer.from_model(model, pooled=True, kind="gaussian")
    s = spec.n_levels // 2  # far from the clipping ends
    codes = draw(tr, s, 0).astype(float)
    c = model.counts.sum(axis=0)[s].astype(float)
    mean = (c * np.arange(spec.n_codes)).sum() / c.sum()
    assert codes.mean() == pytest.approx(mean, abs=0.05)
    assert 0.6 < codes.std() < 1.2


def test_sampled_layer_output_is_deterministic_given_the_seed() -> None:
    spec = SMALL_TWOS
    tr = Transfer.from_model(noisy_model(spec, seed=5), pooled=False)
    layer = CIMLinear(50, 9, spec, transfer=tr)
    x = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    outs = []
    for seed in (11, 11, 12):
        layer.macro.reseed(seed)
        with torch.no_grad():
            outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_chunking_does_not_change_the_ideal_result_and_bounds_the_chunk() -> None:
    spec = SMALL_TWOS
    tr = Transfer.from_model(noisy_model(spec, seed=6, noise=0.0, offset=0.0, gain=0.0))  # deterministic codes
    lm = map_layer(spec, 70, 13)
    x = torch.randint(0, spec.input_max + 1, (33, 70)).float()
    q = torch.randint(-8, 8, (70, 13)).float()
    big = LayerMacro(lm, tr, backend="torch")
    small = LayerMacro(lm, tr, chunk_conversions=1000, backend="torch")
    assert torch.equal(macro_matmul(x, q, big), macro_matmul(x, q, small))
    assert max(t.conversions_per_vector(spec) for t in lm.tiles) <= 1000  # a vector fits a chunk here
    assert small.stats.max_chunk_conversions <= small.chunk_bound() <= 1000
    assert small.stats.chunks > big.stats.chunks
    assert small.stats.conversions == 33 * lm.conversions_per_vector()


def test_training_through_the_error_model_is_deterministic_given_the_seed() -> None:
    data = load_task("digits", limit=64)
    tr = Transfer.from_model(noisy_model(SMALL_TWOS, seed=7))
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = convert(digits_mlp(hidden=8), SMALL_TWOS, tr, seed=0)
        reseed(model, 0)
        fit(model, data, TrainConfig(epochs=1, batch_size=16, seed=3), evaluate_each_epoch=False)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("guide_entries", [1 << 22, 1 << 6], ids=["roomy", "tight"])
@pytest.mark.parametrize("spec", [SMALL_TWOS, SMALL_ODD], ids=["twos", "unsigned-odd"])
def test_training_reads_the_twins_code_for_the_same_uniform(monkeypatch: pytest.MonkeyPatch, spec,  # noqa: ANN001
                                                            guide_entries: int) -> None:
    """Training and the data-driven twin sample one table at one precision: for the same 32-bit uniforms the
    transfer's guide-table search (packed or search layout) reads exactly the twin's ``CodeSampler`` code."""
    import cimlab.training.transfer as transfer_mod

    monkeypatch.setattr(transfer_mod, "GUIDE_ENTRIES", guide_entries)
    model = noisy_model(spec, seed=8, noise=0.6 if guide_entries > 1 << 6 else 1.5, observed=0.7)
    tr = Transfer.from_model(model, pooled=False)
    rng = np.random.default_rng(9)
    levels = rng.integers(0, spec.n_levels, (3000, spec.physical_cols))
    bits = rng.integers(0, 2**32, levels.shape, dtype=np.uint32)
    bits[0], bits[1] = 0, 2**32 - 1
    want = model.sampler().sample_bits(levels, bits)
    got = tr.codes_from_uniforms(torch.from_numpy(levels).float(), tr.table_index(np.arange(spec.physical_cols)),
                                 torch.from_numpy(bits.view(np.int32)))
    assert tr.layout == ("packed" if guide_entries > 1 << 6 else "search")
    assert np.array_equal(got.numpy(), want)


def test_evaluation_leaves_the_training_streams_where_they_were() -> None:
    from cimlab.training.loop import accuracy

    spec = SMALL_TWOS
    model = convert(digits_mlp(hidden=8), spec, Transfer.from_model(noisy_model(spec, seed=9)), seed=1)
    data = load_task("digits", limit=32)
    layer = model[1]
    layer.macro.reseed(5)
    expected = np.random.Generator(np.random.PCG64(5)).bit_generator.random_raw(4)
    a = accuracy(model, data.x_test, data.y_test, seed=0)
    assert a == accuracy(model, data.x_test, data.y_test, seed=0)  # evaluation itself is reproducible
    assert np.array_equal(layer.macro.rng.bit_generator.random_raw(4), expected)


@pytest.mark.parametrize("backend", ["c", "torch"])
@pytest.mark.parametrize("spec", [SMALL_TWOS, SMALL_LOSSY, SMALL_ODD, SMALL_DIFF],
                         ids=["twos", "offset-clip", "unsigned-odd", "differential"])
def test_layer_forward_equals_the_twins_sampler_on_numpy_levels(spec, backend: str) -> None:  # noqa: ANN001
    """The layer's forward (C kernel or torch) against an independent numpy computation: ``MacroSpec.ideal_levels``,
    the twin's ``CodeSampler`` on the same 32-bit uniforms (numpy SplitMix64: conversion (i, g, p, c) takes half
    k & 1 of word k >> 1 of the tile's seed, k = ((g P + p) C + c) Ne + i, Ne = n rounded up to 16), and
    ``MacroSpec.recombine``."""
    model = noisy_model(spec, seed=12, noise=0.5)
    tr = Transfer.from_model(model, pooled=False)
    rng = np.random.default_rng(3)
    x = rng.integers(0, spec.input_max + 1, (9, spec.rows))
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    macro = LayerMacro(map_layer(spec, spec.rows, spec.cols), tr, backend=backend)
    macro.reseed(4)
    got = macro.mac_values(torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32))
    assert macro.stats.backend == backend
    seed = int(np.random.Generator(np.random.PCG64(4)).bit_generator.random_raw())  # the one tile's seed
    levels = spec.ideal_levels(x, w)  # [n, P, G, S, C]
    n, P, G, S, C = levels.shape
    order = levels.transpose(0, 2, 1, 3, 4).reshape(n, G, P, S * C)  # conversion (i, g, p, c)
    ne = -(-n // 16) * 16
    i, g, p, c = np.meshgrid(np.arange(n), np.arange(G), np.arange(P), np.arange(S * C), indexing="ij")
    k = ((g * P + p) * (S * C) + c) * ne + i
    words = splitmix64_reference(seed, k >> 1)
    bits = np.where(k & 1, words >> np.uint64(32), words & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    flat = order.reshape(-1, spec.physical_cols)
    codes = model.sampler().sample_bits(flat, bits.reshape(flat.shape)).reshape(n, G, P, S, C)
    want = spec.recombine(codes.transpose(0, 2, 1, 3, 4), x)
    assert np.array_equal(got.numpy().astype(np.int64), want)

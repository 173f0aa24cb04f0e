"""The fused fast path against independent definitions: numpy's PCG64, the converters' numpy ``convert`` over
float64 partial sums, and the error model's sampler; under every plan the engine can choose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cimlab import chip_sim
from cimlab.chip_sim import fastpath, kernels
from cimlab.chip_sim.controller import TwinController
from cimlab.chip_sim.rng import VectorStream
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.registers import BY_NAME


def numpy_mac_raw(twin: TwinController, row_start: int, x: np.ndarray, first_vector: int) -> np.ndarray:
    """MAC_RAW codes as the twin defines them, in plain numpy: float64 partial sums of the compute weights, the
    vectors' items from ``VectorStream.draw``, then ``Converter.convert``."""
    spec = twin.spec
    P, G, R, J = spec.n_planes, spec.n_groups, spec.rows_per_conversion, spec.physical_cols
    g0, g1 = spec.group_span(row_start, x.shape[1])
    full = np.zeros((x.shape[0], G * R), dtype=np.int64)
    full[:, row_start : row_start + x.shape[1]] = x
    planes = spec.inputs_to_planes(full).astype(np.float64).reshape(-1, P, G, R)[:, :, g0:g1]
    w = twin._compute.reshape(G, R, J)[g0:g1].astype(np.float64)
    sums = np.einsum("npgr,grj->gnpj", planes, w)
    assert sums.max(initial=0) < 2**24
    items = None
    if twin._stream is not None:
        items = twin._stream.draw(first_vector, x.shape[0]).reshape(-1, P, G, J)[:, :, g0:g1]
    codes = twin.converter.convert(sums.astype(np.float32), items)  # [Gs, n, P, J]
    return codes.transpose(1, 2, 0, 3).reshape(x.shape[0], P, g1 - g0, spec.n_slices, spec.cols)


def _program(twin: TwinController, seed: int) -> np.random.Generator:
    spec = twin.spec
    rng = np.random.default_rng(seed)
    twin.write_weights(0, rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols)))
    return rng


def _inputs(twin: TwinController, rng: np.random.Generator, n: int, n_rows: int) -> np.ndarray:
    spec = twin.spec
    sparse = rng.random((n, n_rows)) < 0.7  # some zero inputs, so some patterns are 0
    return (sparse * rng.integers(0, spec.input_max + 1, (n, n_rows))).astype(spec.input_dtype)


def test_pcg_words_equal_numpy() -> None:
    stream = VectorStream(2**64 - 5, 37, np.uint16)  # 10 words a vector, the last one only partly used
    stream.rekey(12345)
    state = stream.pcg_state()
    for n in (5, kernels.PCG_LANES, 3 * kernels.PCG_LANES + 7):  # fewer words than lanes, whole runs, a tail
        out = np.empty(n, dtype=np.uint64)
        kernels.pcg_fill(out, state, 1_000_003)
        bg = np.random.PCG64(stream._seed_seq)
        bg.advance(1_000_003)
        np.testing.assert_array_equal(out, bg.random_raw(n))
    per_vector = np.empty((9, stream.words), dtype=np.uint64)  # more vectors than streams stepped side by side
    kernels.pcg_fill_vectors(per_vector, state, 77)
    np.testing.assert_array_equal(per_vector.view(np.uint16)[:, : stream.per_vector], stream.draw(77, 9))


CASES = {
    "default": ("default", {}),
    "default-very-noisy-lsb-not-one": ("default", {"noise_sigma_lsb": "1.5", "adc_full_scale": "20",
                                                   "stuck_at_0": "0.05", "adc_dnl_sigma_lsb": "0.3"}),
    "large": ("large", {"rows": "300"}),
    "nvm-2bit": ("nvm-2bit", {}),
    "nvm-4bit": ("nvm-4bit", {}),
    "ideal": ("ideal", {}),
    "two-bit-slices": ("default", {"input_slice_bits": "2", "rows": "100", "cols": "5"}),
    "wide-slices-rows-one-by-one": ("default", {"input_bits": "10", "input_slice_bits": "10", "rows": "40",
                                                "cols": "3", "adc_bits": "8", "adc_full_scale": "255",
                                                "rows_per_conversion": "8"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_numpy_definition(case: str) -> None:
    profile, overrides = CASES[case]
    twin = chip_sim.make_twin(profile, 31, overrides)
    spec = twin.spec
    rng = _program(twin, 4)
    x = _inputs(twin, rng, 9, spec.rows)
    first = twin.vector_counter
    codes, _ = twin.mac_raw(0, x)
    np.testing.assert_array_equal(codes, numpy_mac_raw(twin, 0, x, first))
    lo = spec.rows // 3
    xr = _inputs(twin, rng, 4, spec.rows // 2)
    first = twin.vector_counter
    codes, _ = twin.mac_raw(lo, xr)
    np.testing.assert_array_equal(codes, numpy_mac_raw(twin, lo, xr, first))
    twin.write_reg(BY_NAME["VDD_MV"].addr, twin.profile.analog.vdd_min_mv)  # another noise table and gains
    first = twin.vector_counter
    y, _ = twin.mac(0, x)
    np.testing.assert_array_equal(y, spec.recombine(numpy_mac_raw(twin, 0, x, first), x))


PLANS = [
    fastpath.Plan(block_rows=4, use_table=True, tile=16, chunk=1),
    fastpath.Plan(block_rows=3, use_table=True, tile=40, chunk=3),  # a tile that is not a multiple of 16
    fastpath.Plan(block_rows=1, use_table=False, tile=48, chunk=2),
    fastpath.Plan(block_rows=8, use_table=True, tile=256, chunk=64),
]


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"b{p.block_rows}-t{p.tile}-c{p.chunk}-{p.use_table}")
def test_every_plan_gives_the_same_codes(plan: fastpath.Plan) -> None:
    twin = chip_sim.make_twin("default", 8, {"noise_sigma_lsb": "0.5"})
    rng = _program(twin, 1)
    x = _inputs(twin, rng, 7, twin.spec.rows)
    twin._engine._plans[2] = plan  # the engine's plan for 2-byte items, replaced
    first = twin.vector_counter
    codes, _ = twin.mac_raw(0, x)
    np.testing.assert_array_equal(codes, numpy_mac_raw(twin, 0, x, first))


def test_unsorted_noise_table_is_converted_exactly() -> None:
    twin = chip_sim.make_twin("default", 2, {"noise_sigma_lsb": "0.8"})
    rng = _program(twin, 2)
    conv = twin.converter
    table = conv.noise_table.copy()
    np.random.default_rng(0).shuffle(table)  # a converter whose noise is not monotone in its item
    conv.noise_table = table
    x = _inputs(twin, rng, 5, twin.spec.rows)
    first = twin.vector_counter
    codes, _ = twin.mac_raw(0, x)
    np.testing.assert_array_equal(codes, numpy_mac_raw(twin, 0, x, first))


def _spread_model(spec, seed: int) -> ErrorModel:  # noqa: ANN001
    """Codes spread up to four off the ideal one: many conversions miss the most likely code by two or more."""
    rng = np.random.default_rng(seed)
    J, L, C = spec.physical_cols, spec.n_levels, spec.n_codes
    ideal = spec.ideal_codes(np.arange(L))
    counts = np.zeros((J, L, C), dtype=np.int64)
    for delta in range(-4, 5):
        code = np.clip(ideal + delta, 0, spec.adc_max)
        np.add.at(counts, (slice(None), np.arange(L), code), rng.integers(1, 100, (J, L)) * (5 - abs(delta)))
    return ErrorModel(spec, counts, chip_id="spread")


@pytest.mark.parametrize(("profile", "guide_bytes", "near_first"),
                         [("default", None, True), ("nvm-2bit", None, True), ("nvm-4bit", None, True),
                          ("nvm-4bit", None, False), ("nvm-4bit", 1, True), ("nvm-4bit", 1, False)])
def test_data_driven_fast_path_equals_the_sampler(profile: str, guide_bytes: int | None, near_first: bool,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if guide_bytes is not None:  # one bucket a row: a search counts the row's window from its first code
        monkeypatch.setattr(fastpath, "GUIDE_BYTES", guide_bytes)
    monkeypatch.setattr(fastpath, "NEAR_FIRST_SHARE", 0.0 if near_first else 2.0)
    spec = chip_sim.load_profile(profile).spec
    path = _spread_model(spec, 3).save(tmp_path / "spread.npz")
    twin = chip_sim.make_twin(profile, 5, {"error_model": str(path)})
    rng = _program(twin, 6)
    x = _inputs(twin, rng, 11, spec.rows)
    first = twin.vector_counter
    codes, _ = twin.mac_raw(0, x)
    np.testing.assert_array_equal(codes, numpy_mac_raw(twin, 0, x, first))
    assert twin._engine._sampler_tables[1][0] is near_first  # the search the parameters asked for ran
    twin._engine._plans[4] = fastpath.Plan(block_rows=2, use_table=True, tile=32, chunk=1)
    first = twin.vector_counter
    codes, _ = twin.mac_raw(0, x)
    np.testing.assert_array_equal(codes, numpy_mac_raw(twin, 0, x, first))


@pytest.mark.parametrize("profile", ["default", "nvm-4bit"])
def test_near_codes_read_the_sampler_exactly(profile: str) -> None:
    """Uniforms at, next to and in the same top bits as every bound around each row's most likely code get that
    code from the near-codes tables, or are left to the search; never another code."""
    spec = chip_sim.load_profile(profile).spec
    sampler = _spread_model(spec, 4).sampler()
    near_a, near_b, _ = fastpath.near_tables(sampler)
    rng = np.random.default_rng(9)
    J, width, low = spec.physical_cols, sampler.width, (1 << (32 - fastpath.NEAR_BITS)) - 1
    levels, cols, items, drawn = [], [], [], []
    for row in rng.choice(sampler.mode.size, 64, replace=False):
        mode = int(sampler.mode[row])
        bounds = sampler.bounds[row * width : (row + 1) * width]
        edges = [int(bounds[c]) for c in range(max(mode - 2, 0), min(mode + 3, width)) if bounds[c] < 1 << 32]
        us = [u for b in edges for u in (b - 1, b, b + 1, b & ~low, b | low)]
        drawn += [False] * len(us) + [True] * 64
        us += [int(u) for u in rng.integers(0, 1 << 32, 64)]
        us = [min(max(u, 0), (1 << 32) - 1) for u in us]
        levels += [row // J] * len(us)
        cols += [row % J] * len(us)
        items += us
    n = -(-len(items) // kernels.LANES) * kernels.LANES
    pad = n - len(items)
    acc = np.array(levels + [0] * pad, np.float32)
    lane_cols = np.array(cols + [0] * pad, np.int32)
    bits = np.array(items + [0] * pad, np.uint32)
    rows, codes, flags = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
    kernels.near_codes(acc, lane_cols, J, near_a, near_b, bits, rows, codes, flags, n)
    np.testing.assert_array_equal(rows, acc.astype(np.int64) * J + lane_cols)
    want = [sampler.sample_one(s, j, u) for s, j, u in zip(levels, cols, items, strict=True)]
    read = flags[: len(items)] == 0
    np.testing.assert_array_equal(codes[: len(items)][read], np.array(want)[read])
    # and the tables leave to the search little more than the draws outside the three codes
    drawn_ = np.array(drawn)
    modes = sampler.mode[np.array(levels) * J + np.array(cols)]
    near = np.abs(np.array(want) - modes) <= 1
    assert read[drawn_].mean() > near[drawn_].mean() - 0.01, (read[drawn_].mean(), near[drawn_].mean())


def test_plans_fit_the_caches() -> None:
    l2 = 2 * 1024 * 1024
    for name, _ in chip_sim.list_profiles():
        spec = chip_sim.load_profile(name).spec
        for item_bytes in (0, 2, 4):
            plan = fastpath.plan_for(spec, item_bytes, l1=48 * 1024, l2=l2)
            assert plan.table_bytes(spec) <= fastpath.TABLE_BYTES
            assert 1 <= plan.tile <= spec.physical_cols
            assert plan.chunk * spec.n_planes >= fastpath.MIN_PAIRS  # each tile of the table used by many pairs
            if plan.use_table:
                blocks = -(-spec.rows_per_conversion // plan.block_rows)
                per_tile = blocks * (1 << (plan.block_rows * spec.input_slice_bits)) * plan.tile * 4
                assert per_tile <= l2 // 4 or plan.tile == fastpath.LANES, (name, plan)


@pytest.mark.parametrize("case", ["default", "nvm-2bit", "large", "default-very-noisy-lsb-not-one", "ideal"])
def test_torch_engine_equals_numpy_definition(case: str, tmp_path: Path) -> None:
    """The GPU engine's operations, run by torch on the CPU, give the numpy path's codes (and so the CPU
    engine's); on a GPU the same float32 operations run in the same order."""
    pytest.importorskip("torch")
    from cimlab.chip_sim.torch_engine import TorchEngine

    profile, overrides = CASES[case]
    twin = chip_sim.make_twin(profile, 13, overrides)
    twin._engine = TorchEngine(twin.spec, "cpu")
    spec = twin.spec
    rng = _program(twin, 9)
    x = _inputs(twin, rng, 6, spec.rows)
    first = twin.vector_counter
    codes, raw_cost = twin.mac_raw(0, x)
    np.testing.assert_array_equal(codes, numpy_mac_raw(twin, 0, x, first))
    lo = spec.rows // 4
    first = twin.vector_counter
    y, _ = twin.mac(lo, x[:, lo:])
    np.testing.assert_array_equal(y, spec.recombine(numpy_mac_raw(twin, lo, x[:, lo:], first), x[:, lo:]))
    cpu = chip_sim.make_twin(profile, 13, overrides)
    _program(cpu, 9)
    assert cpu.mac_raw(0, x)[1] == raw_cost  # same cycles and energy (events counted on the device)


def test_torch_engine_draws_data_driven_codes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from cimlab.chip_sim.torch_engine import TorchEngine

    spec = chip_sim.load_profile("nvm-2bit").spec
    path = _spread_model(spec, 4).save(tmp_path / "spread.npz")
    twin = chip_sim.make_twin("nvm-2bit", 3, {"error_model": str(path)})
    twin._engine = TorchEngine(spec, "cpu")
    rng = _program(twin, 2)
    x = _inputs(twin, rng, 8, spec.rows)
    first = twin.vector_counter
    codes, _ = twin.mac_raw(0, x)
    np.testing.assert_array_equal(codes, numpy_mac_raw(twin, 0, x, first))


def test_unknown_devices_are_config_errors() -> None:
    from cimlab.firmware_bridge.errors import ConfigError

    with pytest.raises(ConfigError, match="device='tpu'"):
        chip_sim.make_twin("default", 0, device="tpu")

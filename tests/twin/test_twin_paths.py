"""Reference mode (one clock at a time) equals the fast path; results are deterministic whatever the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cimlab import chip_sim
from cimlab.chip_sim.controller import TwinController
from cimlab.chip_sim.rng import VectorStream
from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.chip_sim.fsm import State
from cimlab.firmware_bridge.registers import BY_NAME

# small macros so the reference mode (pure Python, per conversion) stays fast
SMALL = {"rows": "40", "cols": "3", "rows_per_conversion": "8"}
NOISY = {"noise_sigma_lsb": "0.6", "gain_sigma": "0.05", "offset_sigma_lsb": "0.4", "cell_sigma": "0.08",
         "adc_dnl_sigma_lsb": "0.2", "adc_inl_bow_lsb": "0.5", "stuck_at_0": "0.05", "stuck_at_1": "0.05"}
CASES = {
    "default": ("default", SMALL),
    "default-very-noisy": ("default", {**SMALL, **NOISY}),
    "ideal": ("ideal", SMALL),
    "nvm-2bit": ("nvm-2bit", {"rows": "40", "cols": "3", "rows_per_conversion": "16"}),
    "large-geometry": ("large", {"rows": "36", "cols": "2", "rows_per_conversion": "16", "adc_bits": "5",
                                 "adc_full_scale": "31"}),
    "lsb-not-one": ("default", {**SMALL, "adc_full_scale": "20", **NOISY}),
}


def _pair(profile: str, overrides: dict[str, str], seed: int = 7) -> tuple[TwinController, TwinController]:
    fast = chip_sim.make_twin(profile, seed, overrides)
    ref = chip_sim.make_twin(profile, seed, {**overrides, "mode": "reference"})
    assert fast.profile.mode == "fast" and ref.profile.mode == "reference"
    return fast, ref


def _exercise(twin: TwinController, rng_seed: int = 3) -> list[object]:
    """A fixed sequence of operations; returns everything observable."""
    spec = twin.spec
    rng = np.random.default_rng(rng_seed)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (5, spec.rows)).astype(spec.input_dtype)
    seen: list[object] = []
    rows = spec.rows
    twin.write_weights(0, w)
    seen.append(twin.counters())
    r0 = min(4, rows - 1)
    twin.write_weights(r0, w[: min(7, rows - r0)] // 2)
    seen.append(twin.counters().last)
    seen.append(twin.mac_raw(0, x[:3]))
    seen.append(twin.mac(0, x))
    lo, hi = rows // 8, max(rows // 8 + 1, rows * 3 // 4)
    seen.append(twin.mac_raw(lo, x[3:, lo:hi]))
    twin.write_reg(BY_NAME["VDD_MV"].addr, 650)
    seen.append(twin.mac(rows // 2, x[:2, rows // 2 :]))
    seen.append(twin.counters())
    return seen


def _assert_same(a: list[object], b: list[object]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        if isinstance(u, tuple):
            np.testing.assert_array_equal(u[0], v[0])  # type: ignore[index]
            assert u[0].dtype == v[0].dtype  # type: ignore[index]
            assert u[1] == v[1]  # type: ignore[index]
        else:
            assert u == v


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_mode_equals_fast_path(case: str) -> None:
    profile, overrides = CASES[case]
    fast, ref = _pair(profile, overrides)
    _assert_same(_exercise(fast), _exercise(ref))
    assert fast.vector_counter == ref.vector_counter


def test_reference_mode_equals_fast_path_data_driven(tmp_path: Path) -> None:
    fast, _ = _pair("default", {**SMALL, **NOISY})
    spec = fast.spec
    rng = np.random.default_rng(0)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    fast.write_weights(0, w)
    x = rng.integers(0, spec.input_max + 1, (40, spec.rows))
    codes, _ = fast.mac_raw(0, x)
    model = ErrorModel.from_conversions(spec, spec.ideal_levels(x, w), codes, chip_id="t")
    path = model.save(tmp_path / "m.npz")
    dd_fast, dd_ref = _pair("default", {**SMALL, "error_model": str(path)})
    _assert_same(_exercise(dd_fast), _exercise(dd_ref))


def test_reference_fsm_counts_clock_by_clock() -> None:
    _, ref = _pair("default", SMALL)
    fsm = ref._reference()
    x = np.ones((2, ref.spec.rows), dtype=np.uint8)
    _, cost = ref.mac(0, x)
    assert fsm.cycles == cost.cycles
    assert fsm.state is State.IDLE


@pytest.mark.parametrize("profile", ["default", "nvm-2bit"])
def test_same_seed_same_codes_whatever_the_batch_split(profile: str) -> None:
    spec = chip_sim.load_profile(profile).spec
    rng = np.random.default_rng(5)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (40, spec.rows)).astype(spec.input_dtype)
    outs = []
    for splits in ([40], [1, 39], [13, 13, 14], [1] * 5 + [35]):
        twin = chip_sim.make_twin(profile, 11)
        twin.write_weights(0, w)
        parts, start = [], 0
        for n in splits:
            parts.append(twin.mac_raw(0, x[start : start + n])[0])
            start += n
        outs.append(np.concatenate(parts))
    for other in outs[1:]:
        np.testing.assert_array_equal(outs[0], other)


def test_mac_and_mac_raw_share_the_stream() -> None:
    # MAC of a batch equals recombining MAC_RAW of the same batch at the same point of the sequence
    a = chip_sim.make_twin("default", 2)
    b = chip_sim.make_twin("default", 2)
    spec = a.spec
    rng = np.random.default_rng(9)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (300, spec.rows)).astype(np.uint8)
    for t in (a, b):
        t.write_weights(0, w)
    y, _ = a.mac(0, x)
    codes, _ = b.mac_raw(0, x)
    np.testing.assert_array_equal(y, spec.recombine(codes, x))


def test_seeds_differ_and_noise_is_fresh_per_vector() -> None:
    spec = chip_sim.load_profile("default").spec
    x = np.full((50, spec.rows), 9, dtype=np.uint8)
    w = np.full((spec.rows, spec.cols), 5)
    runs = []
    for seed in (1, 1, 2):
        twin = chip_sim.make_twin("default", seed)
        twin.write_weights(0, w)
        runs.append(twin.mac_raw(0, x)[0])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    # identical inputs on consecutive vectors still see different noise
    assert not all(np.array_equal(runs[0][0], runs[0][i]) for i in range(1, 50))


def test_vector_stream_is_position_keyed() -> None:
    stream = VectorStream(3, 1000, np.uint16)
    whole = stream.draw(0, 10)
    np.testing.assert_array_equal(whole[4:9], stream.draw(4, 5))
    np.testing.assert_array_equal(whole[9], stream.draw(9, 1)[0])
    assert not np.array_equal(whole[0], whole[1])
    assert not np.array_equal(VectorStream(4, 1000, np.uint16).draw(0, 1), whole[:1])


@st.composite
def _small_twins(draw: st.DrawFn) -> dict[str, str]:
    storage = draw(st.sampled_from(["twos", "offset", "unsigned"]))
    cell_bits = 1 if storage == "twos" else draw(st.integers(1, 2))
    weight_bits = draw(st.integers(2, 6))
    input_bits = draw(st.integers(1, 5))
    rows = draw(st.integers(4, 40))
    adc_bits = draw(st.integers(2, 7))
    return {
        "rows": str(rows), "cols": str(draw(st.integers(1, 3))), "weight_storage": storage,
        "cell_bits": str(cell_bits), "weight_bits": str(weight_bits), "input_bits": str(input_bits),
        "input_slice_bits": str(draw(st.integers(1, input_bits))),
        "rows_per_conversion": str(draw(st.integers(1, rows))), "adc_bits": str(adc_bits),
        "adc_full_scale": str(draw(st.integers(1, 3 * 2**adc_bits))),
        "noise_sigma_lsb": str(draw(st.sampled_from([0.0, 0.3, 1.5]))),
        "gain_sigma": str(draw(st.sampled_from([0.0, 0.05]))),
        "cell_sigma": str(draw(st.sampled_from([0.0, 0.1]))),
        "offset_sigma_lsb": str(draw(st.sampled_from([0.0, 0.5]))),
        "adc_dnl_sigma_lsb": str(draw(st.sampled_from([0.0, 0.3]))),
        "adc_inl_bow_lsb": str(draw(st.sampled_from([0.0, -0.7]))),
        "stuck_at_0": str(draw(st.sampled_from([0.0, 0.1]))),
    }


@pytest.mark.soak
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=_small_twins(), seed=st.integers(0, 2**64 - 1))
def test_reference_equals_fast_on_random_macros(overrides: dict[str, str], seed: int) -> None:
    try:
        fast, ref = _pair("ideal", overrides, seed)
    except ConfigError:
        assume(False)  # a geometry MacroSpec rejects (int32 bound), not what this test is about
        return
    _assert_same(_exercise(fast, seed % 1000), _exercise(ref, seed % 1000))

"""The sweep plan: every reachable level, exactly targeted, for SRAM and multi-level-cell macros; deterministic."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cimlab.characterize.plan import (
    DigitProfile,
    Plan,
    PlanOptions,
    digit_weights,
    parse_index_list,
    reachable_levels,
    slice_digit_max,
)
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

SRAM = MacroSpec(rows=64, cols=8)
NVM = MacroSpec(rows=32, cols=4, weight_bits=4, weight_storage="unsigned", cell_bits=2, input_bits=4,
                input_slice_bits=2, rows_per_conversion=8, adc_bits=7, adc_full_scale=127)
ODD = MacroSpec(rows=40, cols=3, weight_bits=3, weight_storage="offset", cell_bits=2, input_bits=3,
                input_slice_bits=2, rows_per_conversion=6, adc_bits=6, adc_full_scale=63)
SPECS = {"sram": SRAM, "nvm": NVM, "odd": ODD}


def brute_force_reachable(n_rows: int, a_max: int, d_max: int) -> set[int]:
    products = {a * d for a in range(a_max + 1) for d in range(d_max + 1)}
    return {sum(c) for c in itertools.product(sorted(products), repeat=n_rows)}


@pytest.mark.parametrize(("n", "a", "d"), [(1, 1, 1), (3, 1, 1), (3, 3, 3), (4, 3, 1), (2, 15, 3), (3, 1, 15)])
def test_reachable_levels_match_brute_force(n: int, a: int, d: int) -> None:
    got = set(np.nonzero(reachable_levels(n, a, d))[0].tolist())
    assert got == brute_force_reachable(n, a, d)


def test_digit_weights_store_the_wanted_digits() -> None:
    for spec in SPECS.values():
        dmax = slice_digit_max(spec)
        w = digit_weights(spec)
        digits = spec.weights_to_slices(w[:, None])[:, :, 0]
        for v in range(w.size):
            np.testing.assert_array_equal(digits[v], np.minimum(v, dmax))
    assert slice_digit_max(ODD).tolist() == [3, 1]  # 3-bit weights in 2-bit cells: the top cell holds 1 bit
    assert digit_weights(SRAM).tolist() == [0, -1]  # two's complement: all bits clear / all bits set


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("row_mode", ["random", "fixed"])
def test_every_level_is_targeted_exactly_and_often_enough(name: str, row_mode: str) -> None:
    spec = SPECS[name]
    repeats = 7
    plan = Plan(spec, PlanOptions(repeats=repeats, row_mode=row_mode, seed=11))
    assert plan.unplanned_levels == ()
    assert set(plan.levels) == set(plan.reachable)
    full = np.nonzero(plan.dmax == plan.d_top)[0]
    seen = np.zeros((spec.n_slices, spec.n_levels), dtype=np.int64)
    for i in range(plan.n_batches):
        b = plan.batch(i)
        assert b.weights.shape == (spec.rows, spec.cols) and b.inputs.shape == (plan.batch_vectors, spec.rows)
        assert spec.weight_min <= b.weights.min() and b.weights.max() <= spec.weight_max
        assert 0 <= b.inputs.min() and b.inputs.max() <= spec.input_max
        levels = spec.ideal_levels(b.inputs, b.weights)  # [B, P, G, K, C]
        # row-uniform weights: every output column of a slice sees the same level
        assert (levels == levels[..., :1]).all()
        aimed = b.targets >= 0
        for k in full:
            np.testing.assert_array_equal(levels[..., k, 0][aimed], b.targets[aimed])
        for k in range(spec.n_slices):
            seen[k] += np.bincount(levels[..., k, 0][aimed], minlength=spec.n_levels)
    for k in full:
        assert seen[k][list(plan.levels)].min() >= repeats
        np.testing.assert_array_equal(seen[k], plan.expected_targets())
    reach = np.zeros(spec.n_levels, dtype=bool)
    reach[list(plan.reachable)] = True
    assert (seen[full][:, ~reach] == 0).all()


def test_multi_level_cells_reach_levels_that_full_digits_alone_cannot() -> None:
    plan = Plan(NVM, PlanOptions(repeats=1))
    full_only = DigitProfile.build(8, 3, (), 3).reach
    # with every cell at digit 3 only multiples of 3 exist; the plan still covers the others
    assert not full_only[1] and 1 in plan.levels
    high = [s for s in plan.levels if s > NVM.s_max // 2 and s % 3]
    assert len(high) > 10 and not full_only[high].any()
    assert len(plan.profiles) > 1
    assert NVM.s_max - 1 not in plan.reachable  # 8 x 9 - 1 needs a product of 8: no a * d in 0..3 gives it


def test_batches_are_deterministic_and_depend_on_the_seed() -> None:
    a, b = Plan(SRAM, PlanOptions(repeats=50, seed=1)), Plan(SRAM, PlanOptions(repeats=50, seed=1))
    c = Plan(SRAM, PlanOptions(repeats=50, seed=2))
    assert a.digest == b.digest != c.digest
    for i in range(a.n_batches):
        np.testing.assert_array_equal(a.batch(i).inputs, b.batch(i).inputs)
    assert not np.array_equal(a.batch(0).inputs, c.batch(0).inputs)


def active_rows_per_level(plan: Plan) -> dict[int, set[tuple[int, ...]]]:
    """For group 0 and input slice 0: which row sets were driven for each targeted level."""
    out: dict[int, set[tuple[int, ...]]] = {}
    R = plan.spec.rows_per_conversion
    for i in range(plan.n_batches):
        b = plan.batch(i)
        planes = plan.spec.inputs_to_planes(b.inputs)[:, 0, :R]
        for vec in range(planes.shape[0]):
            t = int(b.targets[vec, 0, 0])
            if t >= 0:
                out.setdefault(t, set()).add(tuple(np.nonzero(planes[vec])[0]))
    return out


def test_random_rows_vary_the_cells_and_fixed_rows_do_not() -> None:
    rnd = active_rows_per_level(Plan(SRAM, PlanOptions(repeats=400, row_mode="random")))
    fixed = active_rows_per_level(Plan(SRAM, PlanOptions(repeats=400, row_mode="fixed")))
    R = SRAM.rows_per_conversion
    for s in range(1, R):
        assert len(fixed[s]) == 1
        assert len(rnd[s]) > 5
    assert fixed[3] == {(0, 1, 2)}


def test_levels_and_columns_options() -> None:
    plan = Plan(SRAM, PlanOptions(repeats=3, levels=(0, 8, 16), columns=(0, 5)))
    assert plan.levels == (0, 8, 16)
    assert plan.column_mask.sum() == 2 and plan.column_mask[5]
    assert set(np.nonzero(plan.expected_targets())[0]) == {0, 8, 16}
    with pytest.raises(ConfigError, match=r"levels \[17\] are not reachable"):
        Plan(SRAM, PlanOptions(levels=(3, 17)))
    with pytest.raises(ConfigError, match=r"columns \[32\] are outside the physical columns 0..31"):
        Plan(SRAM, PlanOptions(columns=(32,)))
    with pytest.raises(ConfigError, match="row_mode='diagonal'"):
        Plan(SRAM, PlanOptions(row_mode="diagonal"))
    with pytest.raises(ConfigError, match="repeats=0"):
        Plan(SRAM, PlanOptions(repeats=0))
    with pytest.raises(ConfigError, match="batch 5 is outside"):
        Plan(SRAM, PlanOptions(repeats=1)).batch(5)


def test_options_round_trip_and_reject_unknown_keys() -> None:
    opts = PlanOptions(repeats=9, levels=(1, 2), columns=None, row_mode="fixed", batch_vectors=4, seed=7)
    assert PlanOptions.from_dict(opts.to_dict()) == opts
    with pytest.raises(ConfigError, match="unknown key"):
        PlanOptions.from_dict({"repeats": 1, "vdd": 0.8})


def test_parse_index_list() -> None:
    assert parse_index_list("0-3,8,10:16:3", 0, 31, "--levels") == (0, 1, 2, 3, 8, 10, 13)
    with pytest.raises(ConfigError, match=r"--levels: \[40\] outside the allowed range 0..31"):
        parse_index_list("1,40", 0, 31, "--levels")
    with pytest.raises(ConfigError, match="cannot read 'x'"):
        parse_index_list("x", 0, 31, "--columns")


def test_every_level_visits_every_row_group() -> None:
    spec = MacroSpec(rows=64, cols=2)  # 4 row groups
    for levels in [None, (0, 4, 8, 12)]:  # also when the number of levels is a multiple of the groups
        plan = Plan(spec, PlanOptions(repeats=8, levels=levels))
        hit = np.zeros((spec.n_levels, spec.n_groups), dtype=bool)
        for i in range(plan.n_batches):
            t = plan.batch(i).targets  # [B, P, G]
            for g in range(spec.n_groups):
                hit[t[:, :, g][t[:, :, g] >= 0], g] = True
        assert hit[list(plan.levels)].all()


def test_a_differential_macro_sweeps_each_array_in_turn_and_every_column_sees_every_level() -> None:
    """No weight puts a digit on both arrays of a differential pair: the plan sweeps the positive array, then the
    negative one with the weights negated, so every physical column of both gets every level as often."""
    spec = MacroSpec(rows=32, cols=3, weight_bits=3, weight_storage="differential", cell_bits=2, input_bits=3,
                     input_slice_bits=1, rows_per_conversion=8, adc_bits=5, adc_full_scale=31)
    repeats = 5
    plan = Plan(spec, PlanOptions(repeats=repeats, seed=4))
    assert plan.unplanned_levels == () and plan.n_batches == 2 * plan.batches_per_side
    seen = np.zeros((spec.n_slices, spec.n_levels), dtype=np.int64)
    for i in range(plan.n_batches):
        b = plan.batch(i)
        assert b.side == i // plan.batches_per_side
        assert (b.weights >= 0).all() if b.side == 0 else (b.weights <= 0).all()
        levels = spec.ideal_levels(b.inputs, b.weights)  # [B, P, G, K, C]
        aimed = b.targets >= 0
        for k in b.swept_slices(spec):
            if plan.dmax[k] == plan.d_top:
                np.testing.assert_array_equal(levels[..., k, 0][aimed], b.targets[aimed])
            seen[k] += np.bincount(levels[..., k, 0][aimed], minlength=spec.n_levels)
        other = np.setdiff1d(np.arange(spec.n_slices), b.swept_slices(spec))
        assert (levels[..., other, :] == 0).all()  # the other array holds 0 while one is swept
    full = np.nonzero(plan.dmax == plan.d_top)[0]
    assert set(full) == {0, 2}  # the low cell of each side (3-bit magnitudes: the top cell holds 1 bit)
    for k in full:
        np.testing.assert_array_equal(seen[k], plan.expected_targets())
        assert seen[k][list(plan.levels)].min() >= repeats

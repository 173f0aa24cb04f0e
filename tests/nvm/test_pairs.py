"""Layers of both signs on a unipolar crossbar: compile never splits a differential pair, and the pairs compute
``x @ W`` (the numpy product) on an ideal macro."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cimlab.deploy.schedule import PACK_MODES, Schedule, plan
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

UNI = MacroSpec(rows=32, cols=8, weight_bits=2, weight_storage="unsigned", cell_bits=2, input_bits=3,
                rows_per_conversion=8, adc_bits=5, adc_full_scale=31)


@st.composite
def networks(draw: st.DrawFn) -> tuple[list[tuple[str, int, int]], set[str], str]:
    n = draw(st.integers(1, 5))
    layers = [(f"l{i}", draw(st.integers(1, 70)), draw(st.integers(1, 20))) for i in range(n)]
    paired = {name for name, _, _ in layers if draw(st.booleans())}
    return layers, paired, draw(st.sampled_from(PACK_MODES))


@settings(max_examples=60, deadline=None)
@given(net=networks())
def test_compile_never_splits_a_pair(net: tuple[list[tuple[str, int, int]], set[str], str]) -> None:
    layers, paired, pack = net
    sched = plan(UNI, layers, pack=pack, paired=paired)
    owner: dict[tuple[int, int, int], tuple[str, int]] = {}  # (page, row group, macro column) -> tile
    for name, lm in sched.layers:
        assert all(t.paired == (name in paired) for t in lm.tiles)
        for i, t in enumerate(lm.tiles):
            assert t.n_cols <= (UNI.cols // 2 if t.paired else UNI.cols)
            cols = range(t.macro_col, t.macro_col + t.n_cols * (2 if t.paired else 1))
            assert cols.stop <= UNI.cols  # both columns of every pair on the macro, on the tile's page and rows
            g0, g1 = t.group_span(UNI)
            for g in range(g0, g1):
                for c in cols:
                    key = (t.page, g, c)
                    assert key not in owner, f"{name}[{i}] shares a cell with {owner[key]}"
                    owner[key] = (name, i)
    back = Schedule.from_dict(UNI, sched.to_dict())
    assert back == sched


def test_pairs_compute_the_signed_product_on_an_ideal_macro() -> None:
    rng = np.random.default_rng(2)
    sched = plan(UNI, [("a", 45, 11), ("b", 11, 3)], paired={"a"})
    for name, lm in sched.layers:
        lo = -UNI.weight_max if name == "a" else 0  # "a" holds both signs, "b" magnitudes only
        w = rng.integers(lo, UNI.weight_max + 1, (lm.n_rows, lm.n_cols))
        x = rng.integers(0, UNI.input_max + 1, (9, lm.n_rows))
        np.testing.assert_array_equal(lm.ideal_mac(x, w), x @ w)


def test_package_pages_hold_positive_parts_on_even_and_negative_on_odd_columns() -> None:
    from cimlab.deploy.package import build_pages

    sched = plan(UNI, [("a", 10, 3)], paired={"a"})
    w = np.array([[3, -2, 0]] * 10)
    page = build_pages(UNI, sched, {"a": w})[0]
    t = sched.layers[0][1].tiles[0]
    block = page[t.macro_row : t.macro_row + 10, t.macro_col : t.macro_col + 6]
    assert block[0].tolist() == [3, 0, 0, 2, 0, 0]


def test_pairs_need_a_unipolar_macro_and_a_known_layer() -> None:
    with pytest.raises(ConfigError, match="unipolar"):
        plan(UNI.replace(weight_storage="differential"), [("a", 4, 4)], paired={"a"})
    with pytest.raises(ConfigError, match="does not have"):
        plan(UNI, [("a", 4, 4)], paired={"z"})

"""The placement of tiles on the macro: packing, pages, alignment, and what it does (not) change in the MACs."""

from __future__ import annotations

import numpy as np
import pytest
from deploy_helpers import DEFAULT_SPEC

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.deploy.schedule import PlacedTile, Schedule, check_no_collisions, plan
from cimlab.mapping import LayerMap, Tile, map_layer

CNN_LAYERS = [("c1", 9, 16), ("c2", 144, 32), ("c3", 288, 32), ("fc", 128, 10)]


def test_small_layers_share_one_page_without_colliding() -> None:
    s = plan(DEFAULT_SPEC, [("a", 64, 64), ("b", 64, 10), ("c", 20, 5)])
    assert s.n_pages == 1
    assert s.programming_passes_per_batch == 0
    tiles = [p.tile for p in s.tiles()]
    grid = np.zeros((DEFAULT_SPEC.rows, DEFAULT_SPEC.cols), dtype=int)
    for t in tiles:
        assert t.macro_row % DEFAULT_SPEC.rows_per_conversion == 0
        grid[t.macro_row : t.macro_row + t.n_rows, t.macro_col : t.macro_col + t.n_cols] += 1
    assert grid.max() == 1  # no cell holds two weights
    assert grid.sum() == 64 * 64 + 64 * 10 + 20 * 5


def test_a_network_that_does_not_fit_gets_pages_in_execution_order() -> None:
    s = plan(DEFAULT_SPEC, CNN_LAYERS, pack="full")
    assert s.n_pages == 2
    assert s.programming_passes_per_batch == 2
    pages = [p.tile.page for p in s.tiles()]
    assert pages == sorted(pages)  # weight-stationary: a batch loads each page once, in order
    # the cut is map_layer's: only the placement differs
    for name, lm in s.layers:
        ref = map_layer(DEFAULT_SPEC, lm.n_rows, lm.n_cols)
        assert [(t.row0, t.row1, t.col0, t.col1) for t in lm.tiles] == [
            (t.row0, t.row1, t.col0, t.col1) for t in ref.tiles]
    assert 0 < s.utilization(1) < s.utilization(0) <= 1


def test_rows_packing_keeps_trainings_columns() -> None:
    s = plan(DEFAULT_SPEC, CNN_LAYERS)
    assert s.pack == "rows"
    assert all(p.tile.macro_col == 0 for p in s.tiles())  # the columns map_layer (and training) use
    # c1 (1 group) + c2 (9 groups) | c3's 256-row tile (16 groups) | c3's 32-row tile (2) + fc (8)
    assert [[(p.layer, p.index) for p in s.page_tiles(q)] for q in range(s.n_pages)] == [
        [("c1", 0), ("c2", 0)], [("c3", 0)], [("c3", 1), ("fc", 0)]]
    assert [p.tile.macro_row for p in s.page_tiles(0)] == [144, 0]  # tallest first


def test_no_pack_is_map_layers_placement() -> None:
    s = plan(DEFAULT_SPEC, CNN_LAYERS, pack="none")
    assert s.n_pages == 5
    assert all(p.tile.macro_row == 0 and p.tile.macro_col == 0 for p in s.tiles())
    assert [p.tile.page for p in s.tiles()] == list(range(5))


def test_big_layers_fill_pages_of_their_own() -> None:
    s = plan(DEFAULT_SPEC, [("big", 600, 130)])
    assert len(s.layer_map("big").tiles) == 3 * 3
    assert s.n_pages >= 4  # six tiles are a full macro high


def test_group_aligned_placement_keeps_the_conversions_of_map_layer() -> None:
    # a coarse ADC (3 levels per code) makes every conversion's rounding visible in the output
    spec = DEFAULT_SPEC.replace(adc_full_scale=93)
    rng = np.random.default_rng(0)
    layers = [("a", 40, 7), ("b", 300, 20), ("c", 17, 70)]
    packed = plan(spec, layers, pack="full")
    assert any(p.tile.macro_row for p in packed.tiles()) and any(p.tile.macro_col for p in packed.tiles())
    for name, k, m in layers:
        x = rng.integers(0, spec.input_max + 1, size=(16, k))
        w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(k, m))
        ref = map_layer(spec, k, m).ideal_mac(x, w)
        got = packed.layer_map(name).ideal_mac(x, w)
        np.testing.assert_array_equal(got, ref)
        assert not np.array_equal(ref, x @ w)  # the ADC does round: the check above has teeth
    # an unaligned placement would change which rows share a conversion, and so the outputs
    k, m = 40, 7
    x = rng.integers(0, spec.input_max + 1, size=(64, k))
    w = rng.integers(spec.weight_min, spec.weight_max + 1, size=(k, m))
    shifted = LayerMap(spec, k, m, (Tile(0, k, 0, m, macro_row=3),))
    assert not np.array_equal(shifted.ideal_mac(x, w), map_layer(spec, k, m).ideal_mac(x, w))


def test_collisions_and_unaligned_tiles_are_refused() -> None:
    a = PlacedTile("a", 0, Tile(0, 20, 0, 8, macro_row=0, macro_col=0))
    b = PlacedTile("b", 0, Tile(0, 4, 0, 4, macro_row=16, macro_col=4))  # shares group 1 and column 4..7 with a
    with pytest.raises(ConfigError, match="collides"):
        check_no_collisions(DEFAULT_SPEC, [a, b])
    c = PlacedTile("c", 0, Tile(0, 4, 0, 4, macro_row=3, macro_col=40))
    with pytest.raises(ConfigError, match="multiple of rows_per_conversion"):
        check_no_collisions(DEFAULT_SPEC, [c])
    d = PlacedTile("d", 0, Tile(0, 4, 0, 4, macro_row=16, macro_col=4, page=1))  # another page: fine
    check_no_collisions(DEFAULT_SPEC, [a, d])


def test_round_trip_and_malformed_schedules() -> None:
    s = plan(DEFAULT_SPEC, CNN_LAYERS, pack="full")
    back = Schedule.from_dict(DEFAULT_SPEC, s.to_dict())
    assert back == s
    bad = s.to_dict()
    bad["layers"][0]["tiles"][0][4] = 8  # moved off its row-group boundary
    with pytest.raises(ArtifactError, match="malformed"):
        Schedule.from_dict(DEFAULT_SPEC, bad)
    bad = s.to_dict()
    bad["layers"][1]["tiles"] = []  # a layer no tile covers
    with pytest.raises(ArtifactError, match="cover"):
        Schedule.from_dict(DEFAULT_SPEC, bad)
    bad = s.to_dict()
    bad["pages"] = 7
    with pytest.raises(ArtifactError, match="7 pages"):
        Schedule.from_dict(DEFAULT_SPEC, bad)
    bad = s.to_dict()
    bad["pack"] = "sideways"
    with pytest.raises(ArtifactError, match="sideways"):
        Schedule.from_dict(DEFAULT_SPEC, bad)


def test_bad_networks_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        plan(DEFAULT_SPEC, [])
    with pytest.raises(ConfigError, match="unique"):
        plan(DEFAULT_SPEC, [("a", 4, 4), ("a", 4, 4)])
    with pytest.raises(ConfigError, match="n_rows"):
        plan(DEFAULT_SPEC, [("a", 0, 4)])
    with pytest.raises(ConfigError, match="packing mode 'tight'"):
        plan(DEFAULT_SPEC, [("a", 4, 4)], pack="tight")

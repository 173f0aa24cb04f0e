"""cimlab.mapping: how a layer is cut into macro tiles, and the numpy reference of what the tiles compute."""

from __future__ import annotations

import numpy as np
import pytest
from training_helpers import SMALL_LOSSY, SMALL_TWOS

from cimlab.firmware_bridge.errors import ShapeError
from cimlab.mapping import LayerMap, Tile, map_layer


@pytest.mark.parametrize(("k", "m"), [(1, 1), (32, 8), (33, 8), (32, 9), (100, 21), (64, 16)])
def test_tiles_cover_the_layer_once_and_fit_the_macro(k: int, m: int) -> None:
    spec = SMALL_TWOS
    lm = map_layer(spec, k, m)
    cover = np.zeros((k, m), dtype=int)
    for t in lm.tiles:
        assert 1 <= t.n_rows <= spec.rows and 1 <= t.n_cols <= spec.cols
        cover[t.row0 : t.row1, t.col0 : t.col1] += 1
    assert (cover == 1).all()
    assert len(lm.tiles) == -(-k // spec.rows) * -(-m // spec.cols)
    assert lm.n_pages == len(lm.tiles)


def test_conversions_per_vector_counts_only_the_groups_a_tile_spans() -> None:
    spec = SMALL_TWOS  # 32 rows, 8 rows per conversion
    lm = map_layer(spec, 40, 8)  # a full tile (4 groups) and an 8-row tile (1 group)
    per = spec.n_planes * spec.n_slices * 8
    assert lm.conversions_per_vector() == per * (4 + 1)


def test_tile_geometry_follows_its_placement() -> None:
    spec = SMALL_TWOS
    t = Tile(0, 5, 0, 3, macro_row=6, macro_col=2)
    assert t.group_span(spec) == (0, 2)  # rows 6..10 span groups 0 and 1
    assert t.row_offset(spec) == 6
    assert t.physical_columns(spec).tolist() == [[k * spec.cols + c for c in (2, 3, 4)] for k in range(4)]


def test_ideal_mac_of_a_lossless_macro_is_the_matrix_product() -> None:
    spec = SMALL_TWOS
    rng = np.random.default_rng(0)
    lm = map_layer(spec, 70, 19)
    x = rng.integers(0, spec.input_max + 1, (5, 70))
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (70, 19))
    assert np.array_equal(lm.ideal_mac(x, w), x @ w)


def test_ideal_mac_of_a_clipping_macro_differs_from_the_product() -> None:
    spec = SMALL_LOSSY
    rng = np.random.default_rng(1)
    lm = map_layer(spec, 50, 7)
    x = np.full((3, 50), spec.input_max)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (50, 7))
    assert not np.array_equal(lm.ideal_mac(x, w), x @ w)


@pytest.mark.parametrize(("k", "m"), [(0, 4), (4, 0), (-1, 3), (2.5, 3)])
def test_bad_layer_dimensions_are_shape_errors(k: object, m: object) -> None:
    with pytest.raises(ShapeError, match="n_rows|n_cols"):
        map_layer(SMALL_TWOS, k, m)  # type: ignore[arg-type]


def test_overlapping_or_misplaced_tiles_are_refused() -> None:
    spec = SMALL_TWOS
    with pytest.raises(ShapeError, match="exactly once"):
        LayerMap(spec, 4, 4, (Tile(0, 4, 0, 4), Tile(0, 2, 0, 2, page=1)))
    with pytest.raises(ShapeError, match="macro rows"):
        LayerMap(spec, 4, 4, (Tile(0, 4, 0, 4, macro_row=30),))
    with pytest.raises(ShapeError, match="macro columns"):
        LayerMap(spec, 4, 4, (Tile(0, 4, 0, 4, macro_col=6),))


def test_ideal_mac_checks_shapes() -> None:
    lm = map_layer(SMALL_TWOS, 10, 3)
    with pytest.raises(ShapeError, match=r"\[N, 10\]"):
        lm.ideal_mac(np.zeros((2, 9), dtype=int), np.zeros((10, 3), dtype=int))
    with pytest.raises(ShapeError, match=r"\[10, 3\]"):
        lm.ideal_mac(np.zeros((2, 10), dtype=int), np.zeros((10, 4), dtype=int))

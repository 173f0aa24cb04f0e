"""How a layer's weight matrix is split into macro tiles: the one definition shared by training and deploy.

A layer is a matrix product ``y[n, m] = sum_r x[n, r] * W[r, m]`` with ``K`` rows (inputs) and ``M`` columns
(outputs). For a convolution the rows are ordered as ``torch.nn.functional.unfold`` orders them: input channel
major, then kernel positions row by row (``weight.reshape(out_channels, -1).T``).

The macro holds ``spec.rows`` rows and ``spec.cols`` logical columns, so a larger layer is cut into tiles: row
ranges of at most ``spec.rows`` rows times column ranges of at most ``spec.cols`` columns. Each tile is one load of
the macro (a *page*): its rows sit at ``macro_row`` .. and its columns at ``macro_col`` ..; the host drives only
the tile's rows (other rows see input 0), so only the row groups the tile spans are converted
(``MacroSpec.group_span``), and the host adds the tiles' MAC outputs of one column range digitally.

Placement is explicit so that a later packer may put tiles elsewhere: the row offset inside a row group changes
which rows share a conversion, the column offset changes which physical columns (``j = k * cols + c``) and so which
columns' errors a tile sees. Training and deploy both read these fields; neither assumes the defaults.

A **paired** tile (``Tile.paired``) holds weights of both signs on a unipolar (``unsigned``) macro: output column
``i`` of the tile sits on the adjacent macro columns ``macro_col + 2 i`` (its positive part, ``max(w, 0)``) and
``macro_col + 2 i + 1`` (its magnitude where negative, ``max(-w, 0)``), and the host subtracts the second from the
first. The pair is one unit of the tile: both columns are on the same page and rows, always.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec

POLARITIES = ("bipolar", "unipolar-pos", "unipolar-neg")
"""A layer's weight signs: both, all >= 0, or all <= 0. On a unipolar (``unsigned``) macro a unipolar layer fits one
array (magnitudes) and a bipolar one takes a column pair per output (``map_paired_layer``)."""


@dataclass(frozen=True)
class Tile:
    """One piece of a layer on one load of the macro.

    Attributes:
        row0, row1: the layer's rows ``row0 .. row1-1`` (inputs) held by this tile.
        col0, col1: the layer's columns ``col0 .. col1-1`` (outputs) held by this tile.
        macro_row: macro row of the tile's first row.
        macro_col: macro column of the tile's first column.
        page: which load of the macro holds this tile (tiles of one page share the macro's contents).
        paired: each output on a pair of adjacent columns (positive, negative) of a unipolar macro.
    """

    row0: int
    row1: int
    col0: int
    col1: int
    macro_row: int = 0
    macro_col: int = 0
    page: int = 0
    paired: bool = False

    @property
    def n_rows(self) -> int:
        """Rows (inputs) in the tile."""
        return self.row1 - self.row0

    @property
    def n_cols(self) -> int:
        """Columns (outputs) in the tile."""
        return self.col1 - self.col0

    @property
    def macro_cols(self) -> int:
        """Macro columns the tile occupies: ``n_cols``, twice that when paired."""
        return self.n_cols * (2 if self.paired else 1)

    def split_pairs(self, block: np.ndarray) -> np.ndarray:
        """A paired tile's signed weights [n_rows, n_cols] -> what its macro columns hold [n_rows, 2 n_cols]:
        ``max(w, 0)`` on even and ``max(-w, 0)`` on odd columns (unpaired tiles: the block as it is)."""
        if not self.paired:
            return block
        out = np.empty((block.shape[0], 2 * block.shape[1]), dtype=block.dtype)
        out[:, 0::2] = np.maximum(block, 0)
        out[:, 1::2] = np.maximum(-block, 0)
        return out

    def join_pairs(self, y: np.ndarray) -> np.ndarray:
        """MAC outputs of the tile's macro columns [N, macro_cols] -> its outputs [N, n_cols] (pairs subtracted)."""
        return y[:, 0::2] - y[:, 1::2] if self.paired else y

    def group_span(self, spec: MacroSpec) -> tuple[int, int]:
        """Row groups ``(first, end)`` of the macro that this tile's rows occupy."""
        return spec.group_span(self.macro_row, self.n_rows)

    def n_groups(self, spec: MacroSpec) -> int:
        """Row groups converted for this tile."""
        g0, g1 = self.group_span(spec)
        return g1 - g0

    def row_offset(self, spec: MacroSpec) -> int:
        """Position of the tile's first row inside its first row group."""
        return self.macro_row - self.group_span(spec)[0] * spec.rows_per_conversion

    def physical_columns(self, spec: MacroSpec) -> np.ndarray:
        """Physical column ``j = k * cols + c`` of each (weight slice k, macro column of the tile), shape
        [n_slices, macro_cols]."""
        k = np.arange(spec.n_slices)[:, None]
        c = self.macro_col + np.arange(self.macro_cols)[None, :]
        return k * spec.cols + c

    def conversions_per_vector(self, spec: MacroSpec) -> int:
        """ADC conversions one input vector takes on this tile: planes x groups spanned x slices x its macro
        columns."""
        return spec.n_planes * self.n_groups(spec) * spec.n_slices * self.macro_cols

    def weights(self, matrix: np.ndarray) -> np.ndarray:
        """The tile's block ``matrix[row0:row1, col0:col1]`` of a layer matrix [K, M]."""
        return matrix[self.row0 : self.row1, self.col0 : self.col1]

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """The tile's inputs ``x[:, row0:row1]`` of layer inputs [N, K]."""
        return x[:, self.row0 : self.row1]


@dataclass(frozen=True)
class LayerMap:
    """A layer of ``n_rows`` x ``n_cols`` cut into tiles of one macro.

    Attributes:
        spec: the macro.
        n_rows: the layer's rows K (inputs).
        n_cols: the layer's columns M (outputs).
        tiles: the tiles; every (row, column) of the layer is in exactly one.
    """

    spec: MacroSpec
    n_rows: int
    n_cols: int
    tiles: tuple[Tile, ...]

    def __post_init__(self) -> None:
        spec = self.spec
        cover = np.zeros((self.n_rows, self.n_cols), dtype=np.int64)
        for t in self.tiles:
            if not (0 <= t.row0 < t.row1 <= self.n_rows and 0 <= t.col0 < t.col1 <= self.n_cols):
                raise ShapeError(f"tile {t} lies outside the layer's {self.n_rows} x {self.n_cols} matrix")
            if not (0 <= t.macro_row and t.macro_row + t.n_rows <= spec.rows):
                raise ShapeError(f"tile {t} needs macro rows {t.macro_row}..{t.macro_row + t.n_rows - 1}, "
                                 f"outside 0..{spec.rows - 1}")
            if not (0 <= t.macro_col and t.macro_col + t.macro_cols <= spec.cols):
                raise ShapeError(f"tile {t} needs macro columns {t.macro_col}..{t.macro_col + t.macro_cols - 1}, "
                                 f"outside 0..{spec.cols - 1}")
            if t.paired and spec.weight_storage != "unsigned":
                raise ShapeError(f"tile {t} is paired, which only a unipolar (unsigned) macro needs")
            cover[t.row0 : t.row1, t.col0 : t.col1] += 1
        if cover.size and not (cover == 1).all():
            raise ShapeError("the tiles must cover every (row, column) of the layer exactly once")

    @property
    def n_pages(self) -> int:
        """Loads of the macro the layer needs."""
        return 1 + max((t.page for t in self.tiles), default=-1)

    def conversions_per_vector(self) -> int:
        """ADC conversions one input vector of the layer takes, all tiles together."""
        return sum(t.conversions_per_vector(self.spec) for t in self.tiles)

    def column_ranges(self) -> list[tuple[int, int]]:
        """The distinct ``(col0, col1)`` ranges, in order."""
        return sorted({(t.col0, t.col1) for t in self.tiles})

    def ideal_mac(self, inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """What an ideal macro returns for this layer: per tile ``MacroSpec`` levels -> ideal codes -> recombine,
        tiles of one column range added. Inputs [N, K] unsigned codes, weights [K, M] logical; int64 [N, M].

        The numpy reference of the definition (slow; for tests and deploy checks).
        """
        spec = self.spec
        x = np.asarray(inputs)
        w = np.asarray(weights)
        if x.ndim != 2 or x.shape[1] != self.n_rows:
            raise ShapeError(f"inputs must have shape [N, {self.n_rows}], got {list(x.shape)}")
        if w.shape != (self.n_rows, self.n_cols):
            raise ShapeError(f"weights must have shape {[self.n_rows, self.n_cols]}, got {list(w.shape)}")
        out = np.zeros((x.shape[0], self.n_cols), dtype=np.int64)
        for t in self.tiles:
            macro_w = np.zeros((spec.rows, spec.cols), dtype=np.int64)
            cols = slice(t.macro_col, t.macro_col + t.macro_cols)
            macro_w[t.macro_row : t.macro_row + t.n_rows, cols] = t.split_pairs(t.weights(w))
            levels = spec.ideal_levels(t.inputs(x), macro_w, t.macro_row)
            y = spec.recombine(spec.ideal_codes(levels), t.inputs(x))
            out[:, t.col0 : t.col1] += t.join_pairs(y[:, cols])
        return out


def map_layer(spec: MacroSpec, n_rows: int, n_cols: int) -> LayerMap:
    """Cut a ``n_rows`` x ``n_cols`` layer into tiles: full-height row ranges of ``spec.rows`` rows (the last one
    shorter) times column ranges of ``spec.cols`` columns, each tile on its own page at macro row 0, column 0.

    Raises:
        ShapeError: a dimension below 1.
    """
    for name, value in (("n_rows", n_rows), ("n_cols", n_cols)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ShapeError(f"layer {name} must be an integer >= 1, got {value!r}")
    tiles = []
    page = 0
    for c0 in range(0, n_cols, spec.cols):
        for r0 in range(0, n_rows, spec.rows):
            tiles.append(Tile(r0, min(r0 + spec.rows, n_rows), c0, min(c0 + spec.cols, n_cols), 0, 0, page))
            page += 1
    return LayerMap(spec, int(n_rows), int(n_cols), tuple(tiles))


def map_paired_layer(spec: MacroSpec, n_rows: int, n_cols: int) -> LayerMap:
    """Tiles of a layer of both signs on a unipolar (``unsigned``) macro: ``map_layer``'s cut with column ranges of
    ``cols // 2`` outputs, every tile paired (two adjacent macro columns per output), each on its own page.

    Raises:
        ConfigError: a macro that is not unipolar, or one of a single column.
        ShapeError: a dimension below 1.
    """
    if spec.weight_storage != "unsigned":
        raise ConfigError(f"only a unipolar (unsigned) macro stores a layer of both signs on column pairs; this one "
                          f"stores {spec.weight_storage!r}")
    if spec.cols < 2:
        raise ConfigError("a macro of one column holds no column pair")
    half = spec.cols // 2
    base = map_layer(spec, n_rows, n_cols)  # validates the dimensions
    tiles = []
    page = 0
    for c0 in range(0, n_cols, half):
        for r0 in range(0, n_rows, spec.rows):
            tiles.append(Tile(r0, min(r0 + spec.rows, n_rows), c0, min(c0 + half, n_cols), 0, 0, page, paired=True))
            page += 1
    return LayerMap(spec, base.n_rows, base.n_cols, tuple(tiles))


__all__ = ["POLARITIES", "LayerMap", "Tile", "map_layer", "map_paired_layer"]

"""Where each tile of a network sits on the macro, and in which load of it (*page*): the deployment schedule.

Cutting a layer into tiles is ``cimlab.mapping.map_layer``'s job (the one definition training shares). This module
only *places* those tiles: several small tiles share one load of the macro when their cells do not collide, and a
network that does not fit one load is split into pages that are programmed one after the other.

Rules of the placement:

- A tile keeps its cut (rows ``row0..row1``, columns ``col0..col1``); only ``macro_row``, ``macro_col`` and
  ``page`` change.
- ``macro_row`` is a multiple of ``spec.rows_per_conversion``: a tile starts at a row-group boundary, so its rows
  share conversions exactly as they do at macro row 0, where training put them (the same partial sums, the same
  number of conversions). Tiles therefore occupy whole row groups: a tile's footprint is ``ceil(n_rows / R)`` row
  groups by ``n_cols`` columns, and two tiles of one page may share row groups (other columns) or columns (other
  row groups), never a (group, column) cell. Driving one tile's rows leaves the other tiles' rows at input 0, and
  its outputs are read from its own columns only, so tiles of one page never disturb each other.
- Weight-stationary over a batch: tiles are taken in execution order (layer order, then the tile order of
  ``map_layer``) and a page holds a contiguous run of them, so one inference batch loads each page once, in order.
  A page is filled greedily: the next tile joins the current page if the page's tiles, placed again
  first-fit-decreasing (tallest first, lowest free column, then lowest free row group), still fit; otherwise the
  page is closed and the tile opens the next one.

Packing modes (``PACK_MODES``):

- ``rows`` (default): tiles keep the macro columns ``map_layer`` gives them (training's placement) and share pages
  only by stacking in free row groups. An error model has one table per physical column, and the columns of a macro
  differ (gain, offset): a network trained per column at training's placement then meets the same columns on the
  chip.
- ``full``: tiles may also move to other columns (fewest pages). Only for a network whose training did not depend
  on the columns (or for a model trained at this placement).
- ``none``: one tile per page at macro row 0, column 0, as ``map_layer`` places them (most reprogramming).

Polarity on a unipolar (``unsigned``) macro: a layer whose weights are all of one sign (trained ``unipolar-pos`` or
``unipolar-neg``, or found so by the polarity search) is tiled as usual and holds magnitudes, one array; a layer of
both signs is named in ``plan(paired=...)`` and its tiles are *paired* (``cimlab.mapping.Tile.paired``): each output
takes two adjacent macro columns (positive and negative part), so its column ranges are ``cols // 2`` wide, and the
pair is placed, packed and serialised as one unit of its tile: a pair is never split across pages, rows or
columns. (A ``differential`` macro pairs every weight in hardware, on its second array.)

Per-chip column placement (``column_order``, set by ``cimlab.deploy.placement``): the tiles' ``macro_col`` are the
schedule's own (*logical*) columns, and logical column ``c`` sits on the chip's macro column ``column_order[c]`` on
every page, with all its weight slices. Page images are stored as the chip holds them; the runner reads each
logical column's outputs from its chip column. A schedule with paired tiles moves whole pairs (``2u``, ``2u+1`` to
an even column and the next). None: logical and chip columns are the same.

``programming_passes_per_batch`` is 0 for a one-page network (programmed once by deploy, never again) and the
number of pages otherwise (every batch loads page 0, 1, ... in turn).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import LayerMap, Tile, map_layer, map_paired_layer

PACK_MODES = ("rows", "full", "none")
"""How tiles share pages (see the module docstring)."""


@dataclass(frozen=True)
class PlacedTile:
    """A tile with the layer it belongs to."""

    layer: str
    index: int
    tile: Tile


@dataclass(frozen=True)
class Schedule:
    """Every CIM layer's tiles with their placement on the macro.

    Attributes:
        spec: the macro.
        layers: ``(layer name, LayerMap)`` in execution order; each LayerMap's tiles carry their placement.
        pack: the packing mode that placed the tiles (``PACK_MODES``).
        column_order: the chip's macro column of each logical macro column (see the module docstring), or None.
    """

    spec: MacroSpec
    layers: tuple[tuple[str, LayerMap], ...]
    pack: str = "rows"
    column_order: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.pack not in PACK_MODES:
            raise ConfigError(f"packing mode {self.pack!r} is not one of {', '.join(PACK_MODES)}")
        names = [name for name, _ in self.layers]
        if len(set(names)) != len(names):
            raise ConfigError(f"layer names must be unique, got {names}")
        for name, lm in self.layers:
            if lm.spec != self.spec:
                raise ConfigError(f"layer {name!r} is mapped for another MacroSpec")
        check_no_collisions(self.spec, list(self.tiles()))
        if self.column_order is not None:
            check_column_order(self.spec, self.column_order, any(p.tile.paired for p in self.tiles()))

    @property
    def n_pages(self) -> int:
        """Loads of the macro one inference needs."""
        return 1 + max((p.tile.page for p in self.tiles()), default=-1)

    @property
    def programming_passes_per_batch(self) -> int:
        """Pages programmed per inference batch once deployed: 0 when the network fits one load."""
        return 0 if self.n_pages <= 1 else self.n_pages

    def layer_map(self, name: str) -> LayerMap:
        """The LayerMap of layer ``name``."""
        for n, lm in self.layers:
            if n == name:
                return lm
        raise ConfigError(f"no layer {name!r} in the schedule; layers: {', '.join(n for n, _ in self.layers)}")

    def tiles(self) -> Iterator[PlacedTile]:
        """Every tile, in execution order."""
        for name, lm in self.layers:
            for i, t in enumerate(lm.tiles):
                yield PlacedTile(name, i, t)

    def page_tiles(self, page: int) -> list[PlacedTile]:
        """The tiles of one page."""
        if not 0 <= page < max(self.n_pages, 1):
            raise ConfigError(f"page {page} is outside 0..{self.n_pages - 1}")
        return [p for p in self.tiles() if p.tile.page == page]

    def chip_columns(self) -> np.ndarray:
        """The chip's macro column of each logical macro column, int64 [cols] (the identity when unplaced)."""
        if self.column_order is None:
            return np.arange(self.spec.cols, dtype=np.int64)
        return np.asarray(self.column_order, dtype=np.int64)

    def physical_order(self) -> np.ndarray:
        """The chip's physical column of each logical physical column ``j = k * cols + c``, int64 [physical_cols]:
        the order ``cimlab.training.transfer.Transfer.permuted`` takes to see the chip's columns at this
        placement."""
        k = np.arange(self.spec.n_slices, dtype=np.int64)[:, None] * self.spec.cols
        return (k + self.chip_columns()[None, :]).reshape(-1)

    def placed_on(self, column_order: Sequence[int] | np.ndarray | None) -> Schedule:
        """The same tiles and pages with ``column_order`` (None: unplaced)."""
        order = None if column_order is None else tuple(int(c) for c in column_order)
        return Schedule(self.spec, self.layers, self.pack, order)

    def utilization(self, page: int) -> float:
        """Fraction of the macro's cells holding a tile's weight on ``page``."""
        used = sum(p.tile.n_rows * p.tile.macro_cols for p in self.page_tiles(page))
        return used / (self.spec.rows * self.spec.cols)

    def summary(self) -> dict[str, Any]:
        """Figures for reports: pages, passes, utilization per page."""
        return {
            "layers": len(self.layers),
            "tiles": sum(len(lm.tiles) for _, lm in self.layers),
            "pages": self.n_pages,
            "pack": self.pack,
            "programming_passes_per_batch": self.programming_passes_per_batch,
            "utilization": [round(self.utilization(p), 4) for p in range(self.n_pages)],
            "column_order": None if self.column_order is None else list(self.column_order),
        }

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the package manifest's ``schedule``)."""
        out: dict[str, Any] = {
            "pack": self.pack,
            "pages": self.n_pages,
            "programming_passes_per_batch": self.programming_passes_per_batch,
            "layers": [
                {
                    "name": name,
                    "n_rows": lm.n_rows,
                    "n_cols": lm.n_cols,
                    "tiles": [[t.row0, t.row1, t.col0, t.col1, t.macro_row, t.macro_col, t.page, int(t.paired)]
                              for t in lm.tiles],
                }
                for name, lm in self.layers
            ],
        }
        if self.column_order is not None:
            out["column_order"] = list(self.column_order)
        return out

    @classmethod
    def from_dict(cls, spec: MacroSpec, data: Any) -> Schedule:
        """Rebuild from ``to_dict``'s form; ArtifactError naming what is malformed."""
        try:
            layers = []
            for entry in data["layers"]:
                if any(len(t) not in (7, 8) for t in entry["tiles"]):
                    raise ValueError("a tile needs 7 or 8 integers (row0 row1 col0 col1 macro_row macro_col page "
                                     "[paired])")
                tiles = tuple(Tile(*(int(v) for v in t[:7]), paired=bool(int(t[7])) if len(t) == 8 else False)
                              for t in entry["tiles"])
                lm = LayerMap(spec, int(entry["n_rows"]), int(entry["n_cols"]), tiles)
                layers.append((str(entry["name"]), lm))
            order = data.get("column_order")
            if order is not None and not isinstance(order, list):
                raise ValueError("column_order must be a list of macro columns")
            sched = cls(spec, tuple(layers), str(data["pack"]),
                        None if order is None else tuple(int(c) for c in order))
        except (KeyError, TypeError, ValueError, ConfigError) as err:
            raise ArtifactError(f"package schedule is malformed: {err}") from err
        if "pages" in data and int(data["pages"]) != sched.n_pages:
            raise ArtifactError(f"package schedule states {data['pages']} pages but its tiles use {sched.n_pages}")
        return sched


def footprint(spec: MacroSpec, tile: Tile) -> tuple[int, int]:
    """(row groups, macro columns) a tile occupies at a group-aligned placement (a paired tile: both columns of
    every pair)."""
    return math.ceil(tile.n_rows / spec.rows_per_conversion), tile.macro_cols


def check_column_order(spec: MacroSpec, order: Sequence[int], paired: bool) -> None:
    """ConfigError unless ``order`` is a permutation of the macro's columns (that moves whole column pairs when
    ``paired``)."""
    a = np.asarray(order)
    if a.shape != (spec.cols,) or not np.array_equal(np.sort(a), np.arange(spec.cols)):
        raise ConfigError(f"a column order is a permutation of the macro's {spec.cols} columns (0..{spec.cols - 1}), "
                          f"got {len(a)} entries")
    if paired and (spec.cols % 2 or (a[0::2] % 2).any() or not np.array_equal(a[1::2], a[0::2] + 1)):
        raise ConfigError("a schedule with paired tiles moves whole column pairs: logical columns 2u and 2u+1 go "
                          "to an even chip column and the next")


def check_no_collisions(spec: MacroSpec, placed: Sequence[PlacedTile]) -> None:
    """ConfigError when two tiles of one page share a (row group, column) cell or a tile is not group-aligned."""
    R = spec.rows_per_conversion
    grids: dict[int, np.ndarray] = {}
    for p in placed:
        t = p.tile
        if t.macro_row % R:
            raise ConfigError(f"tile {p.index} of layer {p.layer!r} starts at macro row {t.macro_row}, "
                              f"not a multiple of rows_per_conversion={R}")
        if t.page < 0:
            raise ConfigError(f"tile {p.index} of layer {p.layer!r} has page {t.page} < 0")
        grid = grids.setdefault(t.page, np.zeros((spec.n_groups, spec.cols), dtype=bool))
        g0 = t.macro_row // R
        h, w = footprint(spec, t)
        block = grid[g0 : g0 + h, t.macro_col : t.macro_col + w]
        if block.any():
            raise ConfigError(f"tile {p.index} of layer {p.layer!r} collides with another tile on page {t.page}")
        block[...] = True


def _first_free(grid: np.ndarray, h: int, w: int, max_g: int, col: int | None) -> tuple[int, int] | None:
    """Lowest free column (only ``col`` when given), then lowest row group, where an h x w block of ``grid`` is all
    free."""
    G, C = grid.shape
    if h > G or w > C or max_g < 0:
        return None
    s = np.zeros((G + 1, C + 1), dtype=np.int64)
    s[1:, 1:] = grid.astype(np.int64).cumsum(0).cumsum(1)
    win = s[h:, w:] - s[:-h, w:] - s[h:, :-w] + s[:-h, :-w]  # [G-h+1, C-w+1] occupied cells per window
    win = win[: max_g + 1]
    if col is not None:
        if col > C - w:
            return None
        win = win[:, col : col + 1]
    free = np.argwhere((win == 0).T)  # (column, group) pairs in column-major order
    if free.size == 0:
        return None
    c, g = free[0]
    return int(g), int(c) + (col or 0)


def _place(spec: MacroSpec, items: Sequence[PlacedTile], page: int, keep_columns: bool) -> list[PlacedTile] | None:
    """Place ``items`` on one page first-fit-decreasing; None when they do not fit together."""
    R = spec.rows_per_conversion
    grid = np.zeros((spec.n_groups, spec.cols), dtype=bool)
    order = sorted(range(len(items)), key=lambda i: (-footprint(spec, items[i].tile)[0],
                                                      -footprint(spec, items[i].tile)[1], i))
    placed: list[PlacedTile | None] = [None] * len(items)
    for i in order:
        t = items[i].tile
        h, w = footprint(spec, t)
        pos = _first_free(grid, h, w, (spec.rows - t.n_rows) // R, t.macro_col if keep_columns else None)
        if pos is None:
            return None
        g, c = pos
        grid[g : g + h, c : c + w] = True
        moved = Tile(t.row0, t.row1, t.col0, t.col1, macro_row=g * R, macro_col=c, page=page, paired=t.paired)
        placed[i] = PlacedTile(items[i].layer, items[i].index, moved)
    return [p for p in placed if p is not None]


def plan(spec: MacroSpec, layers: Sequence[tuple[str, int, int]], *, pack: str = "rows",
         paired: Collection[str] = ()) -> Schedule:
    """The schedule of a network whose CIM layers are ``(name, rows K, columns M)`` in execution order.

    Args:
        spec: the macro.
        layers: the CIM layers in the order the network runs them.
        pack: ``rows``, ``full`` or ``none`` (see the module docstring).
        paired: layers of both signs to store on column pairs of a unipolar macro (see the module docstring).

    Raises:
        ConfigError: no layers, duplicate names, a dimension below 1, an unknown packing mode, or ``paired``
            naming a layer the network does not have or a macro that is not unipolar.
    """
    if pack not in PACK_MODES:
        raise ConfigError(f"packing mode {pack!r} is not one of {', '.join(PACK_MODES)}")
    if not layers:
        raise ConfigError("a network needs at least one CIM layer to deploy")
    names = [str(name) for name, _, _ in layers]
    if len(set(names)) != len(names):
        raise ConfigError(f"layer names must be unique, got {names}")
    unknown = sorted(set(paired) - set(names))
    if unknown:
        raise ConfigError(f"paired names layer(s) {', '.join(unknown)} the network does not have")
    maps = [(str(name), map_paired_layer(spec, k, m) if name in paired else map_layer(spec, k, m))
            for name, k, m in layers]
    items = [PlacedTile(name, i, t) for name, lm in maps for i, t in enumerate(lm.tiles)]
    if pack == "none":
        placed = [PlacedTile(p.layer, p.index, Tile(p.tile.row0, p.tile.row1, p.tile.col0, p.tile.col1, 0, 0, n,
                                                     paired=p.tile.paired))
                  for n, p in enumerate(items)]
    else:
        keep = pack == "rows"
        placed = []
        page = 0
        current: list[PlacedTile] = []
        current_placed: list[PlacedTile] = []
        for item in items:
            trial = _place(spec, [*current, item], page, keep)
            if trial is not None:
                current, current_placed = [*current, item], trial
                continue
            placed += current_placed
            page += 1
            alone = _place(spec, [item], page, keep)
            if alone is None:  # cannot happen: map_layer's tiles fit the macro
                raise ConfigError(f"tile {item.tile} of layer {item.layer!r} does not fit the macro")
            current, current_placed = [item], alone
        placed += current_placed
    by_layer: dict[str, list[Tile]] = {name: [None] * len(lm.tiles) for name, lm in maps}  # type: ignore[misc]
    for p in placed:
        by_layer[p.layer][p.index] = p.tile
    out = tuple((name, LayerMap(spec, lm.n_rows, lm.n_cols, tuple(by_layer[name]))) for name, lm in maps)
    return Schedule(spec, out, pack)


__all__ = ["PACK_MODES", "PlacedTile", "Schedule", "check_column_order", "check_no_collisions", "footprint",
           "map_paired_layer", "plan"]

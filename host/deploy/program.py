"""``cimlab deploy``: program a package's weights, verify them by read-back, rewrite what differs (numpy only).

``deploy_package`` makes the macro hold exactly one page's image (cells outside every tile hold 0):

1. the chip's HELLO is checked against the package (protocol, register map, MacroSpec);
2. every row is read back and compared with the image; only rows that differ are written (so deploying twice
   writes nothing the second time and leaves the chip as deploying once: idempotent);
3. after each write pass the rows are read back again; rows still differing are rewritten, at most
   ``max_rewrites`` times; what still differs then (a stuck SRAM bit, a broken row driver) is reported cell by cell
   with the tile, layer row and layer column it belongs to.

``PageLoader`` switches pages during inference: it writes the rows in which the next page's image differs from the
current one, checks the chip's CRC echo of every frame, and rewrites flagged frames (bounded the same way).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.deploy.package import DeployPackage
from cimlab.driver import Chip

DEFAULT_MAX_REWRITES = 3
"""Rewrites of a row that still differs after the first write, before it is reported."""


@dataclass(frozen=True)
class CellMismatch:
    """A macro cell that does not hold what the package wants after every rewrite.

    ``macro_col`` is the chip's column (a placed schedule's logical column differs); ``layer``/``tile``/
    ``layer_row``/``layer_col`` are None for a cell outside every tile (it should hold 0).
    """

    page: int
    macro_row: int
    macro_col: int
    expected: int
    read: int
    layer: str | None
    tile: int | None
    layer_row: int | None
    layer_col: int | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return dict(self.__dict__)


@dataclass
class DeployReport:
    """What ``deploy_package`` did.

    Attributes:
        page: the page programmed.
        chip_id: the chip's identity.
        rows: rows compared.
        rows_written: rows sent, all passes together (0 when the chip already held the image).
        passes: write passes (0 when nothing differed; at most ``1 + max_rewrites``).
        crc_flagged: frames whose CRC echo differed from what was sent.
        mismatches: cells still differing at the end.
        seconds: wall time.
        bytes_out, bytes_in: link bytes the deploy took.
    """

    page: int
    chip_id: str
    rows: int
    rows_written: int = 0
    passes: int = 0
    crc_flagged: int = 0
    mismatches: list[CellMismatch] = field(default_factory=list)
    seconds: float = 0.0
    bytes_out: int = 0
    bytes_in: int = 0

    @property
    def ok(self) -> bool:
        """True when the chip holds the page exactly."""
        return not self.mismatches

    def by_tile(self) -> dict[str, int]:
        """Mismatched cells per ``layer#tile`` (``(outside tiles)`` for the rest)."""
        c = Counter("(outside tiles)" if m.layer is None else f"{m.layer}#{m.tile}" for m in self.mismatches)
        return dict(sorted(c.items()))

    def as_dict(self, max_cells: int = 200) -> dict[str, Any]:
        """JSON-friendly dict (at most ``max_cells`` cells listed; the count is always complete)."""
        return {
            "page": self.page, "chip_id": self.chip_id, "ok": self.ok, "rows": self.rows,
            "rows_written": self.rows_written, "passes": self.passes, "crc_flagged": self.crc_flagged,
            "mismatched_cells": len(self.mismatches), "mismatched_by_tile": self.by_tile(),
            "mismatched_rows": sorted({m.macro_row for m in self.mismatches}),
            "mismatched_cols": sorted({m.macro_col for m in self.mismatches}),
            "cells": [m.as_dict() for m in self.mismatches[:max_cells]],
            "seconds": self.seconds, "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
        }


def row_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D mask as ``(start, length)``."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b - a)) for a, b in zip(edges[0::2], edges[1::2], strict=True)]


def locate(pkg: DeployPackage, page: int, read: np.ndarray) -> list[CellMismatch]:
    """The cells of ``read`` [rows, cols] that differ from the page's image, with the tile each belongs to."""
    image = pkg.page_image(page)
    cells = np.argwhere(read != image)
    owners = pkg.schedule.page_tiles(page)
    logical = np.argsort(pkg.schedule.chip_columns())  # the schedule's column of each chip column
    out = []
    for r, chip_c in cells:
        r, c = int(r), int(logical[chip_c])
        owner = None
        for p in owners:
            t = p.tile
            if t.macro_row <= r < t.macro_row + t.n_rows and t.macro_col <= c < t.macro_col + t.macro_cols:
                owner = p
                break
        chip_c = int(chip_c)
        expected, got = int(image[r, chip_c]), int(read[r, chip_c])
        if owner is None:
            out.append(CellMismatch(page, r, chip_c, expected, got, None, None, None, None))
        else:
            t = owner.tile
            out.append(CellMismatch(page, r, chip_c, expected, got, owner.layer, owner.index,
                                    t.row0 + r - t.macro_row, t.col0 + c - t.macro_col))
    return out


def _check_rewrites(max_rewrites: int) -> None:
    if isinstance(max_rewrites, bool) or not isinstance(max_rewrites, int) or not 0 <= max_rewrites <= 100:
        raise ConfigError(f"max_rewrites must be an integer in 0..100, got {max_rewrites!r}")


def deploy_package(chip: Chip, pkg: DeployPackage, *, page: int = 0,
                   max_rewrites: int = DEFAULT_MAX_REWRITES) -> DeployReport:
    """Make the chip hold page ``page`` of the package exactly (see the module docstring).

    Raises:
        VersionMismatch, ArtifactError: the chip is not the package's macro.
        ConfigError: a page outside the package or a bad ``max_rewrites``.
    """
    _check_rewrites(max_rewrites)
    hello = chip.hello
    pkg.check_hello(hello, f"the chip at {chip.link.url}")
    image = pkg.page_image(page)
    spec = pkg.spec
    t0 = time.perf_counter()
    out0, in0 = chip.stats.bytes_out, chip.stats.bytes_in
    rep = DeployReport(page=page, chip_id=hello.chip_id, rows=spec.rows)
    read = chip.read_weights(0, spec.rows)
    differ = (read != image).any(axis=1)
    while differ.any() and rep.passes < 1 + max_rewrites:
        for r0, n in row_runs(differ):
            rep.crc_flagged += len(chip.write_weights(image[r0 : r0 + n], r0))
        rep.rows_written += int(differ.sum())
        rep.passes += 1
        read = chip.read_weights(0, spec.rows)
        differ = (read != image).any(axis=1)
    rep.mismatches = locate(pkg, page, read) if differ.any() else []
    rep.seconds = time.perf_counter() - t0
    rep.bytes_out = chip.stats.bytes_out - out0
    rep.bytes_in = chip.stats.bytes_in - in0
    return rep


class PageLoader:
    """Keeps track of which page the chip holds and switches pages with as few row writes as possible.

    Args:
        chip: the chip (already checked against the package).
        pkg: the package.
        max_rewrites: rewrites of a frame whose CRC echo differs, before its rows are read back and reported.
    """

    def __init__(self, chip: Chip, pkg: DeployPackage, *, max_rewrites: int = DEFAULT_MAX_REWRITES) -> None:
        _check_rewrites(max_rewrites)
        self.chip = chip
        self.pkg = pkg
        self.max_rewrites = max_rewrites
        self.current: int | None = None
        self.loads = 0
        self.rows_written = 0
        self.mismatches: list[CellMismatch] = []
        self.reports: list[DeployReport] = []

    def verify(self, page: int) -> DeployReport:
        """Read the chip back and make it hold ``page`` (``deploy_package``); the chip then holds it."""
        rep = deploy_package(self.chip, self.pkg, page=page, max_rewrites=self.max_rewrites)
        self.reports.append(rep)
        self.rows_written += rep.rows_written
        self.mismatches += rep.mismatches
        self.current = page
        return rep

    def ensure(self, page: int) -> None:
        """Make the chip hold ``page``: nothing when it does, else write the rows that differ from the held one."""
        if self.current == page:
            return
        if self.current is None:
            self.verify(page)
            return
        image = self.pkg.page_image(page)
        differ = (self.pkg.page_image(self.current) != image).any(axis=1)
        pending = row_runs(differ)
        attempts = 0
        while pending and attempts < 1 + self.max_rewrites:
            flagged: list[tuple[int, int]] = []
            for r0, n in pending:
                flagged += self.chip.write_weights(image[r0 : r0 + n], r0)
                self.rows_written += n
            pending = flagged
            attempts += 1
        for r0, n in pending:  # still flagged: find the cells
            read = self.pkg.page_image(page).copy()
            read[r0 : r0 + n] = self.chip.read_weights(r0, n)
            self.mismatches += locate(self.pkg, page, read)
        self.loads += 1
        self.current = page


__all__ = ["DEFAULT_MAX_REWRITES", "CellMismatch", "DeployReport", "PageLoader", "deploy_package", "locate",
           "row_runs"]

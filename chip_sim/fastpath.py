"""Engines of the twin's fast MAC path: where the conversions of a batch are computed.

- ``CpuEngine`` (device ``cpu``, the default): one fused numba kernel (``cimlab.chip_sim.kernels``) on every core
  this process may use, in chunks of vectors and tiles of columns sized to this machine's caches per profile
  (``plan_for``); the threads last one MAC.
- ``TorchEngine`` (device ``cuda`` or ``cuda:N``): the same operations with torch on a GPU
  (``cimlab.chip_sim.torch_engine``, imported only then, so nothing else needs torch).

Both replay ``Converter.convert`` from its tables (``Converter.fused``) and draw the random items of vector ``v``
from the same PCG64 words as ``VectorStream.draw``, so they give the same codes as each other, as the numpy
definition and as the reference mode, however a batch is split.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from cimlab.chip_sim.analog import FusedConversion
from cimlab.firmware_bridge.errmodel import CodeSampler
from cimlab.firmware_bridge.errors import BackendUnavailable, ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

L1_DEFAULT = 32 * 1024
L2_DEFAULT = 1024 * 1024
TABLE_BYTES = 64 * 1024 * 1024
"""Largest pattern table a CPU engine keeps (bytes); a profile whose table would be larger uses fewer rows per
pattern, or sums rows one by one."""
LANES = 16
"""Columns per vector gather (``cimlab.chip_sim.kernels.LANES``)."""
GUIDE_BYTES = 8 * 1024 * 1024
"""Largest guide table of the data-driven draw (bytes); its buckets per row follow from it."""
GUIDE_BITS_MAX = 8
"""At most 2**8 buckets of uniforms per row in the guide table."""
NEAR_FIRST_SHARE = 0.9
"""The data-driven draw reads each row's near codes first (``near_tables``: two small tables) when they take at
least this share of the uniforms, on average over the rows; otherwise every draw starts from the guide table (one
read of a larger one). Measured on the bundled profiles' characterized models, in one process: the near codes
first are 1.4-1.6x faster at shares of 0.99-1.0, the guide 1.1x faster at 0.83 (``nvm-4bit``)."""
NEAR_BITS = 12
"""Bits of each bound in the near-codes table: a uniform's top ``NEAR_BITS`` bits are compared with them."""
MIN_PAIRS = 64
"""Fewest (vector, input slice) pairs per chunk: each tile of the pattern table is used by all of them while it sits
in cache."""


@lru_cache(maxsize=None)
def cache_bytes(level: int, default: int) -> int:
    """Size of this CPU's level-``level`` data cache (bytes), from Linux sysfs; ``default`` where unknown."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == str(level) and \
                    (index / "type").read_text().strip() in ("Data", "Unified"):
                text = (index / "size").read_text().strip().upper()
                unit = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
                return int(text.rstrip("KMG")) * unit
    except (OSError, ValueError):
        pass
    return default


@dataclass(frozen=True)
class Plan:
    """How the CPU engine computes a profile's MACs.

    Attributes:
        block_rows: rows whose input slices form one pattern of the pattern table (1 with ``use_table`` False:
            rows are summed one by one).
        use_table: partial sums from the pattern table (one table row per block) rather than row by row.
        tile: columns per tile: the table's (or the weights') slice for one row group and tile stays in cache
            while every vector of a chunk uses it.
        chunk: vectors per task of the thread pool: their random items and patterns fit in a quarter of L2.
    """

    block_rows: int
    use_table: bool
    tile: int
    chunk: int

    def table_bytes(self, spec: MacroSpec) -> int:
        """Bytes of the pattern table (0 when rows are summed one by one)."""
        if not self.use_table:
            return 0
        return _table_bytes(spec, self.block_rows, self.tile)


def _table_bytes(spec: MacroSpec, block_rows: int, tile: int = 1) -> int:
    blocks = -(-spec.rows_per_conversion // block_rows)
    columns = -(-spec.physical_cols // tile) * tile  # the last tile is padded
    return spec.n_groups * blocks * (1 << (block_rows * spec.input_slice_bits)) * columns * 4


def plan_for(spec: MacroSpec, item_bytes: int, *, l1: int | None = None, l2: int | None = None) -> Plan:
    """The plan for ``spec`` on this machine's caches (see ``Plan``).

    A chunk holds as many vectors as keep its random items and patterns within a quarter of L2, and at least
    ``MIN_PAIRS`` (vector, input slice) pairs. A pattern covers as many rows as one byte of input slices allows, but
    no more patterns than a quarter of the (vector, slice) pairs of a chunk, so each table row loaded is used about
    four times (on ``large``, 128 rows a conversion, 4-row patterns sum 1.2-1.5x faster than 5-row ones: the
    smaller table stays closer to the core); among widths that need as many blocks per group the narrower wins (a
    smaller table). A tile of columns keeps one group's table rows in a quarter of L2 (its weight rows in half of
    L1).
    """
    l1 = l1 or cache_bytes(1, L1_DEFAULT)
    l2 = l2 or cache_bytes(2, L2_DEFAULT)
    J, R, P, sb = spec.physical_cols, spec.rows_per_conversion, spec.n_planes, spec.input_slice_bits
    per_vector = spec.conversions_per_vector * item_bytes + P * spec.n_groups * R * 4
    chunk = max((l2 // 4) // per_vector, -(-MIN_PAIRS // P))
    block_rows = 0
    if sb <= 8:
        most_patterns = max(16, chunk * P // 4)
        for b in range(max(1, 8 // sb), 0, -1):
            if (1 << (b * sb)) <= most_patterns and _table_bytes(spec, b) <= TABLE_BYTES:
                block_rows = b
                break
        while block_rows > 1 and -(-R // (block_rows - 1)) == -(-R // block_rows):
            block_rows -= 1
    use_table = block_rows >= 1
    if use_table:
        per_column = -(-R // block_rows) * (1 << (block_rows * sb)) * 4
        tile = (l2 // 4) // per_column
    else:
        block_rows = 1
        tile = (l1 // 2) // (R * 4)
    tile = min(max(LANES, tile // LANES * LANES), J)
    return Plan(block_rows=block_rows, use_table=use_table, tile=tile, chunk=chunk)


def sampler_tables(sampler: CodeSampler) -> tuple[np.ndarray, ...]:
    """Per row of a ``CodeSampler`` (``level * J + column``): its most likely code (int32); that code's interval of
    uniforms, first | last << 32 (uint64); the bounds next to it, the one two codes below | the one a code above
    less one << 32 (uint64): a uniform below the interval but not below the first reads the code under the mode,
    one above it but not above the second the code over it."""
    rows, width = sampler.mode.size, sampler.width
    bounds = sampler.bounds.reshape(rows, width)
    mode = sampler.mode.astype(np.int64)
    r = np.arange(rows)
    below = np.where(mode >= 2, bounds[r, np.maximum(mode - 2, 0)], 0)
    above = np.where(mode + 1 < width, bounds[r, np.minimum(mode + 1, width - 1)], 1 << 32) - 1
    return mode.astype(np.int32), _pack(sampler.mode_lo, sampler.mode_hi - 1), _pack(below, above)


def guide_tables(sampler: CodeSampler) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """The CPU engine's indexed search of a ``CodeSampler``: a guide table (uint32, ``2**bits`` buckets of uniforms
    per row, ``bits`` as large as ``GUIDE_BYTES`` allows, at most ``GUIDE_BITS_MAX``) of the codes of each bucket's
    first and last uniform, low | high << 16; ``bits``; the rows' windows, each row's bounds strictly between 0 and
    ``2**32`` side by side (uint32, rows end to end); and per row where its window starts less its first code in it
    (int64), so that the bound of code ``c`` is ``window[rowbase + c]``."""
    rows, width = sampler.mode.size, sampler.width
    bounds = sampler.bounds.reshape(rows, width)
    r = np.arange(rows)
    bits = 0
    while bits < GUIDE_BITS_MAX and rows * 4 << (bits + 1) <= GUIDE_BYTES:
        bits += 1
    # codes of uniforms v (a count of the row's bounds <= v) for every row at once: rows laid end to end
    flat = (bounds + (r[:, None] << 33)).ravel()
    first = np.arange(1 << bits, dtype=np.int64) << (32 - bits)
    last = first + (1 << (32 - bits)) - 1

    def codes(v: np.ndarray) -> np.ndarray:
        return np.searchsorted(flat, (v[None, :] + (r[:, None] << 33)).ravel(), side="right") \
            - np.repeat(r * width, v.size)

    guide = codes(first).astype(np.uint32) | (codes(last).astype(np.uint32) << np.uint32(16))
    inside = (bounds > 0) & (bounds < 1 << 32)
    start = np.concatenate([[0], np.cumsum(np.count_nonzero(inside, axis=1))[:-1]])
    rowbase = start - np.count_nonzero(bounds == 0, axis=1)
    return guide, bits, bounds[inside].astype(np.uint32), rowbase.astype(np.int64)


def near_tables(sampler: CodeSampler) -> tuple[np.ndarray, np.ndarray, float]:
    """The CPU engine's first read of a ``CodeSampler``: per row (``level * J + column``), the three codes around its
    most likely one, ``c0 .. c0 + 2``, and the four bounds around them, ``B(c0 - 1) .. B(c0 + 2)`` (``B(c)``: the
    first uniform that reads a code above ``c``; ``B(-1) = 0``), each cut to its top ``NEAR_BITS`` bits. Two uint32
    tables, a = ``Q0 | Q1 << NEAR_BITS | (c0 & 0xFF) << 2 * NEAR_BITS`` and b = ``Q2 | Q3 << NEAR_BITS | (c0 >> 8)
    << 2 * NEAR_BITS`` (codes have at most 16 bits, as ADCs do).

    A uniform whose top bits ``q`` lie strictly between ``Q0`` and ``Q3`` and equal neither ``Q1`` nor ``Q2`` reads
    code ``c0 + (q > Q1) + (q > Q2)``, exactly: ``q > Q`` means ``u > B`` and ``q < Q`` means ``u < B`` for every
    uniform ``u`` of those top bits. Any other uniform (``2**-NEAR_BITS`` of the uniforms per bound, more outside
    the three codes) is left to the guide table. The third value is the three codes' share of the uniforms, the
    mean over rows."""
    rows, width = sampler.mode.size, sampler.width
    n_codes = sampler.spec.n_codes
    bounds = np.concatenate([np.zeros((rows, 1), np.int64), sampler.bounds.reshape(rows, width)[:, : n_codes - 1],
                             np.full((rows, 3), 1 << 32, np.int64)], axis=1)  # bounds[:, c + 1] = B(c)
    c0 = np.clip(sampler.mode.astype(np.int64) - 1, 0, max(n_codes - 3, 0))
    r = np.arange(rows)
    q = [np.minimum(bounds[r, c0 + i] >> (32 - NEAR_BITS), (1 << NEAR_BITS) - 1) for i in range(4)]
    a = q[0] | q[1] << NEAR_BITS | (c0 & 0xFF) << 2 * NEAR_BITS
    b = q[2] | q[3] << NEAR_BITS | (c0 >> 8) << 2 * NEAR_BITS
    share = float(np.mean(bounds[r, c0 + 3] - bounds[r, c0])) / 2**32
    return a.astype(np.uint32), b.astype(np.uint32), share


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo.astype(np.uint64) | (hi.astype(np.uint64) << np.uint64(32))


class Engine(Protocol):
    """Computes a MAC request's conversions (see the module docstring)."""

    def weights_changed(self, row0: int, n_rows: int) -> None:
        """Rows ``row0 .. row0+n_rows-1`` of the compute weights changed."""
        ...

    def mac(self, x: np.ndarray, row_start: int, g0: int, g1: int, weights: np.ndarray, rowsum: np.ndarray,
            op: FusedConversion, rng_state: np.ndarray | None, first_vector: int, *, raw: bool
            ) -> tuple[np.ndarray, np.ndarray]:
        """Inputs ``x`` [n, n_rows] of rows ``row_start ..`` over row groups ``g0 .. g1-1`` -> (codes
        [n, P, g1-g0, J] of the spec's code dtype when ``raw``, else slice-weighted code sums [n, J] int64:
        ``sum over groups and planes of code << (plane * input_slice_bits)``; per vector [level sum, word-line
        pulses] [n, 2] int64). ``weights`` [n_groups, R, J] float32 are the compute weights, ``rowsum``
        [n_groups * R] int64 their rows' effective digit sums; the items of vector ``v`` are words
        ``v * words .. `` of the PCG64 stream at ``rng_state`` (``VectorStream.pcg_state``)."""
        ...


class CpuEngine:
    """The fused numba kernel on this machine's cores (see ``cimlab.chip_sim.kernels``).

    Args:
        spec: the macro.
        threads: threads a batch is shared among (default: the cores this process may run on).
    """

    def __init__(self, spec: MacroSpec, threads: int | None = None) -> None:
        self.spec = spec
        self.threads = threads or default_threads()
        self._plans: dict[int, Plan] = {}
        self._dirty = np.ones(spec.n_groups, dtype=np.bool_)
        self._table: np.ndarray | None = None
        self._level_table: np.ndarray | None = None
        self._pulse_table: np.ndarray | None = None
        self._sampler_tables: tuple[CodeSampler, tuple[object, ...]] | None = None
        self._lut: tuple[np.ndarray, np.ndarray] | None = None

    def plan(self, item_bytes: int) -> Plan:
        """The plan for MACs that read ``item_bytes`` per conversion."""
        if item_bytes not in self._plans:
            self._plans[item_bytes] = plan_for(self.spec, item_bytes)
        return self._plans[item_bytes]

    def weights_changed(self, row0: int, n_rows: int) -> None:
        g0, g1 = self.spec.group_span(row0, n_rows)
        self._dirty[g0:g1] = True

    def _tables(self, plan: Plan, weights: np.ndarray, rowsum: np.ndarray) -> tuple[np.ndarray, ...]:
        spec = self.spec
        if not plan.use_table:
            z = np.zeros((1, 1, 1, 1, 1), np.float32)
            return z, np.zeros((1, 1, 1), np.int64), np.zeros(1, np.int64)
        blocks = -(-spec.rows_per_conversion // plan.block_rows)
        patterns = 1 << (plan.block_rows * spec.input_slice_bits)
        tiles = -(-spec.physical_cols // plan.tile)
        shape = (spec.n_groups, tiles, blocks, patterns, plan.tile)
        if self._table is None or self._table.shape != shape:
            self._table = np.empty(shape, dtype=np.float32)
            self._level_table = np.empty((spec.n_groups, blocks, patterns), dtype=np.int64)
            digits = (np.arange(patterns)[:, None] >> (spec.input_slice_bits * np.arange(plan.block_rows))) \
                & spec.slice_max
            self._pulse_table = np.count_nonzero(digits, axis=1).astype(np.int64)
            self._dirty[:] = True
        if self._dirty.any():
            self._k.build_tables(weights, rowsum, spec.input_slice_bits, plan.block_rows, self._dirty,
                                 self._table, self._level_table)
            self._dirty[:] = False
        return self._table, self._level_table, self._pulse_table  # type: ignore[return-value]

    def _analytic(self, op: FusedConversion) -> tuple[object, ...]:
        if self._lut is None or self._lut[0] is not op.lut:
            self._lut = (op.lut, np.asarray(op.lut, dtype=np.int32))  # type: ignore[arg-type]
        noisy = op.noise is not None and op.item_bytes
        return op.scale, op.shift, op.noise if noisy else np.zeros(0, np.float32), self._lut[1]

    def _sampled(self, op: FusedConversion) -> tuple[object, ...]:
        s = op.sampler
        if self._sampler_tables is None or self._sampler_tables[0] is not s:
            near_a, near_b, share = near_tables(s)
            self._sampler_tables = (s, (share >= NEAR_FIRST_SHARE, near_a, near_b, *guide_tables(s)))
        return self._sampler_tables[1]

    @property
    def _k(self):  # noqa: ANN202
        try:
            from cimlab.chip_sim import kernels  # numba and the kernels load on the first MAC, not with the twin
        except ImportError as err:
            raise BackendUnavailable(f"the twin's fast path needs numba, which this machine lacks: {err}") from err
        return kernels

    def mac(self, x: np.ndarray, row_start: int, g0: int, g1: int, weights: np.ndarray, rowsum: np.ndarray,
            op: FusedConversion, rng_state: np.ndarray | None, first_vector: int, *, raw: bool,
            stages: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See ``Engine.mac``; ``stages`` below ``kernels.ALL_STAGES`` leaves the later stages out (for timing:
        the results are then meaningless)."""
        spec, k = self.spec, self._k
        n = x.shape[0]
        P, J = spec.n_planes, spec.physical_cols
        item_bytes = op.item_bytes if rng_state is not None else 0
        plan = self.plan(item_bytes)
        table, level_table, pulse_table = self._tables(plan, weights, rowsum)
        words = math.ceil(spec.conversions_per_vector * item_bytes / 8)
        if raw:
            out = np.empty((n, P, g1 - g0, J), dtype=spec.code_dtype)
            sums = np.zeros((1, 1), dtype=np.int64)
        else:
            out = np.zeros((1, 1, 1, 1), dtype=spec.code_dtype)
            sums = np.zeros((n, J), dtype=np.int64)
        tally = np.empty((n, 2), dtype=np.int64)
        geometry = (P, spec.input_slice_bits, spec.n_groups, spec.rows_per_conversion, J, g0, g1, plan.chunk,
                    plan.tile, plan.block_rows, k.ALL_STAGES if stages is None else stages)
        f32 = np.zeros(0, dtype=np.float32)
        if op.kind == "analytic":
            kind = k.KIND_ANALYTIC
            analytic = self._analytic(op)
            sampled = (False, np.zeros(1, np.uint32), np.zeros(1, np.uint32), np.zeros(1, np.uint32), 0,
                       np.zeros(1, np.uint32), np.zeros(1, np.int64))
        else:
            kind = k.KIND_SAMPLED
            analytic = (f32, f32, f32, np.zeros(1, dtype=np.int32))
            sampled = self._sampled(op)
        state = rng_state if rng_state is not None else np.zeros(4, dtype=np.uint64)
        rng = (state, first_vector, words, item_bytes)
        xs = np.ascontiguousarray(x, dtype=np.uint16)
        sums_from = (table, level_table, pulse_table, plan.use_table, rowsum)
        threads = max(1, min(self.threads, -(-n // plan.chunk)))

        def part(first: int) -> None:
            k.fused_mac(xs, row_start, (*geometry, first, threads), weights, sums_from, kind, analytic, sampled, rng,
                        raw, out, sums, tally)

        run_parts(part, threads)
        return (out if raw else sums), tally


def default_threads() -> int:
    """Threads the CPU engine shares a batch among: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_parts(part: Callable[[int], None], threads: int) -> None:
    """``part(i)`` for ``i`` in ``range(threads)``, each on its own thread (the kernels release the GIL), the first
    on this one; returns when all are done, raising the first error any of them raised."""
    if threads <= 1:
        part(0)
        return
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            part(i)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            errors.append(err)

    helpers = [threading.Thread(target=run, args=(i,), name=f"cimlab-twin-{i}") for i in range(1, threads)]
    for t in helpers:
        t.start()
    run(0)
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]


def make_engine(spec: MacroSpec, device: str) -> Engine:
    """The engine for ``device``: ``cpu`` or a torch GPU device (``cuda``, ``cuda:N``)."""
    if device == "cpu":
        return CpuEngine(spec)
    if device == "cuda" or device.startswith("cuda:"):
        try:
            from cimlab.chip_sim.torch_engine import TorchEngine
        except ImportError as err:
            raise BackendUnavailable(f"device={device!r} needs torch (pip install 'cimlab[ml]'): {err}") from err
        return TorchEngine(spec, device)
    raise ConfigError(f"device={device!r} is not 'cpu', 'cuda' or 'cuda:N'")

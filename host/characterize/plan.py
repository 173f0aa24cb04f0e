"""The sweep plan: which weights to program and which inputs to stream so every column sees every level.

Everything follows from the MacroSpec. A conversion (input slice p, row group g, weight slice k, column c) reads

    s = sum over the rows r of group g of  a_p[r] * d_k[r, c]

with input slice values ``a`` in 0..slice_max and stored digits ``d`` in 0..dmax_k (``dmax_k`` is the largest
digit slice k can hold, derived from the weight range). The plan programs *row-uniform* weights (every column of
a row stores the same digit ``v``, clipped to each slice's ``dmax_k``), so every physical column of a row group
sees the same ideal level in the same conversion and all columns are swept at once.

Each row group of each batch carries a *digit profile*: all rows at the largest digit D ("full"), or all but one
or two rows at D and those at smaller digits. With products of input slices and digits these profiles reach
every level the macro can produce (checked against a dynamic program over all digit and input combinations;
levels no profile reaches are reported in ``unplanned_levels``). A level is targeted in a group with a profile
that reaches it; the input slices that make it are drawn uniformly among all decompositions of the level over the
group's rows (``row_mode="random"``: different rows, hence different cells, every time) or taken as the first
decomposition in row order (``row_mode="fixed"``: the same cells every time, to map per-cell error).

A ``differential`` macro stores a weight's positive part on one array and its negative part on the other, so no
weight puts a digit on both: the plan sweeps the positive array with weights ``+v`` and then the negative array with
the same batches' weights negated (``Batch.side``), twice the batches, each physical column of both arrays
targeted alike.

Slots: each (vector, input slice) of a batch is one target per row group. ``repeats`` targets of every level go
to every physical column (spread over the row groups). Batch ``i`` is a pure function of (spec, options, i):
its random draws come from ``numpy.random.default_rng([seed, i])``, so a resumed sweep repeats it exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

PLAN_VERSION = 1
ROW_MODES = ("random", "fixed")
TARGET_CONVERSIONS_PER_BATCH = 1 << 20
"""Default batch size aims at this many conversions (about 1 MiB of codes): large frames, short commits."""


@dataclass(frozen=True)
class PlanOptions:
    """What the user chooses about a sweep (JSON-able; stored in the measurement store).

    Attributes:
        repeats: targeted conversions per (physical column, level), at least.
        levels: the levels to target (None: every reachable level).
        columns: physical columns whose conversions are counted (None: all). Every column still converts.
        row_mode: ``random`` or ``fixed`` (see the module docstring).
        batch_vectors: MAC vectors per batch (None: about ``TARGET_CONVERSIONS_PER_BATCH`` conversions).
        seed: seed of the plan's random draws.
    """

    repeats: int = 64
    levels: tuple[int, ...] | None = None
    columns: tuple[int, ...] | None = None
    row_mode: str = "random"
    batch_vectors: int | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples)."""
        return {
            "repeats": self.repeats,
            "levels": None if self.levels is None else list(self.levels),
            "columns": None if self.columns is None else list(self.columns),
            "row_mode": self.row_mode,
            "batch_vectors": self.batch_vectors,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanOptions:
        """Inverse of ``to_dict`` (ConfigError on unknown keys)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"plan options have unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        d = dict(data)
        for key in ("levels", "columns"):
            if d.get(key) is not None:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d)


def parse_index_list(text: str, lo: int, hi: int, what: str) -> tuple[int, ...]:
    """``"0-7,12,20:32:4"`` -> sorted unique ints in ``lo..hi`` (``a-b`` inclusive, ``a:b[:step]`` exclusive)."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                fields = [int(f) for f in part.split(":")]
                if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] <= 0):
                    raise ValueError(part)
                out.update(range(*fields))
            elif "-" in part:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ConfigError(
                f"{what}: cannot read {part!r} (use N, A-B, A:B or A:B:STEP, comma-separated)"
            ) from None
    if not out:
        raise ConfigError(f"{what}: {text!r} selects nothing")
    bad = sorted(v for v in out if not lo <= v <= hi)
    if bad:
        raise ConfigError(f"{what}: {bad[:8]} outside the allowed range {lo}..{hi}")
    return tuple(sorted(out))


def slice_digit_max(spec: MacroSpec) -> np.ndarray:
    """Largest digit each weight slice can store, [n_slices] (from the weight range and storage)."""
    w = np.arange(spec.weight_min, spec.weight_max + 1, dtype=np.int64)[:, None]
    return spec.weights_to_slices(w)[:, :, 0].max(axis=0).astype(np.int64)


def digit_weights(spec: MacroSpec) -> np.ndarray:
    """Logical weight whose every slice k stores ``min(v, dmax_k)``, for v = 0 .. max digit: [D + 1] int64 (for
    ``differential`` storage every slice of the positive array; the negative array's hold 0, and the weight negated
    puts the same digits there)."""
    dmax = slice_digit_max(spec)
    if spec.weight_storage == "differential":
        dmax = np.where(np.arange(spec.n_slices) < spec.slices_per_side, dmax, 0)
    w = np.arange(spec.weight_min, spec.weight_max + 1, dtype=np.int64)
    digits = spec.weights_to_slices(w[:, None])[:, :, 0].astype(np.int64)  # [n_weights, n_slices]
    out = []
    for v in range(int(dmax.max()) + 1):
        want = np.minimum(v, dmax)
        hit = np.nonzero((digits == want).all(axis=1))[0]
        if hit.size == 0:
            raise ConfigError(
                f"no {spec.weight_bits}-bit {spec.weight_storage} weight stores digits {want.tolist()}"
            )
        out.append(int(w[hit[0]]))
    return np.array(out, dtype=np.int64)


def reachable_levels(n_rows: int, a_max: int, d_max: int) -> np.ndarray:
    """bool [n_rows * a_max * d_max + 1]: which sums of ``n_rows`` products ``a * d`` (a <= a_max, d <= d_max)
    exist."""
    products = np.unique(np.outer(np.arange(a_max + 1), np.arange(d_max + 1)).ravel())
    top = n_rows * a_max * d_max
    reach = np.zeros(top + 1, dtype=bool)
    reach[0] = True
    for _ in range(n_rows):
        nxt = np.zeros_like(reach)
        for p in products:
            nxt[p:] |= reach[: top + 1 - p]
        reach = nxt
    return reach


def _convolve_digit(ways: np.ndarray, d: int, a_max: int, bool_only: bool = False) -> np.ndarray:
    """Ways for one more row of digit ``d``: out[t] = sum over a of ways[t - a * d] (same length)."""
    out = np.zeros_like(ways)
    for a in range(a_max + 1):
        shift = a * d
        if shift < ways.size:
            if bool_only:
                out[shift:] |= ways[: ways.size - shift]
            else:
                out[shift:] += ways[: ways.size - shift]
    return out


def profile_reach(n_rows: int, d_full: int, special: tuple[int, ...], a_max: int) -> np.ndarray:
    """bool [top + 1]: levels that ``n_rows - len(special)`` rows at digit ``d_full`` plus rows at the ``special``
    digits can produce with input slices 0..a_max (``top = a_max * (sum of the digits)``)."""
    n_full = n_rows - len(special)
    top = a_max * (n_full * d_full + sum(special))
    reach = np.zeros(top + 1, dtype=bool)
    reach[: n_full * a_max * d_full + 1 : d_full] = True  # k full rows give exactly the multiples of d_full
    for d in special:
        reach = _convolve_digit(reach, d, a_max, bool_only=True)
    return reach


@dataclass(frozen=True)
class DigitProfile:
    """One row group's digits and the tables to decompose a level over its rows.

    Rows are processed in ``digits`` order: the ``special`` (lower) digits first, then ``n_full`` rows at
    ``d_full``. ``head[i][t]`` (i <= len(special)) is proportional to the number of input-slice choices of rows
    i.. that sum to t; ``full[k][q]`` the same for k full rows summing to ``q * d_full``. Each table is normalised
    on its own (only ratios within one table are used), so nothing overflows.
    """

    n_full: int
    d_full: int
    special: tuple[int, ...]
    a_max: int
    head: tuple[np.ndarray, ...] = field(repr=False)
    full: np.ndarray = field(repr=False)

    @classmethod
    def build(cls, n_rows: int, d_full: int, special: tuple[int, ...], a_max: int) -> DigitProfile:
        n_full = n_rows - len(special)
        if n_full < 0 or d_full < 1 or any(not 1 <= d <= d_full for d in special):
            raise ConfigError(f"bad digit profile: {n_rows} rows, full digit {d_full}, special digits {special}")
        # k full rows: the number of ways to write q as a sum of k values in 0..a_max (q = level / d_full)
        full = np.zeros((n_full + 1, n_full * a_max + 1))
        full[0, 0] = 1.0
        for k in range(1, n_full + 1):
            full[k] = _convolve_digit(full[k - 1], 1, a_max)
            full[k] /= full[k].max()
        top = a_max * (n_full * d_full + sum(special))
        tail = np.zeros(top + 1)
        tail[: n_full * a_max * d_full + 1 : d_full] = full[n_full]
        head = [tail]
        for d in reversed(special):
            nxt = _convolve_digit(head[0], d, a_max)
            head.insert(0, nxt / nxt.max())
        return cls(n_full, d_full, tuple(special), a_max, tuple(head), full)

    @property
    def digits(self) -> tuple[int, ...]:
        """Digit of each row in processing order."""
        return self.special + (self.d_full,) * self.n_full

    @property
    def reach(self) -> np.ndarray:
        """bool [top + 1]: the levels this profile can produce."""
        return self.head[0] > 0

    def _ways(self, i: int, t: np.ndarray) -> np.ndarray:
        """Table of rows i.. at levels ``t`` (any shape; 0 outside)."""
        m = len(self.special)
        if i <= m:
            table = self.head[i]
            ok = (t >= 0) & (t < table.size)
            return np.where(ok, table[np.clip(t, 0, table.size - 1)], 0.0)
        row = self.full[self.n_full - (i - m)]
        q = t // self.d_full
        ok = (t >= 0) & (t % self.d_full == 0) & (q < row.size)
        return np.where(ok, row[np.clip(q, 0, row.size - 1)], 0.0)

    def decompose(self, targets: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """Input slice values [n_targets, n_rows] whose products with ``digits`` sum to each target.

        ``rng`` draws uniformly among all decompositions; ``None`` takes the largest slice value row by row
        (the first decomposition in row order, deterministic).
        """
        rem = np.asarray(targets, dtype=np.int64).copy()
        digits = self.digits
        if self.a_max == 1 and not self.special:
            # equal digits, on/off inputs: a decomposition is a set of rem / d rows, drawn uniformly
            k = rem // self.d_full
            if np.any(k * self.d_full != rem) or np.any(k > self.n_full) or np.any(k < 0):
                raise AssertionError("a target outside the profile's reachable levels was decomposed")
            if rng is None:
                rank = np.broadcast_to(np.arange(self.n_full), (rem.size, self.n_full))
            else:
                rank = np.argsort(np.argsort(rng.random((rem.size, self.n_full)), axis=1), axis=1)
            return (rank < k[:, None]).astype(np.int64)
        out = np.zeros((rem.size, len(digits)), dtype=np.int64)
        a_vals = np.arange(self.a_max + 1, dtype=np.int64)
        for i, d in enumerate(digits):
            weight = self._ways(i + 1, rem[:, None] - a_vals[None, :] * d)  # [n, A+1]
            if rng is None:
                choice = self.a_max - np.argmax(weight[:, ::-1] > 0, axis=1)
            else:
                cum = np.cumsum(weight, axis=1)
                u = rng.random(rem.size) * cum[:, -1]
                choice = np.minimum((cum <= u[:, None]).sum(axis=1), self.a_max)
            out[:, i] = choice
            rem -= choice * d
        if np.any(rem != 0):
            raise AssertionError("a target outside the profile's reachable levels was decomposed")
        return out


@dataclass(frozen=True)
class Batch:
    """One batch of the plan: weights to program and inputs to stream."""

    index: int
    weights: np.ndarray
    """Logical weights [rows, cols] int64 (row-uniform)."""
    inputs: np.ndarray
    """Input codes [batch_vectors, rows] int64."""
    targets: np.ndarray
    """Targeted level [batch_vectors, n_planes, n_groups] for the swept array's slices whose dmax is the largest
    digit; -1 = idle."""
    side: int = 0
    """The array the batch sweeps: 0, or 1 for a ``differential`` macro's negative array (weights negated)."""

    def swept_slices(self, spec: MacroSpec) -> np.ndarray:
        """Indices of the weight slices on the array this batch sweeps."""
        per = spec.slices_per_side
        return np.arange(self.side * per, (self.side + 1) * per)


def check_options(spec: MacroSpec, options: PlanOptions) -> None:
    """ConfigError naming the first option outside its allowed range (columns against the MacroSpec)."""
    if not 1 <= options.repeats <= 10**9:
        raise ConfigError(f"repeats={options.repeats} is outside the allowed range 1..1000000000")
    if options.row_mode not in ROW_MODES:
        raise ConfigError(f"row_mode={options.row_mode!r} is not one of {', '.join(ROW_MODES)}")
    if not 0 <= options.seed < 2**63:
        raise ConfigError(f"seed={options.seed} is outside the allowed range 0..2**63-1")
    if options.columns is not None:
        bad = sorted(c for c in options.columns if not 0 <= c < spec.physical_cols)
        if bad:
            raise ConfigError(f"columns {bad[:8]} are outside the physical columns 0..{spec.physical_cols - 1}")
    if options.batch_vectors is not None and not 1 <= options.batch_vectors <= 65535:
        raise ConfigError(f"batch_vectors={options.batch_vectors} is outside the allowed range 1..65535")


def targeted_levels(options: PlanOptions, reachable: tuple[int, ...]) -> tuple[int, ...]:
    """The levels to target: the options' (each reachable), or every reachable level."""
    if options.levels is None:
        return reachable
    bad = sorted(set(options.levels) - set(reachable))
    if bad:
        raise ConfigError(
            f"levels {bad[:8]} are not reachable on this macro (reachable: 0..{reachable[-1]}, "
            f"{len(reachable)} levels)"
        )
    return tuple(sorted(set(options.levels)))


def _family_order(n: int, d_top: int) -> list[tuple[int, ...]]:
    """Digit profiles in the order they are tried: all rows full, then one row lower, then two rows lower."""
    family: list[tuple[int, ...]] = [()]
    family += [(r,) for r in range(1, d_top)]
    if n >= 2:
        family += [(r1, r2) for r1 in range(1, d_top) for r2 in range(r1, d_top)]
    return family


def profile_homes(levels: tuple[int, ...], n: int, d_top: int, a_max: int
                  ) -> tuple[dict[int, tuple[int, ...]], tuple[int, ...]]:
    """Each level's digit profile (its special digits): the first of the family that reaches it; and the levels no
    profile reaches. Reach sets are cheap; tables are built later for the profiles used only."""
    pending = set(levels)
    home: dict[int, tuple[int, ...]] = {}
    for special in _family_order(n, d_top):
        if not pending:
            break
        reach = profile_reach(n, d_top, special, a_max)
        for lv in sorted(pending):
            if lv < reach.size and reach[lv]:
                home[lv] = special
        pending -= set(home)
    return home, tuple(sorted(pending))


def spread_over_groups(levels: tuple[int, ...], home: dict[int, int], repeats: int, groups: int
                       ) -> list[dict[int, list[int]]]:
    """Targets per row group and profile: repeat r of level i goes to row group (i + r) % groups, so every level
    visits every group's cells."""
    per_group: list[dict[int, list[int]]] = [{} for _ in range(groups)]
    for r in range(repeats):
        for i, lv in enumerate(levels):
            per_group[(i + r) % groups].setdefault(home[lv], []).append(lv)
    return per_group


def batch_vectors_for(spec: MacroSpec, options: PlanOptions, per_group: list[dict[int, list[int]]],
                      target_planes: int) -> int:
    """MAC vectors per batch: the options', else about ``TARGET_CONVERSIONS_PER_BATCH`` conversions but no more
    vectors than the largest unit needs."""
    if options.batch_vectors is not None:
        return options.batch_vectors
    largest = max((len(v) for bp in per_group for v in bp.values()), default=1)
    return max(1, min(TARGET_CONVERSIONS_PER_BATCH // spec.conversions_per_vector, -(-largest // target_planes)))


def cut_units(by_profile: dict[int, list[int]], slots: int) -> list[tuple[int, np.ndarray]]:
    """One row group's targets cut by profile into units of ``slots``; the last unit of a profile is padded by
    cycling its own targets (extra counts, never fewer)."""
    units = []
    for pi in sorted(by_profile):
        lv = by_profile[pi]
        for start in range(0, len(lv), slots):
            chunk = lv[start : start + slots]
            units.append((pi, np.resize(np.array(chunk, dtype=np.int64), slots)))
    return units


class Plan:
    """A deterministic sweep plan for one MacroSpec (see the module docstring).

    Args:
        spec: the macro (from the chip's HELLO).
        options: the user's choices; ``levels`` must be reachable, ``columns`` inside the array.
    """

    def __init__(self, spec: MacroSpec, options: PlanOptions) -> None:
        check_options(spec, options)
        self.spec = spec
        self.options = options
        self.dmax = slice_digit_max(spec)
        self.d_top = int(self.dmax.max())
        self.a_max = spec.slice_max
        self.group_rows = spec.rows_per_conversion
        self.full_groups = spec.rows // spec.rows_per_conversion
        reach_all = reachable_levels(self.group_rows, self.a_max, self.d_top)
        self.reachable = tuple(int(s) for s in np.nonzero(reach_all)[0])
        levels = targeted_levels(options, self.reachable)
        # input slices that can hold slice_max (the top one may be narrower when input_bits is not a multiple)
        plane_max = spec.input_max >> (spec.input_slice_bits * np.arange(spec.n_planes))
        self.target_planes = tuple(int(p) for p in np.nonzero(plane_max >= spec.slice_max)[0])
        home_special, self.unplanned_levels = profile_homes(levels, self.group_rows, self.d_top, self.a_max)
        self.levels = tuple(lv for lv in levels if lv in home_special)
        used = sorted(set(home_special.values()), key=_family_order(self.group_rows, self.d_top).index)
        self.profiles = [DigitProfile.build(self.group_rows, self.d_top, sp, self.a_max) for sp in used]
        index = {sp: i for i, sp in enumerate(used)}
        self._home = {lv: index[sp] for lv, sp in home_special.items()}
        per_group = spread_over_groups(self.levels, self._home, options.repeats, self.full_groups)
        self.batch_vectors = batch_vectors_for(spec, options, per_group, len(self.target_planes))
        self.slots = self.batch_vectors * len(self.target_planes)  # targets per row group per batch
        self.units = [cut_units(by_profile, self.slots) for by_profile in per_group]
        self.batches_per_side = max((len(u) for u in self.units), default=0)
        self.n_batches = self.batches_per_side * spec.sides
        self.weight_of_digit = digit_weights(spec)

    # ---- identity ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything that defines the plan (stored with the measurements; compared on resume)."""
        return {
            "version": PLAN_VERSION,
            "spec": self.spec.to_dict(),
            "options": self.options.to_dict(),
            "batch_vectors": self.batch_vectors,
            "n_batches": self.n_batches,
            "levels": list(self.levels),
        }

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the plan's canonical JSON."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def column_mask(self) -> np.ndarray:
        """bool [J]: physical columns whose conversions are counted."""
        mask = np.zeros(self.spec.physical_cols, dtype=bool)
        if self.options.columns is None:
            mask[:] = True
        else:
            mask[list(self.options.columns)] = True
        return mask

    @property
    def conversions_per_batch(self) -> int:
        """ADC conversions one batch performs (all columns, all groups)."""
        return self.batch_vectors * self.spec.conversions_per_vector

    def expected_targets(self) -> np.ndarray:
        """Targeted conversions per level [n_levels] of one physical column over the plan (padding included)."""
        out = np.zeros(self.spec.n_levels, dtype=np.int64)
        for units in self.units:
            for _, targets in units:
                out += np.bincount(targets, minlength=self.spec.n_levels)
        return out

    # ---- batches ------------------------------------------------------------------------------------------------
    def batch(self, index: int) -> Batch:
        """Batch ``index`` (0 .. n_batches-1): a pure function of the plan and the index."""
        if not 0 <= index < self.n_batches:
            raise ConfigError(f"batch {index} is outside 0..{self.n_batches - 1}")
        spec = self.spec
        rng = np.random.default_rng([self.options.seed, index])
        side, unit = divmod(index, self.batches_per_side)
        random_rows = self.options.row_mode == "random"
        B, P, R = self.batch_vectors, spec.n_planes, self.group_rows
        tp = list(self.target_planes)
        row_digit = np.full(spec.rows, self.d_top, dtype=np.int64)
        planes = np.zeros((B, P, spec.rows), dtype=np.int64)
        targets = np.full((B, P, spec.n_groups), -1, dtype=np.int64)
        for g in range(self.full_groups):
            if unit >= len(self.units[g]):
                continue
            pi, unit_targets = self.units[g][unit]
            prof = self.profiles[pi]
            rows = np.arange(g * R, (g + 1) * R)
            if random_rows:
                rows = rng.permutation(rows)
                unit_targets = rng.permutation(unit_targets)
            row_digit[rows] = prof.digits
            a = prof.decompose(unit_targets, rng if random_rows else None)  # [slots, R] in profile order
            planes[np.ix_(np.arange(B), tp, rows)] = a.reshape(B, len(tp), R)
            targets[:, tp, g] = unit_targets.reshape(B, len(tp))
        shifts = spec.input_slice_bits * np.arange(P, dtype=np.int64)
        inputs = (planes << shifts[None, :, None]).sum(axis=1)
        weights = np.repeat(self.weight_of_digit[row_digit][:, None], spec.cols, axis=1)
        return Batch(index, -weights if side else weights, inputs, targets, side)

    def describe(self) -> str:
        """One line for humans."""
        return (
            f"{self.n_batches} batches x {self.batch_vectors} vectors ({self.conversions_per_batch:,} conversions "
            f"each); {len(self.levels)} levels x {self.options.repeats} repeats per column; "
            f"{len(self.profiles)} digit profile(s); rows {self.options.row_mode}"
            + ("; each array of the differential pair swept in turn" if self.spec.sides == 2 else "")
        )


__all__ = [
    "PLAN_VERSION",
    "ROW_MODES",
    "Batch",
    "DigitProfile",
    "Plan",
    "PlanOptions",
    "digit_weights",
    "parse_index_list",
    "reachable_levels",
    "slice_digit_max",
]

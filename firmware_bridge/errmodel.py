"""The error-model file: measured P(code | level s, column j) of one chip, and a vectorised sampler for it.

File format (``.npz``, readable with plain numpy, no pickle)::

    counts  integer array [J, n_levels, n_codes]: how often column j (= k * cols + c, see spec.py) read code
            ``code`` for a conversion whose ideal partial sum was level ``s`` (0 .. spec.s_max)
    meta    0-d unicode array holding a JSON object:
            {"format": "cimlab.errmodel", "version": 2, "spec": {MacroSpec fields},
             "conditions": {"vdd_mv": ..., "temp_c": ...}, "chip_id": "...", "provenance": {...},
             "counts_sha256": SHA-256 of the counts as little-endian int64}
    meta_sha256  0-d unicode array: SHA-256 of the meta text (the manifest is covered by its hash)

Loading trusts nothing: the meta is read first (its declared size capped), its hash checked, and the counts'
declared size compared with what its MacroSpec needs before they are decompressed; every problem is an
``ArtifactError`` naming the file and the field.

Probabilities are derived from counts, so models of the same chip can be merged by adding counts.

Fallback rule for a (column, level) with no counts: use the counts of all columns pooled at that level; if no
column saw that level either, the ideal ADC code (``MacroSpec.ideal_codes``) with probability 1. No smoothing is
added to observed rows, so a twin built from a model reproduces exactly the measured distributions.

Sampling is inverse-CDF with one 32-bit uniform per conversion against each row's cumulative counts scaled to
32-bit fixed point (``CodeSampler``); being integer arithmetic, a scalar and a vectorised draw of the same bits
give the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cimlab.firmware_bridge.errors import ArtifactError, ConfigError, ShapeError
from cimlab.firmware_bridge.files import NpzReader, atomic_path, check_manifest_hash, read_text_member, text_sha256
from cimlab.firmware_bridge.spec import MacroSpec

FORMAT = "cimlab.errmodel"
VERSION = 2
MAX_META_CHARS = 1 << 20
"""Longest meta text read, characters (a model's meta is a few kB)."""
MAX_COUNTS_BYTES = 1 << 31
"""Largest counts array read, bytes."""
_ROW_TOTAL_CAP = 2**30
"""Rows with more counts are rescaled (proportions kept to 2**-30) so ``cum << 32`` fits in int64."""


def _as_columns(spec: MacroSpec, a: np.ndarray, what: str) -> np.ndarray:
    """[..., n_slices, cols] or [..., J] -> [..., J]."""
    arr = np.asarray(a)
    J = spec.physical_cols
    if arr.ndim >= 2 and arr.shape[-2:] == (spec.n_slices, spec.cols):
        return arr.reshape(*arr.shape[:-2], J)
    if arr.ndim >= 1 and arr.shape[-1] == J:
        return arr
    raise ShapeError(
        f"{what} has shape {arr.shape}; its last axes must be (n_slices, cols) = {(spec.n_slices, spec.cols)} "
        f"or J = {J} physical columns"
    )


def _check_int_range(arr: np.ndarray, lo: int, hi: int, what: str) -> None:
    if arr.dtype.kind not in "iu":
        raise ShapeError(f"{what} must be an integer array, got dtype {arr.dtype}")
    if arr.size:
        amin, amax = int(arr.min()), int(arr.max())
        if amin < lo or amax > hi:
            raise ShapeError(f"{what} span {amin}..{amax}, outside the allowed {lo}..{hi}")


def count_conversions(spec: MacroSpec, levels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Tally conversions into counts [J, n_levels, n_codes] (int64).

    ``levels`` and ``codes`` have the same shape, ending in (n_slices, cols) as MAC_RAW does or in J.
    """
    s = _as_columns(spec, levels, "levels")
    c = _as_columns(spec, codes, "codes")
    if s.shape != c.shape:
        raise ShapeError(f"levels {s.shape} and codes {c.shape} must have the same shape")
    _check_int_range(s, 0, spec.s_max, "levels")
    _check_int_range(c, 0, spec.adc_max, "codes")
    J, L, C = spec.physical_cols, spec.n_levels, spec.n_codes
    j = np.arange(J, dtype=np.int64)
    index = (j * L + s.astype(np.int64)) * C + c.astype(np.int64)
    return np.bincount(index.ravel(), minlength=J * L * C).reshape(J, L, C)


@dataclass(eq=False)
class ErrorModel:
    """Counts of (column, level, code) plus what they were measured on.

    Attributes:
        spec: the MacroSpec of the measured chip.
        counts: int64 [J, n_levels, n_codes].
        chip_id: the chip's id from HELLO.
        conditions: measurement conditions, e.g. {"vdd_mv": 800, "temp_c": 25.0}.
        provenance: free JSON-able facts (tool version, sweep, date, ...).
    """

    spec: MacroSpec
    counts: np.ndarray
    chip_id: str = ""
    conditions: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = _validated_counts(self.spec, self.counts, "ErrorModel.counts", ShapeError)

    # ---- building ---------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, spec: MacroSpec, **meta: Any) -> ErrorModel:
        """A model with no counts yet."""
        counts = np.zeros((spec.physical_cols, spec.n_levels, spec.n_codes), dtype=np.int64)
        return cls(spec, counts, **meta)

    @classmethod
    def from_conversions(cls, spec: MacroSpec, levels: np.ndarray, codes: np.ndarray, **meta: Any) -> ErrorModel:
        """A model counting the given conversions (see ``count_conversions``)."""
        return cls(spec, count_conversions(spec, levels, codes), **meta)

    def add(self, levels: np.ndarray, codes: np.ndarray) -> None:
        """Add conversions to the counts, in place."""
        self.counts += count_conversions(self.spec, levels, codes)

    def merge(self, other: ErrorModel) -> ErrorModel:
        """A model with both models' counts (same MacroSpec required)."""
        if other.spec != self.spec:
            raise ArtifactError(
                f"cannot merge error models of different MacroSpecs: {self.spec.describe()} vs {other.spec.describe()}"
            )
        return ErrorModel(self.spec, self.counts + other.counts, self.chip_id, dict(self.conditions),
                          {"merged": [self.provenance, other.provenance]})

    # ---- derived ----------------------------------------------------------------------------------------
    @property
    def observed(self) -> np.ndarray:
        """bool [J, n_levels]: which (column, level) rows have counts."""
        return self.counts.sum(axis=2) > 0

    def effective_counts(self) -> np.ndarray:
        """Counts with the fallback rule applied to empty rows (see the module docstring), int64."""
        counts = self.counts.copy()
        totals = counts.sum(axis=2)
        pooled = counts.sum(axis=0)  # [L, C]
        empty = totals == 0
        if empty.any():
            jj, ss = np.nonzero(empty)
            counts[jj, ss] = pooled[ss]
            still = counts[jj, ss].sum(axis=1) == 0
            if still.any():
                ideal = self.spec.ideal_codes(ss[still])
                counts[jj[still], ss[still], ideal] = 1
        return counts

    def probabilities(self) -> np.ndarray:
        """P(code | level, column) [J, n_levels, n_codes] float64, fallback rule applied."""
        eff = self.effective_counts().astype(np.float64)
        return eff / eff.sum(axis=2, keepdims=True)

    def sampler(self) -> CodeSampler:
        """A vectorised sampler of this model's codes."""
        return CodeSampler(self.spec, self.effective_counts())

    def meta(self) -> dict[str, Any]:
        """The ``meta`` JSON object."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "spec": self.spec.to_dict(),
            "conditions": self.conditions,
            "chip_id": self.chip_id,
            "provenance": self.provenance,
            "counts_sha256": counts_sha256(self.counts),
        }

    # ---- files ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the ``.npz`` atomically (temporary file in the same folder, then ``os.replace``)."""
        target = Path(path)
        text = json.dumps(self.meta(), sort_keys=True)
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, counts=self.counts, meta=np.array(text), meta_sha256=np.array(text_sha256(text)))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> ErrorModel:
        """Read and validate a model file; ArtifactError naming the file and the field at fault."""
        max_file = MAX_COUNTS_BYTES + 8 * MAX_META_CHARS
        with NpzReader(path, "error model", max_file_bytes=max_file) as npz:
            where = npz.where
            text = read_text_member(npz, "meta", max_chars=MAX_META_CHARS)
            check_manifest_hash(where, text, read_text_member(npz, "meta_sha256", max_chars=64), "meta_sha256")
            meta = _parse_meta(where, text)
            spec = _meta_spec(where, meta)
            shape = (spec.physical_cols, spec.n_levels, spec.n_codes)
            need = int(np.prod(shape, dtype=np.int64)) * 8
            if need > MAX_COUNTS_BYTES:
                raise ArtifactError(f"{where}: meta.spec needs {need:,} bytes of counts, more than "
                                    f"{MAX_COUNTS_BYTES:,}")

            def expect(dtype: np.dtype, got: tuple[int, ...]) -> str | None:
                if dtype.kind not in "iu" or dtype.itemsize > 8:
                    return f"must be an integer array, got dtype {dtype}"
                if got != shape:
                    return (f"has shape {got}; the MacroSpec needs [J, n_levels, n_codes] = {shape} "
                            f"({spec.describe()})")
                return None

            counts = npz.read("counts", max_bytes=need + 4096, expect=expect)
        counts = _validated_counts(spec, counts, f"{where}: 'counts'", ArtifactError)
        if counts_sha256(counts) != meta.get("counts_sha256"):
            raise ArtifactError(f"{where}: 'counts' do not match meta.counts_sha256 (corrupt or edited file)")
        return cls(spec, counts, meta.get("chip_id", ""), meta.get("conditions", {}), meta.get("provenance", {}))


def counts_sha256(counts: np.ndarray) -> str:
    """SHA-256 of counts as little-endian int64 bytes."""
    return hashlib.sha256(np.ascontiguousarray(counts, dtype="<i8").tobytes()).hexdigest()


def _parse_meta(where: str, text: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{where}: 'meta' is not JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where}: 'meta' must be a JSON object")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{where}: meta.format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{where}: meta.version {meta.get('version')!r} is not supported ({VERSION})")
    for key, typ in (("conditions", dict), ("provenance", dict), ("chip_id", str), ("counts_sha256", str)):
        if not isinstance(meta.get(key, typ()), typ):
            raise ArtifactError(f"{where}: meta.{key} must be a JSON {typ.__name__}")
    return meta


def _meta_spec(where: str, meta: dict[str, Any]) -> MacroSpec:
    spec_data = meta.get("spec")
    if not isinstance(spec_data, dict):
        raise ArtifactError(f"{where}: meta.spec must be a JSON object of MacroSpec fields")
    try:
        return MacroSpec.from_dict(spec_data)
    except (ConfigError, TypeError, ValueError, OverflowError) as err:
        raise ArtifactError(f"{where}: meta.spec is not a valid MacroSpec: {err}") from err


def _validated_counts(spec: MacroSpec, counts: Any, what: str, error: type[Exception]) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.dtype.kind not in "iu":
        raise error(f"{what} must be an integer array, got dtype {arr.dtype}")
    shape = (spec.physical_cols, spec.n_levels, spec.n_codes)
    if arr.shape != shape:
        raise error(
            f"{what} has shape {arr.shape}; the MacroSpec needs [J, n_levels, n_codes] = {shape} "
            f"({spec.describe()})"
        )
    if arr.size and int(arr.min()) < 0:
        j, s, c = (int(v[0]) for v in np.nonzero(arr < 0))
        n_neg = int((arr < 0).sum())
        raise error(f"{what} has {n_neg} negative count(s), first at column {j}, level {s}, code {c}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 2**63:
        raise error(f"{what} has counts of 2**63 or more")
    return arr.astype(np.int64)


def _capped_rows(rows: np.ndarray) -> np.ndarray:
    """Rows of counts whose totals exceed ``_ROW_TOTAL_CAP`` rescaled below it (proportions kept)."""
    totals = rows.sum(axis=1)
    big = totals > _ROW_TOTAL_CAP
    if big.any():
        rows = rows.copy()
        scaled = rows[big].astype(object) * _ROW_TOTAL_CAP // totals[big][:, None]
        rows[big] = scaled.astype(np.int64)
    return rows


def cumulative_bounds(rows: np.ndarray) -> np.ndarray:
    """The inverse-CDF table of rows of counts [n, n_codes] (each row nonzero): int64 [n, n_codes - 1],
    ``bound[m] = floor(cum[m] * 2**32 / total)``; a 32-bit uniform ``u`` reads code ``#{m : bound[m] <= u}``.
    The twin (``CodeSampler``) and training (``cimlab.training.transfer``) both sample from this table."""
    rows = _capped_rows(np.asarray(rows, dtype=np.int64))
    totals = rows.sum(axis=1)
    if (totals <= 0).any():
        raise ShapeError("every row of counts needs some counts to sample from")
    cum = np.cumsum(rows, axis=1)
    return (cum[:, :-1] << 32) // totals[:, None]  # cum < 2**31, so the shift fits int64


class CodeSampler:
    """Draws codes for levels by inverse CDF with one 32-bit uniform per conversion (see the module docstring).

    Each (level, column) row's cumulative counts are scaled to 32-bit fixed point,
    ``bound[m] = floor(cum[m] * 2**32 / total)``, so a uniform ``u`` in 0 .. 2**32-1 reads code
    ``#{m < n_codes-1 : bound[m] <= u}``: a code with counts keeps a nonzero interval (totals are at most 2**30),
    a code without counts never occurs. Most conversions read their row's most likely code, so ``u`` is first
    checked against that code's interval; only the others run the branch-free binary search. Integer
    arithmetic throughout: ``sample_one`` (a scalar scan) and ``sample_bits`` agree exactly.

    Args:
        spec: the macro.
        counts: int64 [J, n_levels, n_codes] with every row nonzero (``ErrorModel.effective_counts``).
    """

    def __init__(self, spec: MacroSpec, counts: np.ndarray) -> None:
        self.spec = spec
        if counts.shape != (spec.physical_cols, spec.n_levels, spec.n_codes):
            raise ShapeError(
                f"counts have shape {list(counts.shape)}, expected [columns {spec.physical_cols}, levels "
                f"{spec.n_levels}, codes {spec.n_codes}] for {spec.describe()}"
            )
        J, L, C = counts.shape
        # rows ordered (level, column) so a row index is s * J + j
        rows = np.ascontiguousarray(counts.astype(np.int64).transpose(1, 0, 2)).reshape(L * J, C)
        totals = rows.sum(axis=1)
        if (totals == 0).any():
            j, level = int(np.argmax(totals == 0) % J), int(np.argmax(totals == 0) // J)
            raise ShapeError(
                f"column {j}, level {level} has no counts (every row needs some); sample from "
                "ErrorModel.effective_counts(), which fills empty rows"
            )
        rows = _capped_rows(rows)
        bounds = cumulative_bounds(rows)
        self.width = 1 << max(0, (C - 2).bit_length()) if C > 1 else 1
        table = np.full((L * J, self.width), 1 << 32, dtype=np.int64)
        table[:, : C - 1] = bounds
        self.bounds = table.reshape(-1)
        self.mode = rows.argmax(axis=1).astype(np.intp)
        edge = np.full((L * J, 1), 1 << 32, np.int64)
        padded = np.concatenate([np.zeros((L * J, 1), np.int64), bounds, edge], axis=1)
        r = np.arange(L * J)
        self.mode_lo = padded[r, self.mode]
        self.mode_hi = padded[r, self.mode + 1]
        self._cols = np.arange(J, dtype=np.intp)

    def sample_bits(self, levels: np.ndarray, bits: np.ndarray, *, check: bool = True) -> np.ndarray:
        """Codes [..., J] (intp) for levels [..., J] (integers 0..s_max) and 32-bit uniforms ``bits`` [..., J].

        ``check=False`` skips validating the levels (for callers that computed them in range).
        """
        s = np.asarray(levels)
        J = self.spec.physical_cols
        if s.ndim < 1 or s.shape[-1] != J:
            raise ShapeError(f"levels have shape {s.shape}; the last axis must be J = {J} physical columns")
        if np.shape(bits) != s.shape:
            raise ShapeError(f"bits {np.shape(bits)} must have the shape of levels {s.shape}")
        if check:
            _check_int_range(s, 0, self.spec.s_max, "levels")
        row = s.astype(np.intp) * J
        row += self._cols
        u = np.asarray(bits).astype(np.int64)
        codes = np.ascontiguousarray(self.mode[row])  # written through a flat view below
        miss = np.flatnonzero((u < self.mode_lo[row]) | (u >= self.mode_hi[row]))
        if miss.size:
            u_m = u.reshape(-1)[miss]
            base = row.reshape(-1)[miss] * self.width - 1
            pos = np.zeros(miss.size, dtype=np.intp)
            step = self.width // 2 if self.width > 1 else 0
            while step:
                cand = pos + step
                pos = np.where(self.bounds[base + cand] <= u_m, cand, pos)
                step //= 2
            # the search above covers width - 1 bounds; the last one needs its own look
            pos += self.bounds[base + pos + 1] <= u_m
            codes.reshape(-1)[miss] = pos
        return codes

    def sample(self, levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Codes [..., J] for levels [..., J], one uniform per conversion drawn from ``rng``."""
        bits = rng.integers(0, 2**32, size=np.shape(levels), dtype=np.uint32)
        return self.sample_bits(levels, bits)

    def sample_one(self, s: int, j: int, bits: int) -> int:
        """The code of one conversion (scalar scan; equals ``sample_bits`` on the same bits)."""
        row = s * self.spec.physical_cols + j
        bounds = self.bounds[row * self.width : (row + 1) * self.width]
        code = 0
        while code < self.width and int(bounds[code]) <= int(bits):
            code += 1
        return code

"""What one conversion returns, as torch tensors: the ADC transfer that the CIM layers draw codes from.

A ``Transfer`` maps an ideal partial sum ``s`` (level 0 .. s_max) of physical column ``j`` to an ADC code, and
gives the smoothed expected code ``E[code | s]`` and its slope for the backward pass. Three kinds:

- ``ideal``: the ideal ADC code ``MacroSpec.ideal_codes`` (the ``quant`` mode: the ideal quantized model);
- ``measured``: codes drawn from a measured error model (``cimlab.firmware_bridge.errmodel``, counts[j, s, code]),
  per physical column or pooled over columns (the D-MAC-EM of the paper);
- ``gaussian``: a parametric stand-in for comparison: ``round(mean + sigma * z)``, clipped, with the measured
  mean and sigma of each (column, level).

Sampling the measured table is inverse-CDF sampling with one 16-bit uniform ``u`` per conversion (from a numpy
``Generator``: deterministic given its seed): ``code = #{m : cum[m] <= u}`` with ``cum`` the cumulative
probabilities in units of 2**-16 (probabilities are resolved to 2**-16, as fine as the twin's own 16-bit noise
table). Small tables (pooled models) are one look-up per conversion over every value of ``u``; larger ones use a
guide table (Chen and Asau's indexed search) of ``T`` buckets of ``u`` holding the code at each bucket's left edge,
with ``T`` chosen so that one vectorised step ``code += (u >= cum[code])`` finishes the search (see
``Transfer._build_guide``). All layouts give the same code for the same ``u``.

The smoothed expected transfer (what the backward pass differentiates): ``m[j, s]`` is the mean code of each
(column, level); per column it is shrunk toward the pooled mean with ``prior`` pseudo-counts (empirical Bayes:
sparsely measured rows follow the pool); levels seen by no column take the ideal code. ``m_lin`` interpolates
``m`` linearly between levels (extended linearly past both ends), and the smoothed transfer is its moving average
over one ADC step, ``m~(s) = 1/(2h) * integral of m_lin over [s-h, s+h]`` with ``h = max(adc_lsb, 1) / 2``, so
``m~'(s) = (m_lin(s+h) - m_lin(s-h)) / (2h)``: for a one-level-per-code ADC that is the central difference, for a
coarser ADC the slope of its staircase averaged over one step.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

Kind = Literal["ideal", "measured", "gaussian"]
KINDS: tuple[str, ...] = ("ideal", "measured", "gaussian")
DIRECT_ENTRIES = 1 << 21
"""A measured table with at most this many (row, 16-bit uniform) entries is sampled with one direct look-up."""
GUIDE_ENTRIES = 1 << 22
"""Most entries of a guide table (rows x buckets)."""
UNIFORM_RANGE = 1 << 16
"""Sampled codes use one 16-bit uniform per conversion: probabilities are resolved to 2**-16."""
DEFAULT_PRIOR = 8.0
"""Pseudo-counts that pull a column's mean code toward the pooled mean (smoothing of sparse rows)."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def uniform16(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` uniform 16-bit integers (uint16): the bit generator's raw 64-bit outputs cut in four."""
    return rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]


def smoothing_half_width(spec: MacroSpec) -> float:
    """Half width ``h`` of the moving average that smooths the transfer, levels: ``max(adc_lsb, 1) / 2``."""
    return max(spec.adc_lsb, 1.0) / 2.0


def _segments(m: np.ndarray, t: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment index ``i``, left value ``m[i]`` and step ``m[i+1] - m[i]`` of ``m_lin`` at points ``t``."""
    L = m.shape[1]
    i = np.clip(np.floor(t), 0, max(L - 2, 0)).astype(np.int64)
    left = m[rows, i]
    step = m[rows, np.minimum(i + 1, L - 1)] - left
    return i, left, step


def linear_transfer(m: np.ndarray, t: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``m_lin`` of table rows ``rows`` at continuous levels ``t`` (same shapes), float64."""
    t = np.asarray(t, dtype=np.float64)
    i, left, step = _segments(m, t, rows)
    return left + step * (t - i)


def smoothed_transfer(m: np.ndarray, t: np.ndarray, rows: np.ndarray, h: float) -> np.ndarray:
    """``m~(t) = 1/(2h) * integral of m_lin over [t-h, t+h]`` (exact), float64."""
    m = np.asarray(m, dtype=np.float64)
    L = m.shape[1]
    # C[r, i] = integral of m_lin over [0, i]
    trap = 0.5 * (m[:, 1:] + m[:, :-1])
    C = np.concatenate([np.zeros((m.shape[0], 1)), np.cumsum(trap, axis=1)], axis=1)

    def antiderivative(x: np.ndarray) -> np.ndarray:
        i, left, step = _segments(m, x, rows)
        d = x - i
        return C[rows, np.minimum(i, L - 1)] + left * d + 0.5 * step * d * d

    t = np.asarray(t, dtype=np.float64)
    return (antiderivative(t + h) - antiderivative(t - h)) / (2.0 * h)


@dataclass(frozen=True)
class TransferInfo:
    """Where a transfer came from (goes into checkpoints and reports)."""

    kind: str
    pooled: bool
    source: str = ""
    sha256: str = ""
    chip_id: str = ""


class Transfer:
    """An ADC transfer for the CIM layers (see the module docstring). Build with ``ideal``, ``from_model`` or
    ``load``; all tables live on the CPU as torch tensors.

    Attributes:
        spec: the macro.
        kind: ``ideal``, ``measured`` or ``gaussian``.
        pooled: one table for all columns (True) or one per physical column.
        mean: float64 [n_tables, n_levels], the smoothed mean code per (column, level) before the moving average.
        slope_table: float32 tensor [n_tables * n_levels], ``m~'(s)`` at each integer level, codes per level,
            indexed ``s * n_tables + j``.
        layout: how the measured table is sampled (``direct``, ``packed`` or ``search``; see ``_build_guide``).
        guide_buckets, guide_steps: ``T`` and ``B`` of the guide table (0 for ``ideal``).
    """

    def __init__(self, spec: MacroSpec, kind: Kind, pooled: bool, mean: np.ndarray, *,
                 probabilities: np.ndarray | None = None, sigma: np.ndarray | None = None,
                 info: TransferInfo | None = None) -> None:
        if kind not in KINDS:
            raise ConfigError(f"transfer kind {kind!r} is not one of {', '.join(KINDS)}")
        self.spec = spec
        self.kind = kind
        self.pooled = pooled
        self.info = info or TransferInfo(kind, pooled)
        L = spec.n_levels
        self.n_tables = 1 if pooled else spec.physical_cols
        if mean.shape != (self.n_tables, L):
            raise ConfigError(f"mean transfer has shape {mean.shape}, expected {(self.n_tables, L)}")
        self.mean = np.asarray(mean, dtype=np.float64)
        self.h = smoothing_half_width(spec)
        rows = np.repeat(np.arange(self.n_tables), L).reshape(self.n_tables, L)
        s = np.broadcast_to(np.arange(L, dtype=np.float64), (self.n_tables, L))
        slope = (linear_transfer(self.mean, s + self.h, rows) - linear_transfer(self.mean, s - self.h, rows)) / (
            2.0 * self.h
        )
        # tables indexed by row = s * n_tables + j
        self.slope_table = torch.from_numpy(np.ascontiguousarray(slope.T).reshape(-1).astype(np.float32))
        ideal = spec.ideal_codes(np.arange(L))
        self.ideal_table = torch.from_numpy(ideal.astype(np.float32))
        self.lossless = bool(np.array_equal(ideal, np.arange(L)))
        """The ideal ADC returns every level as its own code (no rounding, no clipping)."""
        self.shortcut = True
        self.layout = ""
        self.guide_buckets = 0
        self.guide_steps = 0
        if kind == "measured":
            if probabilities is None:
                raise ConfigError("a measured transfer needs probabilities [n_tables, n_levels, n_codes]")
            self._build_guide(np.asarray(probabilities, dtype=np.float64))
        elif kind == "gaussian":
            if sigma is None:
                raise ConfigError("a gaussian transfer needs sigma [n_tables, n_levels]")
            self.mu_table = torch.from_numpy(np.ascontiguousarray(self.mean.T).reshape(-1).astype(np.float32))
            sig = np.ascontiguousarray(np.asarray(sigma).T).reshape(-1)
            self.sigma_table = torch.from_numpy(sig.astype(np.float32))

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def ideal(cls, spec: MacroSpec, *, shortcut: bool = True) -> Transfer:
        """The ideal ADC: ``code = MacroSpec.ideal_codes(s)``.

        ``shortcut``: where the ADC resolves every level, layers compute ``codes @ weights`` directly (exact);
        ``False`` decomposes into conversions anyway (timing comparisons, tests).
        """
        mean = spec.ideal_codes(np.arange(spec.n_levels)).astype(np.float64)[None, :]
        tr = cls(spec, "ideal", True, mean, info=TransferInfo("ideal", True, "ideal ADC"))
        tr.shortcut = shortcut
        return tr

    @classmethod
    def from_model(cls, model: ErrorModel, *, pooled: bool = True, kind: Kind = "measured",
                   prior: float = DEFAULT_PRIOR, source: str = "", sha256: str = "") -> Transfer:
        """A transfer from a measured error model (``cimlab.firmware_bridge.errmodel.ErrorModel``, or anything with
        ``.model`` holding one, such as ``cimlab.errmodel.MacErrorModel``).

        ``pooled``: one distribution per level for all columns; otherwise per physical column (with the file's
        fallback rule for unmeasured rows). ``kind``: ``measured`` (draw from the table) or ``gaussian``.
        """
        from cimlab.errmodel import MacErrorModel

        model = getattr(model, "model", model)
        if not isinstance(model, ErrorModel):
            raise ConfigError(f"expected an error model, got {type(model).__name__}")
        if kind not in ("measured", "gaussian"):
            raise ConfigError(f"a transfer from an error model is 'measured' or 'gaussian', not {kind!r}")
        if not (prior >= 0 and np.isfinite(prior)):
            raise ConfigError(f"prior must be a finite number >= 0, got {prior}")
        view = MacErrorModel(model)
        spec = model.spec
        L, C = spec.n_levels, spec.n_codes
        codes = np.arange(C, dtype=np.float64)
        ideal = spec.ideal_codes(np.arange(L)).astype(np.float64)
        pooled_counts = view.pooled_counts().astype(np.float64)  # [L, C]
        pn = view.totals(pooled=True)
        pooled_mean = view.mean_transfer(pooled=True)
        pooled_mean = np.where(pn > 0, pooled_mean, ideal)  # levels nobody measured: the ideal code
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled_second = np.where(pn > 0, pooled_counts @ codes**2 / pn, pooled_mean**2)
        if pooled:
            eff = pooled_counts.copy()
            empty = pn == 0
            eff[empty, ideal[empty].astype(np.int64)] = 1.0
            probs = (eff / eff.sum(axis=1, keepdims=True))[None]
            mean = pooled_mean[None]
            second = pooled_second[None]
        else:
            # each column's mean code, shrunk toward the pooled mean with ``prior`` pseudo-counts
            n = view.totals().astype(np.float64)  # [J, L]
            m = np.nan_to_num(view.mean_transfer())  # [J, L]; NaN (unmeasured) rows weigh 0
            counts = model.counts.astype(np.float64)
            weight = np.maximum(n + prior, 1e-300)
            mean = np.where(n + prior > 0, (n * m + prior * pooled_mean[None]) / weight, pooled_mean[None])
            second = np.where(n + prior > 0, (counts @ codes**2 + prior * pooled_second[None]) / weight,
                              pooled_second[None])
            eff = model.effective_counts().astype(np.float64)
            probs = eff / eff.sum(axis=2, keepdims=True)
        var = np.maximum(second - mean**2, 0.0)
        info = TransferInfo(kind, pooled, source, sha256, model.chip_id)
        if kind == "gaussian":
            return cls(spec, "gaussian", pooled, mean, sigma=np.sqrt(var), info=info)
        return cls(spec, "measured", pooled, mean, probabilities=probs, info=info)

    @classmethod
    def load(cls, path: str | os.PathLike, *, pooled: bool = True, kind: Kind = "measured",
             prior: float = DEFAULT_PRIOR) -> Transfer:
        """A transfer from an error model file (``dmacem.npz``); ArtifactError if it is unreadable."""
        p = Path(path)
        model = ErrorModel.load(p)
        return cls.from_model(model, pooled=pooled, kind=kind, prior=prior, source=str(p), sha256=file_sha256(p))

    # ---- sampling tables ----------------------------------------------------------------------------------
    def _build_guide(self, probs: np.ndarray) -> None:
        """Sampling tables. ``code(u) = #{m < C-1 : cum[m] <= u}`` for a 16-bit uniform ``u``; three layouts:

        - ``direct`` (small tables): ``code = table[row * 2**16 + u]``, one gather;
        - ``packed``: ``T`` buckets of ``u`` chosen so that no bucket holds more than one step of the CDF; each
          entry packs the code at the bucket's left edge with the CDF step above it (``code << 17 | cum[code]``),
          so ``code = e >> 17; code += u >= (e & 0x1FFFF)`` finishes the search;
        - ``search``: guide codes plus ``B`` vectorised steps ``code += (u >= cum[row, code])``.
        """
        spec = self.spec
        L, C = spec.n_levels, spec.n_codes
        if probs.shape != (self.n_tables, L, C):
            raise ConfigError(f"probabilities have shape {probs.shape}, expected {(self.n_tables, L, C)}")
        rows = L * self.n_tables
        # rows ordered (level, column): row = s * n_tables + j
        p = probs.transpose(1, 0, 2).reshape(rows, C)
        cum = np.rint(np.cumsum(p, axis=1) * UNIFORM_RANGE).astype(np.int64)
        cum = np.minimum(np.maximum.accumulate(cum, axis=1), UNIFORM_RANGE)
        cum[:, -1] = UNIFORM_RANGE  # above every uniform: the search never passes the top code
        inner = cum[:, : C - 1]
        row_of = np.broadcast_to(np.arange(rows, dtype=np.int64)[:, None], inner.shape)

        def steps(bits: int) -> int:
            # CDF steps strictly inside a bucket: cum[m] in (t * w, (t + 1) * w - 1]
            w = 1 << (16 - bits)
            inside = (inner % w != 0) & (inner < UNIFORM_RANGE)
            keys = (row_of[inside] << 17) + (inner[inside] // w)
            return int(np.unique(keys, return_counts=True)[1].max(initial=0))

        if rows << 16 <= DIRECT_ENTRIES:
            self.layout, bits = "direct", 16
        else:
            fits = [b for b in range(17) if rows << b <= GUIDE_ENTRIES] or [0]
            ok = [b for b in fits if steps(b) <= 1]
            self.layout, bits = ("packed", ok[0]) if ok else ("search", fits[-1])
        T = 1 << bits
        shift = 16 - bits
        offs = np.arange(rows, dtype=np.int64)[:, None] << 17
        keys = (offs + inner).ravel()
        left = (np.arange(T, dtype=np.int64) << shift)[None, :]
        base = (np.arange(rows, dtype=np.int64) * (C - 1))[:, None]
        lo = np.searchsorted(keys, (offs + left).ravel(), side="right").reshape(rows, T) - base
        self.guide_buckets = T
        self.guide_shift = shift
        self.guide_steps = 0 if self.layout == "direct" else steps(bits)
        if self.layout == "packed":
            nxt = np.take_along_axis(cum, lo, axis=1)  # the CDF step above the left-edge code
            self.guide = torch.from_numpy(((lo << 17) | nxt).ravel().astype(np.int32))
        else:
            self.guide = torch.from_numpy(lo.ravel().astype(np.int64)).to(torch.uint8 if C <= 256 else torch.int32)
        self.cum = torch.from_numpy(cum.ravel().astype(np.int32))

    # ---- torch side ---------------------------------------------------------------------------------------
    def table_index(self, columns: np.ndarray) -> torch.Tensor:
        """Per physical column index into the tables (0 when pooled), int32 [n]."""
        j = np.zeros_like(columns) if self.pooled else np.asarray(columns)
        return torch.from_numpy(np.ascontiguousarray(j, dtype=np.int32).ravel())

    def _rows(self, levels: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Table row ``s * n_tables + j`` of each conversion, int32 (a new tensor)."""
        rows = levels.to(torch.int32)
        if self.n_tables > 1:
            rows.mul_(self.n_tables).add_(tables)
        return rows

    def codes(self, levels: torch.Tensor, tables: torch.Tensor, rng: np.random.Generator | None) -> torch.Tensor:
        """Codes (integer tensor: float32 levels for a lossless ideal ADC, uint8/int32 otherwise) for levels
        [..., n] (float32, integers 0..s_max) of columns with table index ``tables`` [n] (``table_index``).

        ``measured`` draws one 16-bit uniform per conversion and ``gaussian`` one float32 normal from ``rng``;
        ``ideal`` draws nothing.
        """
        if self.kind == "ideal":
            if self.lossless:
                return levels
            return self.ideal_table.index_select(0, levels.to(torch.int32).reshape(-1)).reshape(levels.shape)
        if rng is None:
            raise ConfigError(f"a {self.kind} transfer needs a random generator")
        rows = self._rows(levels, tables)
        n = levels.numel()
        if self.kind == "gaussian":
            z = torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).reshape(levels.shape)
            flat = rows.reshape(-1)
            z.mul_(self.sigma_table.index_select(0, flat).reshape(levels.shape))
            z.add_(self.mu_table.index_select(0, flat).reshape(levels.shape)).round_()
            return z.clamp_(0.0, float(self.spec.adc_max))
        u = torch.from_numpy(uniform16(rng, n)).reshape(levels.shape).to(torch.int32)
        if self.layout == "direct":
            idx = rows.mul_(UNIFORM_RANGE).add_(u)
            return self.guide.index_select(0, idx.reshape(-1)).reshape(levels.shape)
        idx = rows * self.guide_buckets
        if self.guide_shift:
            idx.add_(u >> self.guide_shift)
        else:
            idx.add_(u)
        entry = self.guide.index_select(0, idx.reshape(-1)).reshape(levels.shape)
        if self.layout == "packed":
            code = entry >> 17
            code.add_(u >= entry.bitwise_and_(0x1FFFF))
            return code
        code = entry.to(torch.int32)
        if self.guide_steps:
            base = rows.mul_(self.spec.n_codes)
            for _ in range(self.guide_steps):
                code.add_(u >= self.cum.index_select(0, (base + code).reshape(-1)).reshape(levels.shape))
        return code

    def slope(self, levels: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """``m~'(s)`` (codes per level, float32) for levels [..., n] of columns ``tables`` [n]."""
        return self.slope_table.index_select(0, self._rows(levels, tables).reshape(-1)).reshape(levels.shape)

    # ---- numpy views (reports, tests) ---------------------------------------------------------------------
    def expected(self, levels: np.ndarray, columns: np.ndarray | int = 0) -> np.ndarray:
        """The smoothed expected transfer ``m~(s)`` at continuous levels, codes (float64). ``columns``: the
        physical column of each level (ignored when pooled)."""
        t = np.asarray(levels, dtype=np.float64)
        rows = np.zeros(t.shape, dtype=np.int64) if self.pooled else np.broadcast_to(np.asarray(columns), t.shape)
        return smoothed_transfer(self.mean, t, rows, self.h)

    def describe(self) -> str:
        """One line for humans."""
        where = "pooled" if self.pooled else "per column"
        src = f" from {self.info.source}" if self.info.source else ""
        return f"{self.kind} transfer ({where}){src}"


def check_spec(expected: MacroSpec, got: MacroSpec, what: str) -> None:
    """ArtifactError naming the differing fields when ``got`` (of ``what``) is another macro than ``expected``."""
    if got != expected:
        from cimlab.errmodel import spec_differences

        diff = spec_differences(expected, got, "expected", what)
        raise ArtifactError(f"{what} is for another MacroSpec ({diff})")


__all__ = ["KINDS", "Transfer", "TransferInfo", "check_spec", "file_sha256", "smoothed_transfer",
           "smoothing_half_width"]

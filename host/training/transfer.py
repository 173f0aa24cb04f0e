"""What one conversion returns, as torch tensors: the ADC transfer that the CIM layers draw codes from.

A ``Transfer`` maps an ideal partial sum ``s`` (level 0 .. s_max) of physical column ``j`` to an ADC code, and
gives the smoothed expected code ``E[code | s]`` and its slope for the backward pass. Three kinds:

- ``ideal``: the ideal ADC code ``MacroSpec.ideal_codes`` (the ``quant`` mode: the ideal quantized model);
- ``measured``: codes drawn from a measured error model (``cimlab.firmware_bridge.errmodel``, counts[j, s, code]),
  per physical column or pooled over columns (the D-MAC-EM of the paper);
- ``gaussian``: a parametric stand-in for comparison: ``round(mean + sigma * z)``, clipped, with the measured
  mean and sigma of each (column, level).

Sampling the measured table is inverse-CDF sampling with one 32-bit uniform ``u`` per conversion (from the layer's
random stream: a numpy PCG64 ``Generator`` on the CPU, or a ``TorchStream`` on a torch device; deterministic given
its seed) on the *twin's own table*:
``bound[m] = floor(cum_counts[m] * 2**32 / total)`` (``cimlab.firmware_bridge.errmodel.cumulative_bounds``), code
``#{m : bound[m] <= u}``; so for the same uniform, training and the data-driven twin read the same code, and
probabilities are resolved to 2**-32 in both. The search runs on a guide table (Chen and Asau's indexed search):
``T`` buckets of ``u`` per row hold the code at each bucket's left edge, with ``T`` chosen so that, where it can
be, one vectorised comparison finishes the search (see ``Transfer._build_guide``). Everything is int32 tensors.

The smoothed expected transfer (what the backward pass differentiates): ``m[j, s]`` is the mean code of each
(column, level); per column it is shrunk toward the pooled mean with ``prior`` pseudo-counts (empirical Bayes:
sparsely measured rows follow the pool); levels seen by no column take the ideal code. ``m_lin`` interpolates
``m`` linearly between levels (extended linearly past both ends), and the smoothed transfer is its moving average
over one ADC step, ``m~(s) = 1/(2h) * integral of m_lin over [s-h, s+h]`` with ``h = max(adc_lsb, 1) / 2``, so
``m~'(s) = (m_lin(s+h) - m_lin(s-h)) / (2h)``: for a one-level-per-code ADC that is the central difference, for a
coarser ADC the slope of its staircase averaged over one step.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import torch

from cimlab.firmware_bridge.errmodel import ErrorModel, cumulative_bounds
from cimlab.firmware_bridge.errors import ArtifactError, ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

Kind = Literal["ideal", "measured", "gaussian"]
KINDS: tuple[str, ...] = ("ideal", "measured", "gaussian")
GUIDE_ENTRIES = 1 << 22
"""Most entries of a guide table (rows x buckets)."""
UNIFORM_BITS = 32
"""Sampled codes use one 32-bit uniform per conversion, as the twin does: probabilities are resolved to 2**-32."""
MAX_BUCKET_BITS = 16
"""Most bits of a uniform that choose its guide bucket."""
DEFAULT_PRIOR = 8.0
"""Pseudo-counts that pull a column's mean code toward the pooled mean (smoothing of sparse rows)."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def uniform32(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` uniform 32-bit integers as int32 bit patterns: the bit generator's raw 64-bit outputs cut in two."""
    return rng.bit_generator.random_raw((n + 1) // 2).view(np.int32)[:n]


STREAMS = ("pcg64", "device")
"""Random streams of a layer's sampled codes: ``pcg64`` (numpy, on the CPU; what the twin's sampler uses, copied to
the layer's device when it is not the CPU) or ``device`` (a torch generator on the layer's device: Philox on CUDA)."""


class TorchStream:
    """A random stream on a torch device: 32-bit uniforms and normals drawn where the layer computes (Philox on
    CUDA), so sampling on a GPU moves no random numbers across the bus. Deterministic given its seed and device.

    Args:
        seed: the stream's seed (a 63-bit integer).
        device: where the numbers are drawn.
    """

    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    def uniform32(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform 32-bit integers (int32 bit patterns) of ``shape`` on the stream's device."""
        return torch.randint(-(1 << 31), 1 << 31, shape, dtype=torch.int32, device=self.device,
                             generator=self.generator)

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal float32 numbers of ``shape`` on the stream's device."""
        return torch.randn(shape, dtype=torch.float32, device=self.device, generator=self.generator)

    @property
    def state(self) -> dict[str, str]:
        """The generator's state as JSON-friendly text (for training states)."""
        raw = self.generator.get_state().numpy().tobytes()
        return {"torch_stream": str(self.device.type), "state": base64.b64encode(raw).decode("ascii")}

    @state.setter
    def state(self, value: dict[str, str]) -> None:
        raw = np.frombuffer(base64.b64decode(value["state"]), dtype=np.uint8).copy()
        self.generator.set_state(torch.from_numpy(raw))


Stream: TypeAlias = np.random.Generator | TorchStream


def make_stream(seed: int, kind: str, device: torch.device) -> Stream:
    """A layer's random stream of kind ``pcg64`` or ``device`` (see ``STREAMS``), seeded with ``seed``."""
    if kind == "pcg64":
        return np.random.Generator(np.random.PCG64(int(seed)))
    if kind == "device":
        return TorchStream(seed, device)
    raise ConfigError(f"random stream {kind!r} is not one of {', '.join(STREAMS)}")


def draw_uniform32(rng: Stream, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform 32-bit integers (int32 bit patterns) of ``shape`` on ``device`` from a layer's stream."""
    if isinstance(rng, TorchStream):
        return rng.uniform32(shape)
    n = int(np.prod(shape))
    return torch.from_numpy(uniform32(rng, n)).reshape(shape).to(device)


def draw_normal(rng: Stream, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Standard normal float32 numbers of ``shape`` on ``device`` from a layer's stream."""
    if isinstance(rng, TorchStream):
        return rng.normal(shape)
    n = int(np.prod(shape))
    return torch.from_numpy(rng.standard_normal(n, dtype=np.float32)).reshape(shape).to(device)


def stream_state(rng: Stream) -> dict[str, Any]:
    """A stream's state as JSON-friendly data (numpy: its bit generator's state dict)."""
    return rng.state if isinstance(rng, TorchStream) else rng.bit_generator.state


def set_stream_state(rng: Stream, state: dict[str, Any]) -> None:
    """Put a state from ``stream_state`` back (ValueError when it is another kind of stream's)."""
    if isinstance(rng, TorchStream) != ("torch_stream" in state):
        raise ValueError("the saved random stream is of another kind (pcg64 vs device) than the layer's")
    if isinstance(rng, TorchStream):
        rng.state = state
    else:
        rng.bit_generator.state = state


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
class ColumnTrim:
    """The per-chip step at deploy time, per physical column: the host recombines ``(code - offset) * scale``
    instead of ``code`` (``scale = 1 / gain``), with each column's gain and offset from a short characterization
    of the chip (``from_model``). It takes the chip's static per-column line out of every conversion, which a
    correction of the recombined outputs cannot do: in two's complement a column's slices carry large terms of
    opposite sign, and a gain error on one slice does not cancel. Needs the raw codes (MAC_RAW) on the chip path.

    Attributes:
        offset: float64 [J], codes.
        scale: float64 [J], ideal codes per measured code (1 / gain).
        source: where the fit came from.
    """

    offset: np.ndarray
    scale: np.ndarray
    source: str = ""

    @classmethod
    def from_model(cls, model: ErrorModel, *, source: str = "") -> ColumnTrim:
        """Each physical column's least-squares line ``mean_code = gain * s / adc_lsb + offset`` over its unclipped
        levels (``cimlab.errmodel.MacErrorModel.gain_offset``); a column without a fit is left as it is."""
        from cimlab.errmodel import MacErrorModel

        fit = MacErrorModel(getattr(model, "model", model)).gain_offset()
        ok = np.isfinite(fit.gain) & np.isfinite(fit.offset) & (fit.gain > 0.25)
        return cls(np.where(ok, fit.offset, 0.0), np.where(ok, 1.0 / np.where(ok, fit.gain, 1.0), 1.0), source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ColumnTrim:
        """The trim fitted from an error model file (a short ``cimlab characterize`` of the chip)."""
        return cls.from_model(ErrorModel.load(path), source=str(path))


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
    ``load``; the tables are torch tensors on the CPU, or on ``device`` for a copy from ``to``.

    Attributes:
        spec: the macro.
        kind: ``ideal``, ``measured`` or ``gaussian``.
        pooled: one table for all columns (True) or one per physical column.
        mean: float64 [n_tables, n_levels], the smoothed mean code per (column, level) before the moving average.
        slope_table: float32 tensor [n_tables * n_levels], ``m~'(s)`` at each integer level, codes per level,
            indexed ``s * n_tables + j``.
        layout: how the measured table is sampled (``packed`` or ``search``; see ``_build_guide``).
        guide_buckets, guide_steps: ``T`` and ``B`` of the guide table (0 for ``ideal``).
    """

    def __init__(self, spec: MacroSpec, kind: Kind, pooled: bool, mean: np.ndarray, *,
                 counts: np.ndarray | None = None, sigma: np.ndarray | None = None,
                 info: TransferInfo | None = None) -> None:
        if kind not in KINDS:
            raise ConfigError(f"transfer kind {kind!r} is not one of {', '.join(KINDS)}")
        self.spec = spec
        self.kind = kind
        self.pooled = pooled
        self.info = info or TransferInfo(kind, pooled)
        self.device = torch.device("cpu")
        self._placed: dict[str, dict[str, torch.Tensor]] = {}
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
        self.trim: ColumnTrim | None = None
        self.layout = ""
        self.guide_buckets = 0
        self.guide_steps = 0
        if kind == "measured":
            if counts is None:
                raise ConfigError("a measured transfer needs counts [n_tables, n_levels, n_codes]")
            self._build_guide(np.asarray(counts))
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
            table = eff.astype(np.int64)[None]
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
            table = eff.astype(np.int64)
        var = np.maximum(second - mean**2, 0.0)
        info = TransferInfo(kind, pooled, source, sha256, model.chip_id)
        if kind == "gaussian":
            return cls(spec, "gaussian", pooled, mean, sigma=np.sqrt(var), info=info)
        return cls(spec, "measured", pooled, mean, counts=table, info=info)

    @classmethod
    def load(cls, path: str | os.PathLike, *, pooled: bool = True, kind: Kind = "measured",
             prior: float = DEFAULT_PRIOR) -> Transfer:
        """A transfer from an error model file (``dmacem.npz``); ArtifactError if it is unreadable."""
        p = Path(path)
        model = ErrorModel.load(p)
        return cls.from_model(model, pooled=pooled, kind=kind, prior=prior, source=str(p), sha256=file_sha256(p))

    # ---- sampling tables ----------------------------------------------------------------------------------
    def _build_guide(self, counts: np.ndarray) -> None:
        """Sampling tables from counts [n_tables, n_levels, n_codes] (each row nonzero), on the twin's bounds.

        Rows are ordered (level, column): row ``s * n_tables + j``. Uniforms travel as int32 bit patterns; a
        bucket is the top ``b`` bits of ``u``, the offset inside it the low ``32 - b`` bits. Two layouts:

        - ``packed``: ``b`` chosen so that no bucket holds more than one step of the CDF; each entry packs the code
          at the bucket's left edge with the offset of the step inside the bucket (``2**(32-b)``: none), so
          ``code = e >> (33 - b); code += offset(u) >= (e & mask)`` finishes the search;
        - ``search``: guide codes plus ``B`` vectorised steps ``code += (u > bound[row, code] - 1)``, compared as
          signed int32 after flipping the top bit (an order-preserving map of unsigned to signed).
        """
        spec = self.spec
        L, C = spec.n_levels, spec.n_codes
        if counts.shape != (self.n_tables, L, C):
            raise ConfigError(f"counts have shape {counts.shape}, expected {(self.n_tables, L, C)}")
        rows = L * self.n_tables
        bounds = cumulative_bounds(counts.transpose(1, 0, 2).reshape(rows, C))  # [rows, C-1] in 0 .. 2**32
        row_of = np.broadcast_to(np.arange(rows, dtype=np.int64)[:, None], bounds.shape)
        top = 1 << UNIFORM_BITS

        def steps(bits: int) -> int:
            # CDF steps strictly inside a bucket (a step on a bucket's left edge is in its guide code)
            w = 1 << (UNIFORM_BITS - bits)
            inside = (bounds % w != 0) & (bounds < top)
            keys = (row_of[inside] << MAX_BUCKET_BITS) + (bounds[inside] // w)
            return int(np.unique(keys, return_counts=True)[1].max(initial=0))

        fits = [b for b in range(spec.adc_bits + 2, MAX_BUCKET_BITS + 1) if rows << b <= GUIDE_ENTRIES]
        fits = fits or [spec.adc_bits + 2]
        ok = [b for b in fits if steps(b) <= 1]
        self.layout, bits = ("packed", ok[0]) if ok else ("search", fits[-1])
        T = 1 << bits
        shift = UNIFORM_BITS - bits
        left = np.arange(T, dtype=np.int64) << shift  # [T]
        # code at each bucket's left edge: #{m : bound[m] <= left}
        keys = ((np.arange(rows, dtype=np.int64)[:, None] << 33) + bounds).ravel()  # sorted: rows, then bounds
        query = (np.arange(rows, dtype=np.int64)[:, None] << 33) + left[None, :]
        base = (np.arange(rows, dtype=np.int64) * (C - 1))[:, None]
        lo = np.searchsorted(keys, query.ravel(), side="right").reshape(rows, T) - base  # [rows, T]
        self.guide_buckets = T
        self.guide_shift = shift
        self.guide_steps = steps(bits)
        padded = np.concatenate([bounds, np.full((rows, 1), top, np.int64)], axis=1)  # bound above the top code
        if self.layout == "packed":
            nxt = np.take_along_axis(padded, lo, axis=1) - left[None, :]  # the step above, from the left edge
            offset = np.minimum(nxt, 1 << shift)  # 2**shift: no step inside this bucket
            self.guide = torch.from_numpy(((lo << (shift + 1)) | offset).ravel().astype(np.int32))
        else:
            self.guide = torch.from_numpy(lo.ravel().astype(np.int32))
        # bound - 1 as signed int32 after flipping the top bit; bounds of 0 are never compared (see steps)
        self.cum = torch.from_numpy((np.maximum(padded - 1, 0) - (1 << 31)).ravel().astype(np.int32))

    TABLES = ("slope_table", "ideal_table", "guide", "cum", "mu_table", "sigma_table")
    """The attributes that hold the torch tables (those a transfer of its kind has)."""

    def to(self, device: torch.device | str) -> Transfer:
        """This transfer with its tables on ``device`` (a shallow copy; the moved tables are kept, so switching a
        layer between chips on a GPU copies each chip's tables once)."""
        device = torch.device(device)
        if device == self.device:
            return self
        key = str(device)
        if key not in self._placed:
            self._placed[key] = {name: getattr(self, name).to(device) for name in self.TABLES if hasattr(self, name)}
        out = copy.copy(self)
        for name, table in self._placed[key].items():
            setattr(out, name, table)
        out.device = device
        return out

    def trimmed(self, trim: ColumnTrim | None) -> Transfer:
        """This chip with its codes trimmed per physical column in the recombination (a shallow copy sharing the
        tables; None: untrimmed)."""
        if trim is not None and trim.offset.shape != (self.spec.physical_cols,):
            raise ConfigError(f"the trim has {trim.offset.shape[0]} columns, the macro {self.spec.physical_cols}")
        out = copy.copy(self)
        out.trim = trim
        return out

    def trim_vectors(self, columns: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(offset, scale) float32 [n] of the given physical columns, or None when untrimmed."""
        if self.trim is None:
            return None
        j = np.asarray(columns).ravel()
        return (torch.from_numpy(self.trim.offset[j].astype(np.float32)),
                torch.from_numpy(self.trim.scale[j].astype(np.float32)))

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

    def codes(self, levels: torch.Tensor, tables: torch.Tensor, rng: Stream | None) -> torch.Tensor:
        """Codes (integer tensor: float32 levels for a lossless ideal ADC, uint8/int32 otherwise) for levels
        [..., n] (float32, integers 0..s_max) of columns with table index ``tables`` [n] (``table_index``).

        ``measured`` draws one 32-bit uniform per conversion and ``gaussian`` one float32 normal from ``rng``;
        ``ideal`` draws nothing.
        """
        if self.kind == "ideal":
            if self.lossless:
                return levels
            return self.ideal_table.index_select(0, levels.to(torch.int32).reshape(-1)).reshape(levels.shape)
        if rng is None:
            raise ConfigError(f"a {self.kind} transfer needs a random generator")
        rows = self._rows(levels, tables)
        if self.kind == "gaussian":
            z = draw_normal(rng, tuple(levels.shape), levels.device)
            flat = rows.reshape(-1)
            z.mul_(self.sigma_table.index_select(0, flat).reshape(levels.shape))
            z.add_(self.mu_table.index_select(0, flat).reshape(levels.shape)).round_()
            return z.clamp_(0.0, float(self.spec.adc_max))
        u = draw_uniform32(rng, tuple(levels.shape), levels.device)
        return self.codes_from_uniforms(levels, tables, u, rows)

    def codes_from_uniforms(self, levels: torch.Tensor, tables: torch.Tensor, u: torch.Tensor,
                            rows: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (int32) of a measured transfer for levels [..., n] and 32-bit uniforms ``u`` (int32 bit
        patterns, the shape of ``levels``): the code the twin's ``CodeSampler.sample_bits`` reads for the same
        bits."""
        if self.kind != "measured":
            raise ConfigError(f"a {self.kind} transfer does not draw codes from uniforms")
        if rows is None:
            rows = self._rows(levels, tables)
        shape = levels.shape
        idx = rows * self.guide_buckets
        idx.add_((u >> self.guide_shift) & (self.guide_buckets - 1))
        entry = self.guide.index_select(0, idx.reshape(-1)).reshape(shape)
        if self.layout == "packed":
            code = entry >> (self.guide_shift + 1)
            code.add_((u & ((1 << self.guide_shift) - 1)) >= entry.bitwise_and_((2 << self.guide_shift) - 1))
            return code
        code = entry
        if self.guide_steps:
            signed = u ^ torch.tensor(-(1 << 31), dtype=torch.int32, device=u.device)
            base = rows.mul_(self.spec.n_codes)
            for _ in range(self.guide_steps):
                code.add_(signed > self.cum.index_select(0, (base + code).reshape(-1)).reshape(shape))
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


__all__ = ["KINDS", "STREAMS", "ColumnTrim", "Stream", "TorchStream", "Transfer", "TransferInfo", "check_spec",
           "draw_normal", "draw_uniform32", "file_sha256", "make_stream", "set_stream_state", "smoothed_transfer",
           "smoothing_half_width", "stream_state"]

"""What one conversion returns, as torch tensors: the ADC transfer that the CIM layers draw codes from.

A ``Transfer`` maps an ideal partial sum ``s`` (level 0 .. s_max) of physical column ``j`` to an ADC code, and
gives the smoothed expected code ``E[code | s]`` and its slope for the backward pass. Three kinds:

- ``ideal``: the ideal ADC code ``MacroSpec.ideal_codes`` (the ``quant`` mode: the ideal quantized model);
- ``measured``: codes drawn from a measured error model (``cimlab.firmware_bridge.errmodel``, counts[j, s, code]),
  per physical column or pooled over columns (the D-MAC-EM of the paper);
- ``gaussian``: a parametric stand-in for comparison: ``round(mean + sigma * z)``, clipped, with the measured
  mean and sigma of each (column, level), as its exact discretized table.

Every kind is sampled the same way: inverse-CDF sampling with one 32-bit uniform ``u`` per conversion on the
*twin's own table*: ``bound[m] = floor(cum_counts[m] * 2**32 / total)``
(``cimlab.firmware_bridge.errmodel.cumulative_bounds``), code ``#{m : bound[m] <= u}``; so for the same uniform,
training and the data-driven twin read the same code, and probabilities are resolved to 2**-32 in both. The search
runs on a guide table (Chen and Asau's indexed search): ``T`` buckets of ``u`` per row hold the code at each
bucket's left edge, with ``T`` chosen so that, where it can be, one comparison finishes the search (see
``Transfer._build_guide``). The uniforms are counter-based (``splitmix_uniforms``: a call's seed and the
conversion's index), so any order of computing them, C or torch, gives the same bits. The seed of each call
comes from the layer's random stream (``STREAMS``: a numpy PCG64 ``Generator`` on the CPU, or a ``TorchStream`` on
a torch device; deterministic given its seed), so only one 64-bit word per tile and call is drawn from it.

The deploy step: a ``ColumnDecoder`` maps each physical column's code to a value (a line from ``ColumnTrim``, or a
table: the expected ideal code given the code read); the recombination then sums decoded values, and the
expected transfer below is that of the decoded values.

The smoothed expected transfer (what the backward pass differentiates): ``m[j, s]`` is the mean code of each
(column, level); per column its code distribution is shrunk toward the pooled one with ``prior`` pseudo-counts (empirical Bayes:
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
from scipy import special

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
SEARCH_STEPS = 3
"""The search layout takes the fewest bucket bits that leave at most this many CDF steps in a bucket."""
DEFAULT_PRIOR = 8.0
"""Pseudo-counts that pull a column's code distribution toward the pooled one (smoothing of sparse rows)."""
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
"""SplitMix64's increment (the golden ratio in 64-bit fixed point)."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def splitmix_uniforms(seed: int | torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """32-bit uniforms (int32 bit patterns) of conversions ``index`` (int64 tensor) of a call seeded ``seed`` (a
    64-bit integer, or its int64 bit pattern as a 0-dim tensor on ``index``'s device): half ``index & 1`` of
    SplitMix64's 64-bit word ``index >> 1``, i.e. ``mix(seed + (word + 1) * GAMMA)`` (Steele, Lea and Flood, OOPSLA
    2014; the C kernels compute the same bits)."""
    z = (index >> 1) + 1
    z = z * _signed64(SPLITMIX_GAMMA) + (seed if isinstance(seed, torch.Tensor) else _signed64(seed))
    z = z ^ ((z >> 30) & ((1 << 34) - 1))
    z = z * _signed64(0xBF58476D1CE4E5B9)
    z = z ^ ((z >> 27) & ((1 << 37) - 1))
    z = z * _signed64(0x94D049BB133111EB)
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    half = torch.where((index & 1).bool(), (z >> 32) & 0xFFFFFFFF, z & 0xFFFFFFFF)
    return (((half + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)).to(torch.int32)


def _signed64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


STREAMS = ("pcg64", "device")
"""Random streams of a layer's sampled codes (each call of a tile takes one 64-bit seed of the counter-based
uniforms from it): ``pcg64`` (numpy, on the CPU; the same codes on every device) or ``device`` (a torch generator on
the layer's device: Philox on CUDA, so no number crosses the bus)."""


class TorchStream:
    """A random stream on a torch device: the 64-bit seeds of the counter-based uniforms drawn where the layer
    computes (Philox on CUDA), as 0-dim int64 tensors, so sampling on a GPU waits on no copy. Deterministic given its
    seed and device.

    Args:
        seed: the stream's seed (a 63-bit integer).
        device: where the numbers are drawn.
    """

    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    def seed64(self) -> torch.Tensor:
        """A uniform 64-bit integer (int64 bit pattern, 0-dim) on the stream's device."""
        return torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64, device=self.device,
                             generator=self.generator)

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


def draw_seed(rng: Stream) -> int | torch.Tensor:
    """The next 64-bit seed of a call's uniforms (``splitmix_uniforms``): a Python int from a PCG64 stream (its next
    raw output), a 0-dim int64 tensor on the stream's device from a ``TorchStream``."""
    if isinstance(rng, TorchStream):
        return rng.seed64()
    return int(rng.bit_generator.random_raw())


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


def slope_rows(mean: np.ndarray, h: float) -> np.ndarray:
    """``m~'(s) = (m_lin(s+h) - m_lin(s-h)) / (2h)`` at every integer level of every row of ``mean`` [n, L]."""
    n, L = mean.shape
    rows = np.repeat(np.arange(n), L).reshape(n, L)
    s = np.broadcast_to(np.arange(L, dtype=np.float64), (n, L))
    return (linear_transfer(mean, s + h, rows) - linear_transfer(mean, s - h, rows)) / (2.0 * h)


@dataclass(frozen=True)
class ColumnDecoder:
    """The per-chip step at deploy time, per physical column: the host recombines ``value[j, code]`` (ideal-code
    units) instead of each raw code (the chip returns raw codes, MAC_RAW). Built from a short characterization of
    the chip: a line per column (``ColumnTrim.decoder``: ``(code - offset) / gain``) or a table per column
    (``from_model``: the expected ideal code given the code read, as a chip team's digital ADC calibration).

    Attributes:
        table: float64 [J, n_codes], ideal-code units.
        kind: ``line`` or ``table``.
        source: where it came from.
    """

    table: np.ndarray
    kind: str = "table"
    source: str = ""

    def __post_init__(self) -> None:
        if self.table.ndim != 2 or not np.isfinite(self.table).all():
            raise ConfigError(f"a column decoder is a finite [columns, codes] table, got shape {self.table.shape}")

    @classmethod
    def from_model(cls, model: ErrorModel, *, prior: np.ndarray | None = None, source: str = "") -> ColumnDecoder:
        """Each column's table ``value[j, c] = E[s | code c] / adc_lsb`` from the characterization's counts,
        the levels weighted by ``prior`` ([n_levels] or [J, n_levels]; default: every level alike) over the
        levels' measured code frequencies. A code a column never read takes the column's line
        (``ColumnTrim.from_model``)."""
        from cimlab.errmodel import MacErrorModel

        model = getattr(model, "model", model)
        spec = model.spec
        J, L, C = model.counts.shape
        w = np.ones(L) if prior is None else np.asarray(prior, dtype=np.float64)
        if w.shape not in ((L,), (J, L)) or (w < 0).any() or not np.isfinite(w).all():
            raise ConfigError(f"a level prior is [{L}] or [{J}, {L}] non-negative weights, got {w.shape}")
        counts = model.counts.astype(np.float64)
        totals = counts.sum(axis=2, keepdims=True)
        freq = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)  # P(c | s, j)
        post = freq * np.broadcast_to(w, (J, L))[:, :, None]  # [J, L, C]
        mass = post.sum(axis=1)  # [J, C]
        levels = np.arange(L, dtype=np.float64) / spec.adc_lsb
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.einsum("jsc,s->jc", post, levels) / mass
        line = ColumnTrim.from_model(MacErrorModel(model)).decoder(spec).table
        table = np.where(mass > 0, value, line)
        return cls(table, "table", source)

    @classmethod
    def load(cls, path: str | os.PathLike, *, prior: np.ndarray | None = None) -> ColumnDecoder:
        """The table decoder of an error model file (a short ``cimlab characterize`` of the chip)."""
        return cls.from_model(ErrorModel.load(path), prior=prior, source=str(path))


@dataclass(frozen=True)
class ColumnTrim:
    """Each physical column's gain and offset from a short characterization of the chip (``from_model``): the line
    decoder ``(code - offset) * scale`` (``scale = 1 / gain``). It takes the chip's static per-column line out of
    every conversion, which a correction of the recombined outputs cannot do: in two's complement a column's slices
    carry large terms of opposite sign, and a gain error on one slice does not cancel.

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

    def decoder(self, spec: MacroSpec) -> ColumnDecoder:
        """The line decoder: ``value[j, c] = (c - offset[j]) * scale[j]``."""
        codes = np.arange(spec.n_codes, dtype=np.float64)
        return ColumnDecoder((codes[None, :] - self.offset[:, None]) * self.scale[:, None], "line", self.source)


@dataclass(frozen=True)
class TransferInfo:
    """Where a transfer came from (goes into checkpoints and reports)."""

    kind: str
    pooled: bool
    source: str = ""
    sha256: str = ""
    chip_id: str = ""


class Transfer:
    """An ADC transfer for the CIM layers (see the module docstring). Build with ``ideal``, ``from_model``,
    ``gaussian`` or ``load``; the tables are torch tensors on the CPU, or on ``device`` for a copy from ``to``.

    Attributes:
        spec: the macro.
        kind: ``ideal``, ``measured`` or ``gaussian``.
        pooled: one table for all columns (True) or one per physical column.
        probs: float64 [n_tables, n_levels, n_codes], the code distribution whose expectation the backward pass
            differentiates (per column shrunk toward the pool).
        mean: float64 [n_slope, n_levels], that expectation (decoded, when a decoder is set) before smoothing.
        slope_table: float32 tensor [n_levels * n_slope], ``m~'(s)`` at each integer level, indexed
            ``s * n_slope + slope_index(j)``.
        decoder: the per-column decoder of the deploy step (None: codes are recombined as read).
        layout: how the table is sampled (``packed`` or ``search``; see ``_build_guide``).
        guide_buckets, guide_steps: ``T`` and ``B`` of the guide table.
    """

    def __init__(self, spec: MacroSpec, kind: Kind, pooled: bool, probs: np.ndarray, counts: np.ndarray, *,
                 info: TransferInfo | None = None) -> None:
        if kind not in KINDS:
            raise ConfigError(f"transfer kind {kind!r} is not one of {', '.join(KINDS)}")
        self.spec = spec
        self.kind = kind
        self.pooled = pooled
        self.info = info or TransferInfo(kind, pooled)
        self.device = torch.device("cpu")
        self._placed: dict[str, dict[str, torch.Tensor]] = {}
        L, C = spec.n_levels, spec.n_codes
        self.n_tables = 1 if pooled else spec.physical_cols
        shape = (self.n_tables, L, C)
        if probs.shape != shape or counts.shape != shape:
            raise ConfigError(f"a transfer needs probabilities and counts of shape {shape}, got {probs.shape} "
                              f"and {counts.shape}")
        self.probs = np.asarray(probs, dtype=np.float64)
        self.h = smoothing_half_width(spec)
        ideal = spec.ideal_codes(np.arange(L))
        self.lossless = bool(np.array_equal(ideal, np.arange(L)))
        """The ideal ADC returns every level as its own code (no rounding, no clipping)."""
        self.shortcut = True
        self.counts = np.asarray(counts, dtype=np.int64)
        self._build_guide(self.counts)
        self._set_decoder(None)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def ideal(cls, spec: MacroSpec, *, shortcut: bool = True) -> Transfer:
        """The ideal ADC: ``code = MacroSpec.ideal_codes(s)``.

        ``shortcut``: where the ADC resolves every level, layers compute ``codes @ weights`` directly (exact);
        ``False`` decomposes into conversions anyway (timing comparisons, tests).
        """
        onehot = np.zeros((1, spec.n_levels, spec.n_codes), dtype=np.int64)
        onehot[0, np.arange(spec.n_levels), spec.ideal_codes(np.arange(spec.n_levels))] = 1
        tr = cls(spec, "ideal", True, onehot.astype(np.float64), onehot,
                 info=TransferInfo("ideal", True, "ideal ADC"))
        tr.shortcut = shortcut
        return tr

    @classmethod
    def gaussian(cls, spec: MacroSpec, mean: np.ndarray, sigma: np.ndarray, *, pooled: bool = False,
                 info: TransferInfo | None = None) -> Transfer:
        """``round(mean + sigma * z)`` clipped to the codes, z standard normal, for mean and sigma [n_tables,
        n_levels] (codes): the exact discretized distribution, sampled like a measured table (to 2**-30)."""
        L, C = spec.n_levels, spec.n_codes
        n = 1 if pooled else spec.physical_cols
        mu = np.broadcast_to(np.asarray(mean, dtype=np.float64), (n, L))
        sd = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n, L))
        if not (np.isfinite(mu).all() and np.isfinite(sd).all() and (sd >= 0).all()):
            raise ConfigError("a gaussian transfer needs finite means and sigmas >= 0")
        edges = np.arange(C - 1, dtype=np.float64) + 0.5  # code c reads for values in [c - 0.5, c + 0.5)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (edges[None, None, :] - mu[:, :, None]) / sd[:, :, None]
        below = np.where(sd[:, :, None] > 0, special.ndtr(np.nan_to_num(z, nan=0.0)),
                         (edges[None, None, :] > mu[:, :, None]).astype(np.float64))  # P(value < edge)
        scale = float(1 << 30)
        cum = np.concatenate([np.floor(below * scale), np.full((n, L, 1), scale)], axis=2).astype(np.int64)
        counts = np.diff(cum, axis=2, prepend=0)
        return cls(spec, "gaussian", pooled, counts / scale, counts,
                   info=info or TransferInfo("gaussian", pooled))

    @classmethod
    def from_model(cls, model: ErrorModel, *, pooled: bool = True, kind: Kind = "measured",
                   prior: float = DEFAULT_PRIOR, source: str = "", sha256: str = "") -> Transfer:
        """A transfer from a measured error model (``cimlab.firmware_bridge.errmodel.ErrorModel``, or anything with
        ``.model`` holding one, such as ``cimlab.errmodel.MacErrorModel``).

        ``pooled``: one distribution per level for all columns; otherwise per physical column (with the file's
        fallback rule for unmeasured rows). ``kind``: ``measured`` (draw from the table) or ``gaussian`` (the
        measured mean and sigma of each row). ``prior``: pseudo-counts that pull a column's distribution toward
        the pooled one in what the backward pass differentiates.
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
        pooled_counts = view.pooled_counts().astype(np.float64)  # [L, C]
        pn = pooled_counts.sum(axis=1)
        ideal = np.zeros((L, C))
        ideal[np.arange(L), spec.ideal_codes(np.arange(L))] = 1.0
        # levels nobody measured: the ideal code
        pool = np.where(pn[:, None] > 0, pooled_counts / np.maximum(pn, 1.0)[:, None], ideal)
        if pooled:
            probs = pool[None]
            counts = np.where(pn[:, None] > 0, pooled_counts, ideal).astype(np.int64)[None]
        else:
            col = model.counts.astype(np.float64)  # [J, L, C]
            n = col.sum(axis=2, keepdims=True)
            weight = n + prior
            probs = np.where(weight > 0, (col + prior * pool[None]) / np.maximum(weight, 1e-300), pool[None])
            counts = model.effective_counts().astype(np.int64)
        info = TransferInfo(kind, pooled, source, sha256, model.chip_id)
        if kind == "gaussian":
            codes = np.arange(C, dtype=np.float64)
            mean = probs @ codes
            sigma = np.sqrt(np.maximum(probs @ codes**2 - mean**2, 0.0))
            return cls.gaussian(spec, mean, sigma, pooled=pooled, info=info)
        return cls(spec, "measured", pooled, probs, counts, info=info)

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
        bucket is the top ``b`` bits of ``u``, the offset inside it the low ``32 - b`` bits; ``guide`` holds the
        code at each bucket's left edge. Two layouts:

        - ``packed``: the fewest bits ``b`` for which no bucket holds more than one step of the CDF; ``guide_offset``
          holds the offset of the step inside each bucket (``2**(32-b)``: none), so
          ``code = guide + (offset(u) >= guide_offset)`` finishes the search (small tables: they stay in cache);
        - ``search``: the fewest bits that leave at most ``SEARCH_STEPS`` steps in a bucket (else the most that
          fit ``GUIDE_ENTRIES``), then ``B`` steps ``code += (u > bound[row, code] - 1)``, compared as signed int32
          after flipping the top bit (an order-preserving map of unsigned to signed).
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

        fits = [b for b in range(1, MAX_BUCKET_BITS + 1) if rows << b <= GUIDE_ENTRIES] or [1]
        counted = {b: steps(b) for b in fits}
        ok = [b for b in fits if counted[b] <= 1]
        few = [b for b in fits if counted[b] <= SEARCH_STEPS]
        self.layout, bits = ("packed", ok[0]) if ok else ("search", few[0] if few else fits[-1])
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
        self.guide_steps = counted[bits]
        self.guide = torch.from_numpy(lo.ravel().astype(np.int32))
        padded = np.concatenate([bounds, np.full((rows, 1), top, np.int64)], axis=1)  # bound above the top code
        # the step above each bucket's left edge, as an offset inside the bucket (2**shift: none); uint32 bits
        nxt = np.minimum(np.take_along_axis(padded, np.minimum(lo, C - 1), axis=1) - left[None, :], 1 << shift)
        self.guide_offset = torch.from_numpy(nxt.ravel().astype(np.uint32).view(np.int32))
        # bound - 1 as signed int32 after flipping the top bit; bounds of 0 are never compared (see steps)
        self.cum = torch.from_numpy((np.maximum(padded - 1, 0) - (1 << 31)).ravel().astype(np.int32))

    TABLES = ("slope_table", "guide", "guide_offset", "cum", "value_table")
    """The attributes that hold the torch tables (``value_table`` is None when undecoded)."""

    def to(self, device: torch.device | str) -> Transfer:
        """This transfer with its tables on ``device`` (a shallow copy; the moved tables are kept, so switching a
        layer between chips on a GPU copies each chip's tables once)."""
        device = torch.device(device)
        if device == self.device:
            return self
        key = str(device)
        if key not in self._placed:
            self._placed[key] = {name: table.to(device) for name in self.TABLES
                                 if (table := getattr(self, name)) is not None}
        out = copy.copy(self)
        for name, table in self._placed[key].items():
            setattr(out, name, table)
        out.device = device
        return out

    # ---- the deploy step ----------------------------------------------------------------------------------
    def decoded(self, decoder: ColumnDecoder | None) -> Transfer:
        """This chip with every code decoded per physical column before the recombination (a shallow copy
        sharing the sampling tables; None: codes recombined as read). The expected transfer, and so the slope
        the backward pass uses, becomes that of the decoded values."""
        if decoder is not None and decoder.table.shape != (self.spec.physical_cols, self.spec.n_codes):
            raise ConfigError(f"the decoder is for {decoder.table.shape[0]} columns and {decoder.table.shape[1]} "
                              f"codes; the macro has {self.spec.physical_cols} and {self.spec.n_codes}")
        out = copy.copy(self)
        out._placed = {}  # its decoded tables differ from this transfer's
        out._set_decoder(decoder)
        return out

    def permuted(self, order: np.ndarray) -> Transfer:
        """The same columns in another placement: physical column ``j`` of the result behaves as column
        ``order[j]`` of this one (its code distribution and its decoder row). A chip of the same design whose
        columns came out of the same spread, for training through many placements (``fit(shuffle_columns=True)``);
        a pooled transfer is its own permutation."""
        J = self.spec.physical_cols
        order = np.asarray(order)
        if order.shape != (J,) or not np.array_equal(np.sort(order), np.arange(J)):
            raise ConfigError(f"a column order is a permutation of the macro's {J} physical columns")
        if self.pooled and self.decoder is None:
            return self
        probs, counts = (self.probs, self.counts) if self.pooled else (self.probs[order], self.counts[order])
        out = Transfer(self.spec, self.kind, self.pooled, probs, counts, info=self.info)  # type: ignore[arg-type]
        out.shortcut = self.shortcut
        if self.decoder is not None:
            out._set_decoder(ColumnDecoder(self.decoder.table[order], self.decoder.kind, self.decoder.source))
        return out.to(self.device)

    def trimmed(self, trim: ColumnTrim | None) -> Transfer:
        """``decoded`` with the line decoder of ``trim`` (None: undecoded)."""
        return self.decoded(None if trim is None else trim.decoder(self.spec))

    def _set_decoder(self, decoder: ColumnDecoder | None) -> None:
        codes = np.arange(self.spec.n_codes, dtype=np.float64)
        self.decoder = decoder
        if decoder is None:
            self.mean = self.probs @ codes  # [n_tables, L]
            self.n_slope = self.n_tables
            self.value_table: torch.Tensor | None = None
        else:
            J = self.spec.physical_cols
            probs = np.broadcast_to(self.probs, (J, *self.probs.shape[1:]))
            self.mean = np.einsum("jsc,jc->js", probs, decoder.table)
            self.n_slope = J
            self.value_table = torch.from_numpy(decoder.table.astype(np.float32).ravel()).to(self.device)
        slope = slope_rows(self.mean, self.h)  # [n_slope, L]
        # tables indexed by row = s * n_slope + j
        slope_t = torch.from_numpy(np.ascontiguousarray(slope.T).reshape(-1).astype(np.float32))
        self.slope_table = slope_t.to(self.device)

    # ---- torch side ---------------------------------------------------------------------------------------
    def table_index(self, columns: np.ndarray) -> torch.Tensor:
        """Per physical column index into the sampling tables (0 when pooled), int32 [n]."""
        j = np.zeros_like(columns) if self.pooled else np.asarray(columns)
        return torch.from_numpy(np.ascontiguousarray(j, dtype=np.int32).ravel())

    def slope_index(self, columns: np.ndarray) -> torch.Tensor:
        """Per physical column index into ``slope_table`` (0 when pooled and undecoded), int32 [n]."""
        j = np.zeros_like(columns) if self.n_slope == 1 else np.asarray(columns)
        return torch.from_numpy(np.ascontiguousarray(j, dtype=np.int32).ravel())

    def value_index(self, columns: np.ndarray) -> torch.Tensor | None:
        """Per physical column offset of its row in ``value_table`` (int32 [n]), None when undecoded."""
        if self.decoder is None:
            return None
        j = np.asarray(columns, dtype=np.int64).ravel() * self.spec.n_codes
        return torch.from_numpy(j.astype(np.int32))

    def codes_from_uniforms(self, levels: torch.Tensor, tables: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Codes (int32) for levels [..., n] (integer valued) of columns with sampling-table index ``tables`` [n]
        and 32-bit uniforms ``u`` (int32 bit patterns, the shape of ``levels``): the code the twin's
        ``CodeSampler.sample_bits`` reads for the same bits."""
        rows = levels.to(torch.int32)
        if self.n_tables > 1:
            rows = rows * self.n_tables + tables
        shape = levels.shape
        idx = (rows * self.guide_buckets + ((u >> self.guide_shift) & (self.guide_buckets - 1))).reshape(-1)
        code = self.guide.index_select(0, idx).reshape(shape)
        if self.layout == "packed":
            offset = self.guide_offset.index_select(0, idx).reshape(shape).to(torch.int64) & 0xFFFFFFFF
            return code + ((u.to(torch.int64) & ((1 << self.guide_shift) - 1)) >= offset)
        signed = u ^ torch.tensor(-(1 << 31), dtype=torch.int32, device=u.device)
        base = rows * self.spec.n_codes
        for _ in range(self.guide_steps):
            code = code + (signed > self.cum.index_select(0, (base + code).reshape(-1)).reshape(shape))
        return code

    def slope(self, levels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``m~'(s)`` (float32) for levels [..., n] of columns with slope index ``index`` [n] (``slope_index``)."""
        rows = levels.to(torch.int32) * self.n_slope + index
        return self.slope_table.index_select(0, rows.reshape(-1)).reshape(levels.shape)

    # ---- numpy views (reports, tests) ---------------------------------------------------------------------
    def expected(self, levels: np.ndarray, columns: np.ndarray | int = 0) -> np.ndarray:
        """The smoothed expected transfer ``m~(s)`` (decoded values when a decoder is set) at continuous levels,
        codes (float64). ``columns``: the physical column of each level (ignored when pooled and undecoded)."""
        t = np.asarray(levels, dtype=np.float64)
        if self.n_slope == 1:
            rows = np.zeros(t.shape, dtype=np.int64)
        else:
            rows = np.broadcast_to(np.asarray(columns), t.shape)
        return smoothed_transfer(self.mean, t, rows, self.h)

    def describe(self) -> str:
        """One line for humans."""
        where = "pooled" if self.pooled else "per column"
        src = f" from {self.info.source}" if self.info.source else ""
        dec = f", {self.decoder.kind} decoder" if self.decoder is not None else ""
        return f"{self.kind} transfer ({where}{dec}){src}"


def check_spec(expected: MacroSpec, got: MacroSpec, what: str) -> None:
    """ArtifactError naming the differing fields when ``got`` (of ``what``) is another macro than ``expected``."""
    if got != expected:
        from cimlab.errmodel import spec_differences

        diff = spec_differences(expected, got, "expected", what)
        raise ArtifactError(f"{what} is for another MacroSpec ({diff})")


__all__ = ["KINDS", "STREAMS", "ColumnDecoder", "ColumnTrim", "Stream", "TorchStream", "Transfer", "TransferInfo",
           "check_spec", "draw_seed", "file_sha256", "make_stream", "set_stream_state", "slope_rows",
           "smoothed_transfer", "smoothing_half_width", "splitmix_uniforms", "stream_state"]

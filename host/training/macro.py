"""The macro's arithmetic in torch: a layer's product decomposed into conversions, codes drawn, recombined.

For each tile of the layer (``cimlab.mapping``) and each input vector, exactly as ``cimlab.firmware_bridge.spec`` defines
it: input codes split into slices ``x_p``, stored weights into digits ``d_k``, the ideal partial sum of every
conversion ``s[p, g, k, c] = sum_{r in group g} x_p[r] d_k[r, c]`` (one float32 batched matmul per chunk; exact,
as the sums are small integers), a code per conversion from the ``Transfer`` (ideal, measured or gaussian), and
the digital recombination ``rint(adc_lsb * sum code * plane_weight[p] * slice_weight[k]) - weight_offset * sum x``
(``MacroSpec.recombine``). Tiles of one column range add up. With the ideal transfer this is bit-exact with the
twin's ideal MAC (tests/training/test_exact.py).

Stored digits follow the storage (``stored_digits``): two's complement / offset digits of ``w`` (plus the offset) by
place value, or for ``differential`` storage the digits of ``max(w, 0)`` on the positive array's slices and of
``max(-w, 0)`` on the negative array's. A *paired* tile (a layer of both signs on a unipolar macro,
``cimlab.mapping.Tile.paired``) holds ``max(w, 0)`` and ``max(-w, 0)`` of each output on two adjacent macro
columns (``split_pairs``): the conversions run over both, and each output is the first column's MAC minus the
second's (``join_pairs``). In the backward pass an output's gradient goes to its two columns with opposite signs and
a weight's gradient is the mean of what its two columns' digits receive, signed the same way (with an ideal ADC:
exactly ``x^T dL/dy``, as for the digits of one column).

Memory stays bounded: vectors go through in chunks of at most ``chunk_conversions`` conversions, and nothing of
size "conversions" is kept for the backward pass (the levels are recomputed there, chunk by chunk); only the input
codes (as uint8 when they fit) and the weights are saved.

The statistical gradient (backward):

- Paper (D-NAT, JETCAS 2022): the measured D-MAC-EM is discrete, so its sampled codes carry no gradient; they
  propose a "statistical training mechanism" that estimates the gradient of the discrete model from its
  statistics instead of from the sampled code.
- Our reading: the forward pass uses the sampled code; the backward pass differentiates the *expected* code
  ``m~(s) = E[code | s]``, smoothed (``cimlab.training.transfer``), at the conversion's ideal level: the upstream
  gradient of a conversion is ``dL/dcode * m~'(s) * adc_lsb * plane_weight[p] * slice_weight[k]``, and
  ``ds/dx_p[r] = d_k[r, c]``, ``ds/dd_k[r, c] = x_p[r]``.
- Input slices and weight digits are bits of integers, so they need a straight-through rule too. Ours: a change
  ``e`` of an input code is spread evenly over its slices (each slice moves by ``e / sum(plane_weights)``, which
  moves the code by exactly ``e``), so ``dL/dx = sum_p dL/dx_p / sum_p plane_weight[p]``; likewise a weight
  change is spread over its digits with the sign of their place value: ``dL/dw = sum_k sign(sw_k) dL/dd_k /
  sum_k |sw_k|``. With an ideal, unclipped ADC this gives exactly ``dL/dx = dL/dy W^T`` and ``dL/dW = x^T dL/dy``
  (ordinary STE training); with a measured model each bit position is weighted by the slope its conversions see.
- The final rounding to ``adc_lsb`` units is passed straight through.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import LayerMap, Tile
from cimlab.training.transfer import STREAMS, Stream, Transfer, draw_uniform32, make_stream

DEFAULT_CHUNK_CONVERSIONS = 1 << 19
"""Conversions per chunk: a chunk's temporaries (a few tensors of this many 4-byte elements) stay in cache."""
EXACT_F32 = 1 << 24
"""Integers below this are exact in float32."""


def packed_sample_sum(planes: torch.Tensor, digits_idx: torch.Tensor, bias_idx: torch.Tensor, u: torch.Tensor,
                      guide: torch.Tensor, shift: int, buckets: int, pw_sw: torch.Tensor,
                      trim_offset: torch.Tensor, trim_scale: torch.Tensor) -> torch.Tensor:
    """One chunk of the forward for a measured transfer in the ``packed`` layout, fused: every conversion's guide
    index ``(s * n_tables + j) * T + bucket(u)`` straight from one batched matmul (the digits pre-scaled by
    ``n_tables * T``, each column's table as the bias; exact in float32, as it stays below 2**22), its code read
    and finished with one comparison (as ``Transfer.codes_from_uniforms``), and the codes recombined.

    Args: planes [G, n*P, R]; digits_idx [G, R, S*M]; bias_idx [1, 1, S*M]; u [G, n*P, S*M] int32 uniforms;
    guide, shift, buckets: the transfer's table; pw_sw [P, S] (float32 or float64: the type of the sum);
    trim_offset, trim_scale [S*M]: each column's code becomes ``(code - offset) * scale`` (0 and 1: untrimmed).
    Returns ``sum code * plane_weight * slice_weight`` per vector and column, [n, M].
    """
    P, S = pw_sw.shape
    G, nP, SM = u.shape
    idx = torch.baddbmm(bias_idx, planes, digits_idx).to(torch.int32)
    idx = idx + ((u >> shift) & (buckets - 1))
    entry = guide[idx]
    code = (entry >> (shift + 1)) + ((u & ((1 << shift) - 1)) >= (entry & ((2 << shift) - 1))).to(torch.int32)
    # [G, n, P, S, M] weighted and summed over groups, planes and slices in one reduction (exact: integers)
    code = (code.to(pw_sw.dtype) - trim_offset) * trim_scale
    code = code.reshape(G, nP // P, P, S, SM // S)
    return (code * pw_sw[None, None, :, :, None]).sum(dim=(0, 2, 3))


def slope_grads(planes: torch.Tensor, digits: torch.Tensor, digits_rows: torch.Tensor, bias_rows: torch.Tensor,
                slope_table: torch.Tensor, g_conv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the backward, fused: ``dL/ds = m~'(s) * dL/dcode`` per conversion (the slope's table row
    ``s * n_tables + j`` straight from one batched matmul, as in ``packed_sample_sum``), then its contractions
    with the digits and the input slices.

    Args: planes [G, n*P, R]; digits, digits_rows (digits * n_tables) [G, R, S*M]; bias_rows [1, 1, S*M];
    slope_table [rows]; g_conv [n*P, S*M], dL/dcode. Returns (dL/dplanes [G, n*P, R], dL/ddigits [G, R, S*M]).
    """
    rows = torch.baddbmm(bias_rows, planes, digits_rows).to(torch.int32)
    ds = slope_table[rows] * g_conv
    return torch.bmm(ds, digits.transpose(1, 2)), torch.bmm(planes.transpose(1, 2), ds)


def stored_digits(spec: MacroSpec, w: torch.Tensor) -> torch.Tensor:
    """The digits the macro stores for logical weights w [K, C] (float, integer valued): [K, n_slices, C] float64,
    as ``MacroSpec.weights_to_slices`` (both arrays' digits for ``differential``)."""
    w = w.to(torch.float64)
    base = float(spec.cell_max + 1)
    place = torch.tensor([base**k for k in range(spec.slices_per_side)], dtype=torch.float64,
                         device=w.device)[None, :, None]

    def digits_of(m: torch.Tensor) -> torch.Tensor:  # m >= 0 (or a two's complement pattern)
        return torch.remainder(torch.floor(m[:, None, :] / place), base)

    if spec.weight_storage == "differential":
        return torch.cat([digits_of(w.clamp(min=0)), digits_of((-w).clamp(min=0))], dim=1)
    modulus = base ** spec.slices_per_side
    return digits_of(torch.remainder(w + spec.weight_offset, modulus))  # two's complement for negative weights


def split_pairs(w: torch.Tensor) -> torch.Tensor:
    """A paired tile's signed weights [K, C] -> its macro columns [K, 2C]: ``max(w, 0)`` even, ``max(-w, 0)`` odd."""
    return torch.stack([w.clamp(min=0), (-w).clamp(min=0)], dim=2).reshape(w.shape[0], 2 * w.shape[1])


def join_pairs(y: torch.Tensor) -> torch.Tensor:
    """Outputs of a paired tile's macro columns [N, 2C] -> its outputs [N, C]: each pair's difference."""
    return y[:, 0::2] - y[:, 1::2]


def pair_gradient(grad: torch.Tensor) -> torch.Tensor:
    """An output gradient [N, C] -> the gradient of a paired tile's macro columns [N, 2C] (``+g``, ``-g``)."""
    return torch.stack([grad, -grad], dim=2).reshape(grad.shape[0], 2 * grad.shape[1])


def unpair_weight_gradient(g: torch.Tensor) -> torch.Tensor:
    """Gradient of a paired tile's macro columns' weights [K, 2C] -> its signed weights' [K, C] (the mean of the
    two, signed as the pair subtracts them)."""
    return 0.5 * (g[:, 0::2] - g[:, 1::2])


KERNELS: dict[str, Any] = {"sample": packed_sample_sum, "grads": slope_grads}
"""The chunk kernels in use: the plain functions, or their ``torch.compile`` d versions (``compile_kernels``)."""


def compile_kernels(enabled: bool = True) -> None:
    """Run the chunk kernels through ``torch.compile`` (fused loops: about 5x faster on a CPU; needs a C++ compiler
    there, and the first call of each takes tens of seconds) or, with ``enabled=False``, as plain torch."""
    if enabled:
        # sizes that happen to be equal (a batch and a column count) must not become guards: one graph per kernel
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
        KERNELS["sample"] = torch.compile(packed_sample_sum, dynamic=True)
        KERNELS["grads"] = torch.compile(slope_grads, dynamic=True)
    else:
        KERNELS.update(sample=packed_sample_sum, grads=slope_grads)


@dataclass
class _TilePlan:
    tile: Tile
    groups: int
    offset: int  # row offset of the tile's first row inside its first group
    tables: torch.Tensor  # [n_slices * n_cols] int32, transfer table index per (k, c)
    vectors_per_chunk: int
    bias_rows: torch.Tensor  # [1, 1, n_slices * n_cols] float32: the table index, the bias of a row matmul
    trim: tuple[torch.Tensor, torch.Tensor] | None  # per (k, c): the transfer's trim offset and scale


@dataclass
class ColumnCorrection:
    """The per-chip step at deploy time: each output column's MAC outputs corrected digitally,
    ``y = (mac - offset) / gain``, with ``gain`` and ``offset`` fitted on the chip against the exact integer MACs
    the host knows for the same inputs (``cimlab.training.layers.calibrate_columns``). It removes what a chip's
    static per-column errors (offset, gain) do to a column's sum; what varies conversion to conversion stays.

    Attributes:
        gain: float64 [n_cols], measured MAC per ideal MAC unit.
        offset: float64 [n_cols], ``adc_lsb`` level units.
    """

    gain: torch.Tensor
    offset: torch.Tensor

    def __post_init__(self) -> None:
        if self.gain.shape != self.offset.shape or self.gain.ndim != 1:
            raise ShapeError(f"gain {list(self.gain.shape)} and offset {list(self.offset.shape)} must be one "
                             "value per column")
        if not bool(torch.isfinite(self.gain).all() and (self.gain > 0).all() and torch.isfinite(self.offset).all()):
            raise ConfigError("a column correction needs finite offsets and positive finite gains")

    @classmethod
    def fit(cls, measured: torch.Tensor, ideal: torch.Tensor, *, min_gain: float = 0.25) -> ColumnCorrection:
        """Least-squares line ``measured = gain * ideal + offset`` per column of [N, M] outputs. A column whose
        ideal outputs do not vary gets gain 1 (its offset still fitted); gains are kept >= ``min_gain``."""
        if measured.shape != ideal.shape or measured.ndim != 2 or measured.shape[0] < 1:
            raise ShapeError(f"measured {list(measured.shape)} and ideal {list(ideal.shape)} outputs must be the "
                             "same [N, M] shape")
        y, x = measured.to(torch.float64), ideal.to(torch.float64)
        mx, my = x.mean(0), y.mean(0)
        sxx = ((x - mx) ** 2).sum(0)
        sxy = ((x - mx) * (y - my)).sum(0)
        flat = sxx <= 1e-9 * (1.0 + (mx * mx) * x.shape[0])
        gain = torch.where(flat, torch.ones_like(sxx), sxy / torch.where(flat, torch.ones_like(sxx), sxx))
        gain = gain.clamp_min(min_gain)
        return cls(gain, my - gain * mx)

    def apply(self, mac: torch.Tensor) -> torch.Tensor:
        """Corrected outputs of MAC outputs [N, n_cols]."""
        return (mac - self.offset) / self.gain

    def to(self, device: torch.device) -> ColumnCorrection:
        """This correction with its tensors on ``device`` (a copy; itself when they are there already)."""
        if self.gain.device == device and self.offset.device == device:
            return self
        out = copy.copy(self)  # checked when it was made: not again (a check reads the values back)
        out.gain, out.offset = self.gain.to(device), self.offset.to(device)
        return out


@dataclass
class MacroStats:
    """What the last forward/backward did (for tests and reports)."""

    conversions: int = 0
    max_chunk_conversions: int = 0
    chunks: int = 0


@dataclass
class LayerMacro:
    """A layer on the macro: its tiling, the transfer its conversions follow, and its random stream.

    Attributes:
        layer_map: the tiles (``cimlab.mapping.map_layer``).
        transfer: the ADC transfer (``Transfer.ideal`` for the ideal quantized model).
        rng: random stream of the sampled codes (numpy PCG64, or a ``TorchStream`` on the device; restart it
            with ``reseed``).
        chunk_conversions: most conversions per chunk.
        device: where the conversions are computed (move with ``to``).
        stream: the kind of ``rng`` that ``reseed`` makes (``transfer.STREAMS``).
    """

    layer_map: LayerMap
    transfer: Transfer
    rng: Stream = field(default_factory=lambda: np.random.Generator(np.random.PCG64(0)))
    chunk_conversions: int = DEFAULT_CHUNK_CONVERSIONS
    stats: MacroStats = field(default_factory=MacroStats)
    correction: ColumnCorrection | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stream: str = "pcg64"

    def __post_init__(self) -> None:
        spec = self.spec
        if self.transfer.spec != spec:
            raise ConfigError("the transfer's MacroSpec differs from the layer map's")
        if self.chunk_conversions < 1:
            raise ConfigError(f"chunk_conversions must be >= 1, got {self.chunk_conversions}")
        pw_sw = np.outer(spec.plane_weights(), spec.slice_weights()).astype(np.float64)  # [P, S]
        self.pw_sw = torch.from_numpy(pw_sw)
        # bound of |sum code * pw * sw| over one tile, to choose float32 or float64 for the recombination
        self._acc_bound = float(spec.n_groups * spec.adc_max * np.abs(pw_sw).sum())
        codes = np.arange(spec.input_max + 1, dtype=np.int64)[:, None]
        self._plane_lut = torch.from_numpy(spec.inputs_to_planes(codes)[:, :, 0].astype(np.float32))  # [V, P]
        self._plans = self._make_plans()

    @property
    def spec(self) -> MacroSpec:
        """The macro."""
        return self.layer_map.spec

    def reseed(self, seed: int) -> None:
        """Restart the random stream of sampled codes at ``seed`` (a stream of kind ``stream`` on ``device``)."""
        self.rng = make_stream(seed, self.stream, self.device)

    def to(self, device: torch.device | str, *, stream: str | None = None) -> None:
        """Compute on ``device`` from now on: tables, plans and correction move there; ``stream`` (``pcg64`` or
        ``device``; default: as before) chooses the random stream the next ``reseed`` makes."""
        if stream is not None and stream not in STREAMS:
            raise ConfigError(f"random stream {stream!r} is not one of {', '.join(STREAMS)}")
        self.device = torch.device(device)
        self.stream = stream or self.stream
        self.pw_sw = self.pw_sw.to(self.device)
        self._plane_lut = self._plane_lut.to(self.device)
        self.set_correction(self.correction)
        self.set_transfer(self.transfer)

    def set_transfer(self, transfer: Transfer) -> None:
        """Switch the ADC transfer (same MacroSpec); its tables are used on the layer's device."""
        if transfer.spec != self.spec:
            raise ConfigError("the transfer's MacroSpec differs from the layer's")
        self.transfer = transfer.to(self.device)
        self._plans = self._make_plans()

    def _make_plans(self) -> list[_TilePlan]:
        spec = self.spec
        plans = []
        for t in self.layer_map.tiles:
            per_vector = t.conversions_per_vector(spec)
            tables = self.transfer.table_index(t.physical_columns(spec)).to(self.device)
            trim = self.transfer.trim_vectors(t.physical_columns(spec))
            plans.append(_TilePlan(
                tile=t,
                groups=t.n_groups(spec),
                offset=t.row_offset(spec),
                tables=tables,
                vectors_per_chunk=max(1, self.chunk_conversions // per_vector),
                bias_rows=tables.to(torch.float32).reshape(1, 1, -1),
                trim=None if trim is None else (trim[0].to(self.device), trim[1].to(self.device)),
            ))
        return plans

    @property
    def fast_exact(self) -> bool:
        """The ideal transfer of a macro whose ADC resolves every level: the MAC is exactly ``x @ W``."""
        tr = self.transfer
        return tr.kind == "ideal" and tr.lossless and tr.shortcut and self.correction is None and tr.trim is None

    def set_correction(self, correction: ColumnCorrection | None) -> None:
        """Correct the MAC outputs per column (None: no correction)."""
        if correction is not None and correction.gain.shape != (self.layer_map.n_cols,):
            raise ShapeError(f"the correction has {correction.gain.shape[0]} columns, the layer "
                             f"{self.layer_map.n_cols}")
        self.correction = None if correction is None else correction.to(self.device)

    def chunk_bound(self) -> int:
        """The most conversions one chunk holds for this layer (a vector is never split)."""
        spec = self.spec
        return max(p.vectors_per_chunk * p.tile.conversions_per_vector(spec) for p in self._plans)

    # ---- the pieces -----------------------------------------------------------------------------------------
    def _digits(self, q: torch.Tensor, plan: _TilePlan) -> torch.Tensor:
        """Stored digits of a tile's logical weights q [K, M] as [groups, rows_per_conversion, S * macro columns]
        (a paired tile's pairs split over its macro columns)."""
        spec = self.spec
        t = plan.tile
        w = q[t.row0 : t.row1, t.col0 : t.col1].to(torch.float64)
        digits = stored_digits(spec, split_pairs(w) if t.paired else w)
        rows = plan.groups * spec.rows_per_conversion
        out = torch.zeros(rows, spec.n_slices, t.macro_cols, dtype=torch.float32, device=q.device)
        out[plan.offset : plan.offset + t.n_rows] = digits.to(torch.float32)
        return out.reshape(plan.groups, spec.rows_per_conversion, spec.n_slices * t.macro_cols)

    def _planes(self, x: torch.Tensor, plan: _TilePlan) -> torch.Tensor:
        """Input slices of a chunk of codes x [n, K] as [groups, n * n_planes, rows_per_conversion] float32."""
        spec = self.spec
        t = plan.tile
        n = x.shape[0]
        R = spec.rows_per_conversion
        codes = x[:, t.row0 : t.row1].to(torch.int32)
        pad_after = plan.groups * R - plan.offset - t.n_rows
        if plan.offset or pad_after:
            codes = torch.nn.functional.pad(codes, (plan.offset, pad_after))  # idle rows of the groups: input 0
        planes = self._plane_lut.index_select(0, codes.reshape(-1))  # [n * G * R, P]
        planes = planes.reshape(n, plan.groups, R, spec.n_planes).permute(1, 0, 3, 2)
        return planes.reshape(plan.groups, n * spec.n_planes, R)

    def _recombine(self, codes: torch.Tensor, x: torch.Tensor, plan: _TilePlan) -> torch.Tensor:
        """Codes [groups, n * P, S * macro columns] -> the tile's MAC outputs [n, macro columns] (float64, integer
        valued)."""
        spec = self.spec
        t = plan.tile
        n = x.shape[0]
        dtype = self._sum_dtype()
        if plan.trim is not None:
            codes = (codes.to(dtype) - plan.trim[0].to(dtype)) * plan.trim[1].to(dtype)
        total = codes.sum(dim=0, dtype=dtype) if plan.groups > 1 else codes[0].to(dtype)
        per_plane = total.reshape(n, spec.n_planes * spec.n_slices, t.macro_cols)
        acc = torch.einsum("nqm,q->nm", per_plane, self.pw_sw.reshape(-1).to(dtype))
        return self._tile_outputs(acc, x, plan)

    def _sum_dtype(self) -> torch.dtype:
        # float32 is exact while |sum code * pw * sw| stays below 2**24 (true for most macros); else float64;
        # trimmed codes are not integers: float64
        exact = self._acc_bound < EXACT_F32 and self.transfer.trim is None
        return torch.float32 if exact else torch.float64

    def _tile_outputs(self, acc: torch.Tensor, x: torch.Tensor, plan: _TilePlan) -> torch.Tensor:
        """``sum code * pw * sw`` [n, M] of a tile -> its MAC outputs (float64): ADC step and weight offset."""
        spec = self.spec
        t = plan.tile
        acc = acc.to(torch.float64)
        if spec.adc_full_scale != spec.adc_max:
            acc = torch.round(acc * spec.adc_full_scale / spec.adc_max)
        if spec.weight_offset:
            acc = acc - spec.weight_offset * x[:, t.row0 : t.row1].to(torch.float64).sum(dim=1, keepdim=True)
        return acc

    # ---- forward / backward ---------------------------------------------------------------------------------
    def forward_values(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The layer's outputs [N, M] (float64, ``adc_lsb`` level units): the MACs (``mac_values``), corrected per
        column when a correction is set; no autograd."""
        mac = self.mac_values(x, q)
        return mac if self.correction is None else self.correction.apply(mac)

    def mac_values(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """MAC outputs [N, M] (float64, in ``adc_lsb`` level units, integer valued: exact) for input codes x [N, K]
        and logical weights q [K, M]; no autograd."""
        lm = self.layer_map
        N = x.shape[0]
        out = torch.zeros(N, lm.n_cols, dtype=torch.float64, device=x.device)
        self.stats = MacroStats()
        if self.fast_exact:
            dtype = self._matmul_dtype()
            if dtype is not None:
                self.stats.conversions = N * lm.conversions_per_vector()
                return (x.to(dtype) @ q.to(dtype)).to(torch.float64)
        tr = self.transfer
        fused = tr.kind == "measured" and tr.layout == "packed"
        pw_sw = self.pw_sw.to(self._sum_dtype())
        for plan in self._plans:
            t = plan.tile
            digits = self._digits(q, plan)
            per_vec = t.conversions_per_vector(self.spec)
            if fused:
                digits_idx = digits * float(tr.n_tables * tr.guide_buckets)
                bias_idx = plan.bias_rows * float(tr.guide_buckets)
                untrimmed = (torch.zeros(1, device=x.device), torch.ones(1, device=x.device))
                trim_off, trim_scale = plan.trim or untrimmed
                trim_off, trim_scale = trim_off.to(pw_sw.dtype), trim_scale.to(pw_sw.dtype)
            for n0 in range(0, N, plan.vectors_per_chunk):
                xc = x[n0 : n0 + plan.vectors_per_chunk]
                planes = self._planes(xc, plan)
                if fused:
                    shape = (plan.groups, planes.shape[1], digits.shape[2])
                    u = draw_uniform32(self.rng, shape, x.device)
                    acc = KERNELS["sample"](planes, digits_idx, bias_idx, u, tr.guide, tr.guide_shift,
                                            tr.guide_buckets, pw_sw, trim_off, trim_scale)
                    mac = self._tile_outputs(acc, xc, plan)
                else:
                    codes = tr.codes(torch.bmm(planes, digits), plan.tables, self.rng)
                    mac = self._recombine(codes, xc, plan)
                out[n0 : n0 + xc.shape[0], t.col0 : t.col1] += join_pairs(mac) if t.paired else mac
                self._count(xc.shape[0] * per_vec)
        return out

    def _matmul_dtype(self) -> torch.dtype | None:
        """The float type in which ``x @ q`` is exact for this layer (None: neither float32 nor float64)."""
        spec = self.spec
        wmax = max(abs(spec.weight_min), abs(spec.weight_max))
        bound = self.layer_map.n_rows * spec.input_max * wmax
        if bound < EXACT_F32:
            return torch.float32
        return torch.float64 if bound < (1 << 53) else None

    def _count(self, conversions: int) -> None:
        self.stats.conversions += conversions
        self.stats.chunks += 1
        self.stats.max_chunk_conversions = max(self.stats.max_chunk_conversions, conversions)

    def backward_values(self, x: torch.Tensor, q: torch.Tensor,
                        grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistical gradients (see the module docstring) of the MAC outputs w.r.t. the input codes [N, K] and
        the logical weights [K, M], given the upstream gradient [N, M]."""
        spec = self.spec
        lm = self.layer_map
        N = x.shape[0]
        if self.correction is not None:
            grad = grad / self.correction.gain
        if self.fast_exact:
            g = grad.to(torch.float32)
            return g @ q.to(torch.float32).T, x.to(torch.float32).T @ g
        gx = torch.zeros(N, lm.n_rows, dtype=torch.float32, device=x.device)
        gq = torch.zeros(lm.n_rows, lm.n_cols, dtype=torch.float32, device=x.device)
        lsb = float(spec.adc_lsb)
        pw_sw = self.pw_sw.to(torch.float32) * lsb  # [P, S]
        plane_norm = float(spec.plane_weights().sum())
        sw = spec.slice_weights()
        slice_mix = torch.tensor(np.sign(sw) / np.abs(sw).sum(), dtype=torch.float32, device=x.device)  # [S]
        R = spec.rows_per_conversion
        for plan in self._plans:
            t = plan.tile
            digits = self._digits(q, plan)  # [G, R, S*M]
            digits_rows = digits * float(self.transfer.n_tables)
            gd = torch.zeros_like(digits)
            for n0 in range(0, N, plan.vectors_per_chunk):
                xc = x[n0 : n0 + plan.vectors_per_chunk]
                n = xc.shape[0]
                planes = self._planes(xc, plan)  # [G, n*P, R]
                gc = grad[n0 : n0 + n, t.col0 : t.col1].to(torch.float32)  # [n, M]
                if t.paired:
                    gc = pair_gradient(gc)  # [n, macro columns]
                g_conv = (gc[:, None, None, :] * pw_sw[None, :, :, None]).reshape(n * spec.n_planes, -1)
                if plan.trim is not None:
                    g_conv = g_conv * plan.trim[1]
                g_planes, g_digits = KERNELS["grads"](planes, digits, digits_rows, plan.bias_rows,
                                                      self.transfer.slope_table, g_conv)
                gd += g_digits
                g_planes = g_planes.reshape(plan.groups, n, spec.n_planes, R).sum(dim=2)  # [G, n, R]
                g_rows = g_planes.permute(1, 0, 2).reshape(n, plan.groups * R)
                g_rows = g_rows[:, plan.offset : plan.offset + t.n_rows]
                g_rows = g_rows / plane_norm
                if spec.weight_offset:
                    g_rows = g_rows - spec.weight_offset * gc.sum(dim=1, keepdim=True)
                gx[n0 : n0 + n, t.row0 : t.row1] += g_rows
            gd = gd.reshape(plan.groups * R, spec.n_slices, t.macro_cols)[plan.offset : plan.offset + t.n_rows]
            gw = torch.einsum("rkm,k->rm", gd, slice_mix)
            gq[t.row0 : t.row1, t.col0 : t.col1] += unpair_weight_gradient(gw) if t.paired else gw
        return gx, gq


class _MacroMatmul(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, q: torch.Tensor, macro: LayerMacro
    ) -> torch.Tensor:
        xd = x.detach()
        codes = torch.round(xd)
        spec = macro.spec
        compact = codes.to(torch.uint8) if spec.input_max < 256 else codes.to(torch.int32)
        qd = torch.round(q.detach())
        ctx.macro = macro
        ctx.save_for_backward(compact, qd)
        return macro.forward_values(codes, qd).to(x.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        compact, qd = ctx.saved_tensors
        gx, gq = ctx.macro.backward_values(compact, qd, grad.contiguous())
        return (gx if ctx.needs_input_grad[0] else None), (gq if ctx.needs_input_grad[1] else None), None


def macro_matmul(x: torch.Tensor, q: torch.Tensor, macro: LayerMacro) -> torch.Tensor:
    """MAC outputs [N, M] of input codes x [N, K] on logical weights q [K, M] (both integer valued float tensors,
    autograd through the statistical gradient). See the module docstring.

    Raises:
        ShapeError: shapes that do not match the layer map.
    """
    lm = macro.layer_map
    if x.ndim != 2 or x.shape[1] != lm.n_rows:
        raise ShapeError(f"input codes must have shape [N, {lm.n_rows}], got {list(x.shape)}")
    if q.shape != (lm.n_rows, lm.n_cols):
        raise ShapeError(f"weights must have shape {[lm.n_rows, lm.n_cols]}, got {list(q.shape)}")
    return _MacroMatmul.apply(x, q, macro)


__all__ = ["DEFAULT_CHUNK_CONVERSIONS", "KERNELS", "ColumnCorrection", "LayerMacro", "compile_kernels", "join_pairs",
           "packed_sample_sum", "pair_gradient", "slope_grads", "split_pairs", "stored_digits",
           "unpair_weight_gradient", "MacroStats", "macro_matmul"]

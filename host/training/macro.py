"""The macro's arithmetic in torch: a layer's product decomposed into conversions, codes drawn, recombined.

For each tile of the layer (``cimlab.mapping``) and each input vector, exactly as ``cimlab.firmware_bridge.spec`` defines
it: input codes split into slices ``x_p``, stored weights into digits ``d_k``, the ideal partial sum of every
conversion ``s[p, g, k, c] = sum_{r in group g} x_p[r] d_k[r, c]``, a code per conversion drawn from the
``Transfer``'s table with one 32-bit uniform (counter-based: ``cimlab.training.transfer.splitmix_uniforms``), the
code decoded when the transfer has a deploy-step decoder, and the digital recombination
``rint(adc_lsb * sum code * plane_weight[p] * slice_weight[k]) - weight_offset * sum x`` (``MacroSpec.recombine``;
no rounding of decoded values). Tiles of one column range add up. With the ideal transfer this is bit-exact with
the twin's ideal MAC (tests/training/test_exact.py).

Stored digits follow the storage (``stored_digits``): two's complement / offset digits of ``w`` (plus the offset) by
place value, or for ``differential`` storage the digits of ``max(w, 0)`` on the positive array's slices and of
``max(-w, 0)`` on the negative array's (their slice weights are negative). A *paired* tile (a layer of both signs
on a unipolar macro, ``cimlab.mapping.Tile.paired``) holds ``max(w, 0)`` and ``max(-w, 0)`` of each output on two
adjacent macro columns (``split_pairs``): the conversions run over both, and each output is the first column's MAC
minus the second's (``join_pairs``). In the backward pass an output's gradient goes to its two columns with opposite
signs and a weight's gradient is the mean of what its two columns' digits receive, signed the same way (with an
ideal ADC: exactly ``x^T dL/dy``, as for the digits of one column). Both implementations below take any digits and
slice weights, so both run paired tiles (over their macro columns) and differential digits.

Two implementations of the same numbers: the C kernels (``cim_kernels.c``, built on first use by
``cimlab.training.native``), which hold no more than one vector's conversions of one row group at a time, and a
torch path (``torch_forward``, ``torch_backward``) used where the C kernels are not available, on every device but
the CPU, and as their reference in the tests; it runs vectors in chunks of at most ``chunk_conversions`` conversions. Both draw the same
uniforms, so they read the same codes. Nothing of size "conversions" is kept for the backward pass: the levels
are recomputed there; only the input codes (as uint8 when they fit) and the weights are saved.

The statistical gradient (backward):

- Paper (D-NAT, JETCAS 2022): the measured D-MAC-EM is discrete, so its sampled codes carry no gradient; they
  propose a "statistical training mechanism" that estimates the gradient of the discrete model from its
  statistics instead of from the sampled code.
- Our reading: the forward pass uses the sampled code; the backward pass differentiates the *expected* (decoded)
  code ``m~(s) = E[value | s]``, smoothed (``cimlab.training.transfer``), at the conversion's ideal level: the
  upstream gradient of a conversion is ``dL/dvalue * m~'(s) * adc_lsb * plane_weight[p] * slice_weight[k]``, and
  ``ds/dx_p[r] = d_k[r, c]``, ``ds/dd_k[r, c] = x_p[r]``.
- Input slices and weight digits are bits of integers, so they need a straight-through rule too. Ours: a change
  ``e`` of an input code is spread evenly over its slices (each slice moves by ``e / sum(plane_weights)``, which
  moves the code by exactly ``e``), so ``dL/dx = sum_p dL/dx_p / sum_p plane_weight[p]``; likewise a weight
  change is spread over its digits with the sign of their place value: ``dL/dw = sum_k sign(sw_k) dL/dd_k /
  sum_k |sw_k|``. With an ideal, unclipped ADC this gives exactly ``dL/dx = dL/dy W^T`` and ``dL/dW = x^T dL/dy``
  (ordinary STE training); with a measured model each bit position is weighted by the slope its conversions see.
  Both sums are taken before the contractions: ``dL/dx`` needs ``sum_p plane_weight[p] m~'`` per (vector, group,
  column), ``dL/dw`` needs ``sum_k |sw_k| m~'`` per (vector, group, plane, output).
- The final rounding to ``adc_lsb`` units is passed straight through.
"""

from __future__ import annotations

import copy
import ctypes
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import LayerMap, Tile
from cimlab.training import native
from cimlab.training.transfer import STREAMS, Stream, Transfer, draw_seed, make_stream, splitmix_uniforms

DEFAULT_CHUNK_CONVERSIONS = 1 << 19
"""Conversions per chunk of the torch path: a chunk's temporaries (a few tensors of this many 4-byte elements)."""
EXACT_F32 = 1 << 24
"""Integers below this are exact in float32."""
KERNEL_LANES = 16
"""Vectors the C kernels take at a time (LANES in cim_kernels.c); their uniforms' counter pads to a multiple."""
BACKENDS = ("auto", "c", "torch")


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


@dataclass
class _TilePlan:
    tile: Tile
    groups: int
    offset: int  # row offset of the tile's first row inside its first group
    tables: torch.Tensor  # int32 [n_slices * macro_cols]: sampling table index per (k, c)
    slopes: torch.Tensor  # int32 [n_slices * macro_cols]: slope table index per (k, c)
    values: torch.Tensor | None  # int32 [n_slices * macro_cols]: the decoder's row offset per (k, c), None: undecoded
    vectors_per_chunk: int  # torch path
    colx: torch.Tensor  # float32 [n_slices * macro_cols]: adc_lsb * sw_k / sum(pw), towards dL/dx
    colq: torch.Tensor  # float32 [n_slices * macro_cols]: adc_lsb * |sw_k| / sum |sw|, towards dL/dw


@dataclass(frozen=True)
class ImageRows:
    """A batch of padded images [batch, channels, height, width] read as the matrix ``torch.nn.functional.unfold``
    makes of them, without making it: vector ``i`` is output pixel ``(i // (out_h * out_w), row, column)``, matrix
    column ``k`` is (channel, kernel row, kernel column). The C kernels read the images in place and add the input
    gradient into an image of the same shape (the im2col and its fold fused into their loads and stores)."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def out(self) -> tuple[int, int]:
        """Output pixels (rows, columns) of each image."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        return (self.height - dh * (kh - 1) - 1) // sh + 1, (self.width - dw * (kw - 1) - 1) // sw + 1

    @property
    def n_vectors(self) -> int:
        """Vectors (output pixels of every image)."""
        ho, wo = self.out
        return self.batch * ho * wo

    @property
    def n_rows(self) -> int:
        """Matrix columns (the layer's rows): channels x kernel positions."""
        return self.channels * self.kernel[0] * self.kernel[1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The images' shape."""
        return self.batch, self.channels, self.height, self.width

    def unfold(self, images: torch.Tensor) -> torch.Tensor:
        """The matrix [n_vectors, n_rows] (the reference the kernels' in-place reads are tested against)."""
        cols = torch.nn.functional.unfold(images, self.kernel, dilation=self.dilation, stride=self.stride)
        return cols.transpose(1, 2).reshape(-1, self.n_rows)


@dataclass
class _Saved:
    """What a forward pass keeps for its backward pass: the input codes and each tile's digits."""

    codes: torch.Tensor  # float32 [N, K], integer valued
    digits: list[torch.Tensor] = field(default_factory=list)


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
    """What the last forward did (for tests and reports): conversions, kernel calls or chunks, the most
    conversions held in memory at once, and the backend (``c``, ``torch`` or ``matmul``)."""

    conversions: int = 0
    max_chunk_conversions: int = 0
    chunks: int = 0
    backend: str = ""


@dataclass
class LayerMacro:
    """A layer on the macro: its tiling, the transfer its conversions follow, and its random stream.

    Attributes:
        layer_map: the tiles (``cimlab.mapping.map_layer``).
        transfer: the ADC transfer (``Transfer.ideal`` for the ideal quantized model).
        rng: random stream of the sampled codes (numpy PCG64, or a ``TorchStream`` on the device; restart it with
            ``reseed``): one 64-bit seed of the counter-based uniforms per tile and call.
        chunk_conversions: most conversions per chunk of the torch path.
        backend: ``c`` (the C kernels), ``torch``, or ``auto`` (C where it is built, for CPU tensors; the torch
            path on every other device).
        device: where the conversions are computed (move with ``to``).
        stream: the kind of ``rng`` that ``reseed`` makes (``transfer.STREAMS``).
    """

    layer_map: LayerMap
    transfer: Transfer
    rng: Stream = field(default_factory=lambda: np.random.Generator(np.random.PCG64(0)))
    chunk_conversions: int = DEFAULT_CHUNK_CONVERSIONS
    stats: MacroStats = field(default_factory=MacroStats)
    correction: ColumnCorrection | None = None
    backend: str = "auto"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stream: str = "pcg64"

    def __post_init__(self) -> None:
        spec = self.spec
        if self.transfer.spec != spec:
            raise ConfigError("the transfer's MacroSpec differs from the layer map's")
        if self.chunk_conversions < 1:
            raise ConfigError(f"chunk_conversions must be >= 1, got {self.chunk_conversions}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        pw, sw = spec.plane_weights(), spec.slice_weights()
        self.pw = torch.from_numpy(pw.astype(np.int32))
        self.sw = torch.from_numpy(sw.astype(np.float64))
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
        self.pw, self.sw = self.pw.to(self.device), self.sw.to(self.device)
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
        tr = self.transfer
        plans = []
        dev = self.device
        for t in self.layer_map.tiles:
            cols = t.physical_columns(spec)
            values = tr.value_index(cols)
            plans.append(_TilePlan(
                tile=t,
                groups=t.n_groups(spec),
                offset=t.row_offset(spec),
                tables=tr.table_index(cols).to(dev),
                slopes=tr.slope_index(cols).to(dev),
                values=None if values is None else values.to(dev),
                vectors_per_chunk=max(1, self.chunk_conversions // t.conversions_per_vector(spec)),
                **{name: v.to(dev) for name, v in self._column_factors(t.macro_cols).items()},
            ))
        return plans

    @property
    def fast_exact(self) -> bool:
        """The ideal transfer of a macro whose ADC resolves every level: the MAC is exactly ``x @ W``."""
        tr = self.transfer
        return (tr.kind == "ideal" and tr.lossless and tr.shortcut and self.correction is None
                and tr.decoder is None)

    def set_correction(self, correction: ColumnCorrection | None) -> None:
        """Correct the MAC outputs per column (None: no correction)."""
        if correction is not None and correction.gain.shape != (self.layer_map.n_cols,):
            raise ShapeError(f"the correction has {correction.gain.shape[0]} columns, the layer "
                             f"{self.layer_map.n_cols}")
        self.correction = None if correction is None else correction.to(self.device)

    def chunk_bound(self) -> int:
        """The most conversions one chunk of the torch path holds for this layer (a vector is never split)."""
        spec = self.spec
        return max(p.vectors_per_chunk * p.tile.conversions_per_vector(spec) for p in self._plans)

    def _kernels(self, x: torch.Tensor) -> native.Kernels | None:
        """The C kernels when this layer uses them for ``x``: on the CPU (other devices take the torch path)."""
        if self.backend == "torch" or x.device.type != "cpu":
            return None
        k = native.kernels()
        if k is None and self.backend == "c":
            raise ConfigError("backend 'c' asked for, but the C kernels are not available (see the log)")
        return k

    # ---- the pieces -----------------------------------------------------------------------------------------
    def _digits(self, q: torch.Tensor, plan: _TilePlan) -> torch.Tensor:
        """Stored digits of a tile's logical weights q [K, M] as int32 [groups, rows_per_conversion, S * macro
        columns] (a paired tile's pairs split over its macro columns)."""
        spec = self.spec
        t = plan.tile
        w = q[t.row0 : t.row1, t.col0 : t.col1].to(torch.float64)
        digits = stored_digits(spec, split_pairs(w) if t.paired else w)
        rows = plan.groups * spec.rows_per_conversion
        out = torch.zeros(rows, spec.n_slices, t.macro_cols, dtype=torch.int32, device=q.device)
        out[plan.offset : plan.offset + t.n_rows] = digits.to(torch.int32)
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

    def _geometry(self, x: torch.Tensor, plan: _TilePlan, images: ImageRows | None = None) -> native.GeomT:
        spec = self.spec
        t = plan.tile
        lm = self.layer_map
        # a paired tile's gradient of its macro columns' weights goes to a buffer of its own (see _c_backward)
        g = native.GeomT(x.shape[0], x.shape[1], t.row0, t.n_rows, plan.offset, plan.groups,
                         spec.rows_per_conversion, spec.n_planes, spec.input_slice_bits,
                         spec.n_slices * t.macro_cols, spec.cell_bits, t.macro_cols,
                         t.macro_cols if t.paired else lm.n_cols)
        if images is not None:
            g.n, g.x_stride, g.conv = images.n_vectors, 0, 1
            g.img_c, g.img_h, g.img_w = images.channels, images.height, images.width
            (g.k_h, g.k_w), (g.s_h, g.s_w), (g.d_h, g.d_w) = images.kernel, images.stride, images.dilation
            g.out_h, g.out_w = images.out
        return g

    def _table(self) -> native.TableT:
        tr = self.transfer
        return native.TableT(tr.guide.data_ptr(), tr.guide_offset.data_ptr(), tr.cum.data_ptr(), tr.guide_shift,
                             tr.guide_buckets,
                             tr.guide_steps, int(tr.layout == "packed"), self.spec.n_codes, tr.n_tables,
                             self.spec.n_levels)

    def _tile_outputs(self, acc: torch.Tensor, x: torch.Tensor, plan: _TilePlan) -> torch.Tensor:
        """``sum_{g, p, k} value * pw * sw`` [n, macro columns] (float64) of a tile -> its MAC outputs [n, M]
        (float64): ADC step (rounded as ``MacroSpec.recombine`` rounds codes; decoded values are not), weight
        offset, and a paired tile's pairs joined."""
        spec = self.spec
        t = plan.tile
        if spec.adc_full_scale != spec.adc_max:
            acc = acc * (spec.adc_full_scale / spec.adc_max)
            if self.transfer.decoder is None:
                acc = torch.round(acc)
        if spec.weight_offset:
            acc = acc - spec.weight_offset * x[:, t.row0 : t.row1].to(torch.float64).sum(dim=1, keepdim=True)
        return join_pairs(acc) if t.paired else acc

    # ---- forward / backward ---------------------------------------------------------------------------------
    def forward_values(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The layer's outputs [N, M] (float64, ``adc_lsb`` level units): the MACs (``mac_values``), corrected per
        column when a correction is set; no autograd."""
        return self._forward(x, q, keep=False)[0]

    def _forward(self, x: torch.Tensor, q: torch.Tensor, *, keep: bool,
                 images: ImageRows | None = None) -> tuple[torch.Tensor, _Saved | None]:
        """``forward_values`` (of the matrix of ``images`` when given) and, with ``keep``, what the backward pass can
        reuse (None: nothing)."""
        if images is not None:
            mac, saved = self._macs(x, q, images)
            saved = saved if keep else None
        else:
            mac, saved = self._macs(x, q) if keep else (self.mac_values(x, q), None)
        return (mac if self.correction is None else self.correction.apply(mac)), saved

    def reads_images(self, x: torch.Tensor) -> bool:
        """Whether this layer's conversions read a convolution's images ``x`` in place (``ImageRows``): with the C
        kernels (on the CPU), through the conversions (not an exact shortcut), without a weight offset."""
        return not self.fast_exact and not self.spec.weight_offset and self._kernels(x) is not None

    def _check_images(self, x: torch.Tensor, images: ImageRows | None) -> None:
        if images is not None and not self.reads_images(x):
            raise ConfigError("a convolution's images are read in place by the C kernels only (see reads_images)")

    def mac_values(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """MAC outputs [N, M] (float64, in ``adc_lsb`` level units; integer valued unless decoded) for input
        codes x [N, K] and logical weights q [K, M]; no autograd."""
        return self._macs(x, q)[0]

    def _macs(self, x: torch.Tensor, q: torch.Tensor,
              images: ImageRows | None = None) -> tuple[torch.Tensor, _Saved]:
        lm = self.layer_map
        N = x.shape[0] if images is None else images.n_vectors
        self.stats = MacroStats()
        self._check_images(x, images)
        if self.fast_exact:
            dtype = self._matmul_dtype()
            if dtype is not None:
                self.stats.conversions = N * lm.conversions_per_vector()
                self.stats.backend = "matmul"
                return (x.to(dtype) @ q.to(dtype)).to(torch.float64), _Saved(x)
        out = torch.zeros(N, lm.n_cols, dtype=torch.float64, device=x.device)
        kern = self._kernels(x)
        codes = x.to(torch.float32).contiguous()  # integer valued
        saved = _Saved(codes)
        for plan in self._plans:
            t = plan.tile
            digits = self._digits(q, plan)
            seed = draw_seed(self.rng)
            if kern is not None:
                acc = self._c_forward(kern, codes, digits, plan, int(seed) & ((1 << 64) - 1), images)
                # the C kernel holds one vector's conversions of one group and plane at a time
                self._count(N * t.conversions_per_vector(self.spec), "c", held=digits.shape[2])
            else:
                acc = self._torch_forward(codes, digits, plan, seed)
            saved.digits.append(digits)
            out[:, t.col0 : t.col1] += self._tile_outputs(acc, codes, plan)
        return out, saved

    def _c_forward(self, kern: native.Kernels, x: torch.Tensor, digits: torch.Tensor, plan: _TilePlan,
                   seed: int, images: ImageRows | None = None) -> torch.Tensor:
        tr = self.transfer
        geometry = self._geometry(x, plan, images)
        acc = torch.empty(geometry.n, plan.tile.macro_cols, dtype=torch.float64)
        dec = tr.value_table
        rc = kern.forward(ctypes.byref(geometry), x.data_ptr(), digits.data_ptr(), self.pw.data_ptr(),
                          self.sw.data_ptr(), ctypes.byref(self._table()), plan.tables.data_ptr(),
                          None if dec is None else dec.data_ptr(),
                          None if plan.values is None else plan.values.data_ptr(), seed, acc.data_ptr())
        if rc != 0:
            raise MemoryError("the C forward kernel ran out of memory")
        return acc

    def _torch_forward(self, x: torch.Tensor, digits: torch.Tensor, plan: _TilePlan,
                       seed: int | torch.Tensor) -> torch.Tensor:
        spec = self.spec
        acc = torch.empty(x.shape[0], plan.tile.macro_cols, dtype=torch.float64, device=x.device)
        digits_f = digits.to(torch.float32)
        for n0 in range(0, x.shape[0], plan.vectors_per_chunk):
            xc = x[n0 : n0 + plan.vectors_per_chunk]
            acc[n0 : n0 + xc.shape[0]] = torch_forward(self.transfer, self._planes(xc, plan), digits_f, plan, n0,
                                                       _padded(x.shape[0]), seed, self.pw, self.sw)
            self._count(xc.shape[0] * plan.tile.conversions_per_vector(spec), "torch")
        return acc

    def _matmul_dtype(self) -> torch.dtype | None:
        """The float type in which ``x @ q`` is exact for this layer (None: neither float32 nor float64)."""
        spec = self.spec
        wmax = max(abs(spec.weight_min), abs(spec.weight_max))
        bound = self.layer_map.n_rows * spec.input_max * wmax
        if bound < EXACT_F32:
            return torch.float32
        return torch.float64 if bound < (1 << 53) else None

    def _count(self, conversions: int, backend: str, held: int | None = None) -> None:
        self.stats.conversions += conversions
        self.stats.chunks += 1
        self.stats.max_chunk_conversions = max(self.stats.max_chunk_conversions, held or conversions)
        self.stats.backend = backend

    def _column_factors(self, n_cols: int) -> dict[str, torch.Tensor]:
        """Per (k, c) of a tile of ``n_cols`` macro columns, float32 [S * n_cols]: ``colx = adc_lsb * sw_k / sum(pw)``
        (towards dL/dx) and ``colq = adc_lsb * |sw_k| / sum |sw|`` (towards dL/dw)."""
        spec = self.spec
        sw = spec.slice_weights().astype(np.float64)
        lsb = float(spec.adc_lsb)
        colx = np.repeat(lsb * sw / float(spec.plane_weights().sum()), n_cols)
        colq = np.repeat(lsb * np.abs(sw) / np.abs(sw).sum(), n_cols)
        return {"colx": torch.from_numpy(colx.astype(np.float32)), "colq": torch.from_numpy(colq.astype(np.float32))}

    def backward_values(self, x: torch.Tensor, q: torch.Tensor, grad: torch.Tensor, saved: _Saved | None = None,
                        images: ImageRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistical gradients (see the module docstring) of the MAC outputs w.r.t. the input codes [N, K] (the
        images [B, C, H, W] when ``images`` describes them) and the logical weights [K, M], given the upstream
        gradient [N, M]; ``saved``: what ``_forward`` kept for these inputs and weights (recomputed where
        missing)."""
        spec = self.spec
        lm = self.layer_map
        N = x.shape[0] if images is None else images.n_vectors
        if self.correction is not None:
            grad = grad / self.correction.gain
        self._check_images(x, images)
        if self.fast_exact:
            g = grad.to(torch.float32)
            return g @ q.to(torch.float32).T, x.to(torch.float32).T @ g
        gx = torch.zeros(x.shape if images is not None else (N, lm.n_rows), dtype=torch.float32, device=x.device)
        gq = torch.zeros(lm.n_rows, lm.n_cols, dtype=torch.float32, device=x.device)
        kern = self._kernels(x)
        codes = saved.codes if saved is not None else x.to(torch.float32).contiguous()
        for k, plan in enumerate(self._plans):
            t = plan.tile
            digits = saved.digits[k] if saved is not None else self._digits(q, plan)
            gc = grad[:, t.col0 : t.col1].to(torch.float32)  # [N, M]
            if t.paired:
                gc = pair_gradient(gc)  # [N, macro columns]
            gc = gc.contiguous()
            if kern is not None:  # accumulates into gx and gq
                self._c_backward(kern, codes, digits, plan, gc, gx, gq, images)
            else:
                g_rows, g_w = self._torch_backward(codes.to(torch.int32), digits, plan, gc)
                gx[:, t.row0 : t.row1] += g_rows
                gq[t.row0 : t.row1, t.col0 : t.col1] += unpair_weight_gradient(g_w) if t.paired else g_w
            if spec.weight_offset:
                gx[:, t.row0 : t.row1] -= spec.weight_offset * gc.sum(dim=1, keepdim=True)
        return gx, gq

    def _c_backward(self, kern: native.Kernels, x: torch.Tensor, digits: torch.Tensor, plan: _TilePlan,
                    gc: torch.Tensor, gx: torch.Tensor, gq: torch.Tensor, images: ImageRows | None = None) -> None:
        """The backward of a tile in C (levels recomputed), added into the layer's gx (x's shape: [N, K], or the
        images') and gq [K, M]; gc: the upstream gradient of the tile's macro columns [N, macro columns]. A paired
        tile's weight gradient comes out per macro column into a buffer of its own, and goes into gq with its pairs
        joined."""
        t = plan.tile
        geometry = self._geometry(x, plan, images)
        n = geometry.n
        tr = self.transfer
        M = t.macro_cols
        gt = torch.zeros(_padded(n), M, dtype=torch.float32)  # the upstream gradient by blocks of lanes
        gt[:n] = gc
        gt = gt.reshape(-1, KERNEL_LANES, M).transpose(1, 2).contiguous()
        g_w = torch.zeros(t.n_rows, M, dtype=torch.float32) if t.paired else gq[t.row0 :, t.col0 :]
        rc = kern.backward(ctypes.byref(geometry), x.data_ptr(), digits.data_ptr(), self.pw.data_ptr(),
                           tr.slope_table.data_ptr(), plan.slopes.data_ptr(), tr.n_slope, self.spec.n_levels,
                           gt.data_ptr(), plan.colx.data_ptr(), plan.colq.data_ptr(), gx.data_ptr(), g_w.data_ptr())
        if rc != 0:
            raise MemoryError("the C backward kernel ran out of memory")
        if t.paired:
            gq[t.row0 : t.row1, t.col0 : t.col1] += unpair_weight_gradient(g_w)

    def _torch_backward(self, x: torch.Tensor, digits: torch.Tensor, plan: _TilePlan,
                        gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = plan.tile
        g_rows = torch.zeros(x.shape[0], t.n_rows, dtype=torch.float32, device=x.device)
        g_w = torch.zeros(t.n_rows, t.macro_cols, dtype=torch.float32, device=x.device)
        digits_f = digits.to(torch.float32)
        for n0 in range(0, x.shape[0], plan.vectors_per_chunk):
            xc = x[n0 : n0 + plan.vectors_per_chunk]
            n = xc.shape[0]
            rows, w = torch_backward(self.transfer, self._planes(xc, plan), digits_f, plan, gc[n0 : n0 + n],
                                     plan.colx, plan.colq, self.pw)
            g_rows[n0 : n0 + n] = rows
            g_w += w
        return g_rows, g_w


def _padded(n: int) -> int:
    """``n`` rounded up to a multiple of the C kernels' lanes."""
    return -(-n // KERNEL_LANES) * KERNEL_LANES


def _levels(planes: torch.Tensor, digits: torch.Tensor, n_planes: int) -> torch.Tensor:
    """Levels int32 [G, n, P, S * M] of input slices [G, n * P, R] and digits [G, R, S * M] (float32 products of
    small integers: exact)."""
    G, nP, _ = planes.shape
    return torch.bmm(planes, digits).to(torch.int32).reshape(G, nP // n_planes, n_planes, digits.shape[2])


def torch_forward(tr: Transfer, planes: torch.Tensor, digits: torch.Tensor, plan: _TilePlan, first: int, ne: int,
                  seed: int | torch.Tensor, pw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """One chunk of the forward in torch: ``sum_{g, p, k} pw[p] * sw[k] * value(code)`` [n, M] (float64) for input
    slices [G, n * P, R] of vectors ``first ..`` and digits [G, R, S * M] (float32), the uniforms of the call
    ``seed`` (conversion (i, g, p, c) draws uniform ``((g * P + p) * C + c) * ne + i``, ``ne`` the call's vectors
    rounded up to the C kernels' lanes)."""
    P = pw.shape[0]
    levels = _levels(planes, digits, P)
    G, n, _, C = levels.shape
    dev = planes.device
    i = torch.arange(first, first + n, dtype=torch.int64, device=dev)[None, :, None, None]
    g = torch.arange(G, dtype=torch.int64, device=dev)[:, None, None, None]
    p = torch.arange(P, dtype=torch.int64, device=dev)[None, None, :, None]
    c = torch.arange(C, dtype=torch.int64, device=dev)[None, None, None, :]
    u = splitmix_uniforms(seed, ((g * P + p) * C + c) * ne + i)
    codes = tr.codes_from_uniforms(levels, plan.tables, u)
    if tr.value_table is None:
        value = codes.to(torch.float64)
    else:
        idx = (codes + plan.values).reshape(-1)
        value = tr.value_table.index_select(0, idx).reshape(codes.shape).to(torch.float64)
    acc = torch.einsum("gnpc,p->nc", value, pw.to(torch.float64))
    return torch.einsum("nkm,k->nm", acc.reshape(n, sw.shape[0], C // sw.shape[0]), sw)


def torch_backward(tr: Transfer, planes: torch.Tensor, digits: torch.Tensor, plan: _TilePlan, gc: torch.Tensor,
                   colx: torch.Tensor, colq: torch.Tensor, pw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of the backward in torch: (dL/dx of the tile's rows [n, n_rows], dL/dw [n_rows, M]) for input
    slices [G, n * P, R], digits [G, R, S * M] (float32) and the upstream gradient gc [n, M] (see
    ``cim_backward`` in cim_kernels.c for the sums)."""
    t = plan.tile
    P = pw.shape[0]
    levels = _levels(planes, digits, P)
    G, n, _, C = levels.shape
    M = gc.shape[1]
    S = C // M
    sl = tr.slope_table.index_select(0, (levels * tr.n_slope + plan.slopes).reshape(-1)).reshape(levels.shape)
    pwf = pw.to(torch.float32)
    sa = torch.einsum("gnpc,p->gnc", sl, pwf) * (gc.repeat(1, S) * colx)[None]  # [G, n, C]
    g_groups = torch.bmm(sa, digits.transpose(1, 2))  # [G, n, R]
    R = digits.shape[1]
    g_rows = g_groups.permute(1, 0, 2).reshape(n, G * R)[:, plan.offset : plan.offset + t.n_rows]
    sb = (sl.reshape(G, n, P, S, M) * colq.reshape(S, M)).sum(dim=3)  # [G, n, P, M]
    sb = sb * pwf[None, None, :, None] * gc[None, :, None, :]
    g_w = torch.bmm(planes.transpose(1, 2), sb.reshape(G, n * P, M)).reshape(G * R, M)
    return g_rows, g_w[plan.offset : plan.offset + t.n_rows]


class _MacroMatmul(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, q: torch.Tensor, macro: LayerMacro, images: ImageRows | None
    ) -> torch.Tensor:
        codes = torch.round(x.detach())
        qd = torch.round(q.detach())
        ctx.macro = macro
        ctx.images = images
        out, ctx.saved = macro._forward(codes, qd, keep=any(ctx.needs_input_grad[:2]), images=images)
        ctx.save_for_backward(qd)
        return out.to(x.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        (qd,) = ctx.saved_tensors
        saved, ctx.saved = ctx.saved, None
        gx, gq = ctx.macro.backward_values(saved.codes, qd, grad.contiguous(), saved, ctx.images)
        return (gx if ctx.needs_input_grad[0] else None), (gq if ctx.needs_input_grad[1] else None), None, None


def macro_matmul(x: torch.Tensor, q: torch.Tensor, macro: LayerMacro, images: ImageRows | None = None
                 ) -> torch.Tensor:
    """MAC outputs [N, M] of input codes x [N, K] on logical weights q [K, M] (both integer valued float tensors,
    autograd through the statistical gradient). See the module docstring. With ``images``, x holds a convolution's
    padded images (``ImageRows.shape``) and the matrix is theirs, read in place (only where
    ``macro.reads_images(x)``).

    Raises:
        ShapeError: shapes that do not match the layer map.
    """
    lm = macro.layer_map
    if images is not None:
        if tuple(x.shape) != images.shape or images.n_rows != lm.n_rows:
            raise ShapeError(f"input images must have shape {list(images.shape)} and {lm.n_rows} matrix columns, "
                             f"got {list(x.shape)} and {images.n_rows}")
    elif x.ndim != 2 or x.shape[1] != lm.n_rows:
        raise ShapeError(f"input codes must have shape [N, {lm.n_rows}], got {list(x.shape)}")
    if q.shape != (lm.n_rows, lm.n_cols):
        raise ShapeError(f"weights must have shape {[lm.n_rows, lm.n_cols]}, got {list(q.shape)}")
    return _MacroMatmul.apply(x, q, macro, images)


__all__ = ["BACKENDS", "DEFAULT_CHUNK_CONVERSIONS", "ColumnCorrection", "ImageRows", "LayerMacro", "MacroStats",
           "join_pairs", "macro_matmul", "pair_gradient", "split_pairs", "stored_digits", "torch_backward", "torch_forward",
           "unpair_weight_gradient"]

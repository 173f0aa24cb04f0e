"""CIM layers: ``CIMLinear``, ``CIMConv1d``, ``CIMConv2d``, and ``convert`` that swaps torch layers for them.

A CIM layer computes what the macro and its host compute together:

1. the input is clipped to the layer's E-PACT bounds and quantized to unsigned codes (``quant.InputQuantizer``);
   a convolution pads with zeros *before* quantizing, as the host pads its activations;
2. the weights are quantized to the integers the macro stores (``quant``: per output channel, or on the range every
   layer shares with ``uniform`` quantization), within the layer's polarity (``bipolar``, ``unipolar-pos``,
   ``unipolar-neg``); on a unipolar (``unsigned``) macro a unipolar-neg layer programs magnitudes and negates its
   scale, and a bipolar layer goes on pairs of adjacent columns;
3. the product of codes and integer weights runs on the macro (``macro.macro_matmul``): tiles
   (``cimlab.mapping``), conversions, codes from the layer's ``Transfer`` (ideal / measured / gaussian), recombined;
4. digitally: ``y = scale_w * (delta * MAC + lo * sum_r q[r, m]) + bias``.

Under the ideal transfer of a macro whose ADC resolves every level, step 3 is exactly ``codes @ q`` and the layer
takes that shortcut (a plain matmul / convolution); otherwise it decomposes into conversions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cimlab.firmware_bridge.errors import ConfigError, ShapeError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import POLARITIES, LayerMap, map_layer, map_paired_layer
from cimlab.training.macro import (
    DEFAULT_CHUNK_CONVERSIONS,
    EXACT_F32,
    ColumnCorrection,
    ImageRows,
    LayerMacro,
    macro_matmul,
)
from cimlab.training.quant import (
    QUANT_SCHEMES,
    InputQuantizer,
    UniformRanges,
    quantize_weights,
    quantize_weights_range,
    stores_negated,
    stores_on_pairs,
    weight_levels,
)
from cimlab.training.transfer import Transfer


@dataclass
class MacroOperands:
    """What the host sends to and gets from the macro for one forward pass of a layer (numpy, int64).

    Attributes:
        inputs: input codes [N, K] (for a convolution, one row per output position).
        weights: logical weights [K, M] (signed for a layer on column pairs, which ``layer_map`` splits).
        mac: the layer's MAC outputs [N, M], tiles of a column range added (``adc_lsb`` level units).
        layer_map: the tiling.
    """

    inputs: np.ndarray
    weights: np.ndarray
    mac: np.ndarray
    layer_map: LayerMap


class CIMLayer(nn.Module):
    """Common part of the CIM layers (weights, quantizers, macro). Not used directly."""

    def __init__(self, spec: MacroSpec, in_rows: int, out_cols: int, *, transfer: Transfer | None = None,
                 learn: str = "epact", chunk_conversions: int = DEFAULT_CHUNK_CONVERSIONS, polarity: str = "bipolar",
                 ranges: UniformRanges | None = None) -> None:
        super().__init__()
        if not isinstance(spec, MacroSpec):
            raise ConfigError(f"spec must be a MacroSpec, got {type(spec).__name__}")
        self.spec = spec
        self.in_rows, self.out_cols = int(in_rows), int(out_cols)
        if ranges is not None:
            self.ranges: UniformRanges | None = ranges
            self.act = ranges.act
        else:
            self.ranges = None
            self.act = InputQuantizer(spec.input_max, learn)
        transfer = transfer or Transfer.ideal(spec)
        self.polarity = "bipolar"
        self.macro = LayerMacro(map_layer(spec, in_rows, out_cols), transfer, chunk_conversions=chunk_conversions)
        self._set_polarity(polarity)

    def _set_polarity(self, polarity: str) -> None:
        self.qmin, self.qmax = weight_levels(self.spec, polarity)
        self.polarity = polarity
        spec, old = self.spec, self.macro
        cut = map_paired_layer if self.paired else map_layer
        self.macro = LayerMacro(cut(spec, self.in_rows, self.out_cols), old.transfer, rng=old.rng,
                                chunk_conversions=old.chunk_conversions, backend=old.backend)
        self.macro.to(old.device, stream=old.stream)

    @property
    def paired(self) -> bool:
        """Whether the layer's outputs sit on pairs of adjacent columns (a bipolar layer on a unipolar macro)."""
        return stores_on_pairs(self.spec, self.polarity)

    @property
    def negated(self) -> bool:
        """Whether the layer programs magnitudes ``-q`` with its scale negated (unipolar-neg on a unipolar macro)."""
        return stores_negated(self.spec, self.polarity)

    # subclasses set: weight (Parameter [M, ...]), bias (Parameter [M] or None)
    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def transfer(self) -> Transfer:
        """The ADC transfer the layer's conversions follow."""
        return self.macro.transfer

    def set_transfer(self, transfer: Transfer) -> None:
        """Switch the transfer (ConfigError for another MacroSpec)."""
        self.macro.set_transfer(transfer)

    def quantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the integer weights the macro is programmed with [M, K], straight-through; per-channel scale [M]).

        For a unipolar-neg layer on a unipolar macro these are magnitudes and the scale is negative, so
        ``scale * q`` is always the quantized weight."""
        w = self.weight.reshape(self.weight.shape[0], -1)
        if self.ranges is None:
            q, scale = quantize_weights(w, self.qmin, self.qmax)
        else:
            q, scale = quantize_weights_range(w, self.ranges.w_max, self.qmin, self.qmax, self.ranges.learns_weights)
        return (-q, -scale) if self.negated else (q, scale)

    @torch.no_grad()
    def project(self) -> None:
        """Clip the float weights to the layer's sign (``unipolar-pos``: >= 0, ``unipolar-neg``: <= 0)."""
        if self.polarity == "unipolar-pos":
            self.weight.clamp_(min=0.0)
        elif self.polarity == "unipolar-neg":
            self.weight.clamp_(max=0.0)

    def _mac(self, codes: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """MAC outputs [N, M] of codes [N, K] and programmed weights q [M, K]."""
        return macro_matmul(codes, q.T, self.macro)

    def _finish(self, acc: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor,
                lo: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * acc.ndim
        shape[channel_dim] = -1
        y = (acc * delta + lo * q.sum(dim=1).reshape(shape)) * scale.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y

    def macro_matrix_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Input codes [N, K] this layer drives the macro with for input x (no autograd); each layer type
        implements it."""
        raise NotImplementedError(f"{type(self).__name__} does not define its macro inputs")

    @torch.no_grad()
    def macro_operands(self, x: torch.Tensor) -> MacroOperands:
        """Input codes, programmed weights and MAC outputs of one forward pass (for deploy and for tests)."""
        codes = self.macro_matrix_inputs(x)
        q, _ = self.quantized_weights()
        weights = torch.round(q).T
        mac = self.macro.mac_values(codes, weights)
        return MacroOperands(codes.to(torch.int64).numpy(), weights.to(torch.int64).numpy(),
                             mac.to(torch.int64).numpy(), self.macro.layer_map)


class CIMLinear(CIMLayer):
    """``nn.Linear`` on the macro. Input [..., in_features] -> [..., out_features]."""

    def __init__(self, in_features: int, out_features: int, spec: MacroSpec, bias: bool = True,
                 **kwargs: object) -> None:
        super().__init__(spec, in_features, out_features, **kwargs)  # type: ignore[arg-type]
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(f"{type(self).__name__} expects inputs [..., {self.in_features}], "
                             f"got {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        lead = x.shape[:-1]
        codes, delta, lo = self.act(x.reshape(-1, self.in_features))
        q, scale = self.quantized_weights()
        y = self._finish(self._mac(codes, q), q, scale, delta, lo, 1)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def macro_matrix_inputs(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        codes, _, _ = self.act(x.reshape(-1, self.in_features))
        return torch.round(codes)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _pair(v: int | tuple[int, ...], n: int, what: str) -> tuple[int, ...]:
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n or not all(isinstance(i, int) and i >= 0 for i in t):
        raise ConfigError(f"{what} must be {n} non-negative integer(s), got {v!r}")
    return t


class _CIMConv(CIMLayer):
    """Convolution on the macro through im2col; 1-D convolutions run as 2-D ones of height 1."""

    dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...], spec: MacroSpec,
                 stride: int | tuple[int, ...] = 1, padding: int | str | tuple[int, ...] = 0,
                 dilation: int | tuple[int, ...] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", **kwargs: object) -> None:
        if groups != 1:
            raise ConfigError(f"CIM convolutions support groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise ConfigError(f"CIM convolutions pad with zeros only, got padding_mode={padding_mode!r}")
        n = self.dims
        k = _pair(kernel_size, n, "kernel_size")
        s = _pair(stride, n, "stride")
        d = _pair(dilation, n, "dilation")
        if isinstance(padding, str):
            if padding == "valid":
                pads = [(0, 0)] * n
            elif padding == "same":
                if any(v != 1 for v in s):
                    raise ConfigError("padding='same' needs stride 1")
                spans = [di * (ki - 1) for ki, di in zip(k, d, strict=True)]
                pads = [(span // 2, span - span // 2) for span in spans]
            else:
                raise ConfigError(f"padding must be 'valid', 'same' or integers, got {padding!r}")
        else:
            pads = [(p, p) for p in _pair(padding, n, "padding")]
        super().__init__(spec, in_channels * int(np.prod(k)), out_channels, **kwargs)  # type: ignore[arg-type]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = k
        self.stride = s
        self.dilation = d
        self.pads = tuple(pads)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    # 2-D views of everything
    def _k2(self) -> tuple[int, int]:
        return (1, self.kernel_size[0]) if self.dims == 1 else (self.kernel_size[0], self.kernel_size[1])

    def _s2(self) -> tuple[int, int]:
        return (1, self.stride[0]) if self.dims == 1 else (self.stride[0], self.stride[1])

    def _d2(self) -> tuple[int, int]:
        return (1, self.dilation[0]) if self.dims == 1 else (self.dilation[0], self.dilation[1])

    def _pad2(self) -> tuple[int, int, int, int]:
        if self.dims == 1:
            (l0, r0), = self.pads
            return (l0, r0, 0, 0)
        (t0, b0), (l0, r0) = self.pads
        return (l0, r0, t0, b0)

    def _as2d(self, x: torch.Tensor) -> torch.Tensor:
        want = self.dims + 2
        if x.ndim != want or x.shape[1] != self.in_channels:
            dims = "[batch, channels, length]" if self.dims == 1 else "[batch, channels, height, width]"
            raise ShapeError(f"{type(self).__name__} expects inputs {dims} with {self.in_channels} channels, "
                             f"got {list(x.shape)}")
        x2 = x.unsqueeze(2) if self.dims == 1 else x
        x2 = F.pad(x2, self._pad2())
        kh, kw = self._k2()
        dh, dw = self._d2()
        if x2.shape[2] < dh * (kh - 1) + 1 or x2.shape[3] < dw * (kw - 1) + 1:
            raise ShapeError(f"{type(self).__name__}: input {list(x.shape)} is smaller than the kernel "
                             f"{self.kernel_size}")
        return x2

    def _image_rows(self, codes: torch.Tensor) -> ImageRows:
        """The padded input codes [B, C, H, W] as the macro's input matrix (im2col)."""
        return ImageRows(codes.shape[0], self.in_channels, codes.shape[2], codes.shape[3], self._k2(), self._s2(),
                         self._d2())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._as2d(x)
        codes, delta, lo = self.act(x2)
        q, scale = self.quantized_weights()
        M = self.out_channels
        if self.macro.fast_exact and self._conv_exact():
            w = q.reshape(M, self.in_channels, *self._k2())
            acc = F.conv2d(codes, w, stride=self._s2(), dilation=self._d2())
            if acc.device.type != "cpu":  # a GPU's fast convolutions (Winograd, FFT) round: the sums are integers
                acc = acc + (torch.round(acc) - acc).detach()
        else:
            B = codes.shape[0]
            images = self._image_rows(codes)
            if self.macro.reads_images(codes):  # the C kernels read the im2col matrix in place
                acc = macro_matmul(codes, q.T, self.macro, images)
            else:
                acc = self._mac(images.unfold(codes), q)
            ho, wo = images.out
            acc = acc.reshape(B, ho * wo, M).transpose(1, 2).reshape(B, M, ho, wo)
        y = self._finish(acc, q, scale, delta, lo, 1)
        return y.squeeze(2) if self.dims == 1 else y

    def _conv_exact(self) -> bool:
        spec = self.spec
        bound = self.macro.layer_map.n_rows * spec.input_max * max(abs(spec.weight_min), abs(spec.weight_max))
        return bound < EXACT_F32

    @torch.no_grad()
    def macro_matrix_inputs(self, x: torch.Tensor) -> torch.Tensor:
        codes, _, _ = self.act(self._as2d(x))
        return torch.round(self._image_rows(codes).unfold(codes))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"pads={self.pads}, dilation={self.dilation}, bias={self.bias is not None}")


class CIMConv1d(_CIMConv):
    """``nn.Conv1d`` on the macro. Input [batch, channels, length]."""

    dims = 1


class CIMConv2d(_CIMConv):
    """``nn.Conv2d`` on the macro. Input [batch, channels, height, width]."""

    dims = 2


# ---- conversion of a torch model -------------------------------------------------------------------------------
def _layer_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), index]).generate_state(1, np.uint64)[0] >> 1)


def convert(model: nn.Module, spec: MacroSpec, transfer: Transfer | None = None, *, learn: str = "epact",
            exclude: Iterable[str] = (), seed: int = 0, chunk_conversions: int = DEFAULT_CHUNK_CONVERSIONS,
            quant: str = "per-layer", polarity: str | dict[str, str] | None = None) -> nn.Module:
    """Swap every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of ``model`` (in place) for its CIM layer,
    keeping weights and biases; returns the model.

    Args:
        spec: the macro.
        transfer: the ADC transfer (default: ideal).
        learn: E-PACT variant of the input quantizers (``epact``, ``pact``, ``fixed``); with ``uniform``,
            ``fixed`` also fixes the shared weight range.
        exclude: qualified module names to leave digital.
        seed: seeds each layer's random stream (layer ``i`` gets a seed derived from ``(seed, i)``).
        chunk_conversions: most conversions per chunk.
        quant: ``per-layer`` ranges, or ``uniform`` (one weight and one input range shared by every layer; the
            weight range starts at the 99th percentile of ``|w|`` over the layers, see ``quant``).
        polarity: every layer's polarity (one of ``POLARITIES``), or {qualified name: polarity} (layers not named
            are ``bipolar``); unipolar layers' weights are clipped to their sign.

    Call ``calibrate`` before training or evaluating so the input bounds fit the data.
    """
    if transfer is not None and transfer.spec != spec:
        raise ConfigError("the transfer's MacroSpec differs from spec")
    if quant not in QUANT_SCHEMES:
        raise ConfigError(f"quantization {quant!r} is not one of {', '.join(QUANT_SCHEMES)}")
    excluded = set(exclude)
    names = {name for name, _ in model.named_modules()}
    unknown = excluded - names
    if unknown:
        raise ConfigError(f"exclude names modules the model does not have: {', '.join(sorted(unknown))}")
    chosen = _polarity_of(model, polarity, excluded)
    ranges = UniformRanges(spec.input_max, learn) if quant == "uniform" else None
    common = {"transfer": transfer, "learn": learn, "chunk_conversions": chunk_conversions, "ranges": ranges}
    index = 0

    def swap(parent: nn.Module, prefix: str) -> None:
        nonlocal index
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            if full in excluded:
                continue
            new: CIMLayer | None = None
            pol = chosen.get(full, "bipolar")
            if isinstance(child, CIMLayer):
                new = None
            elif isinstance(child, nn.Linear):
                new = CIMLinear(child.in_features, child.out_features, spec, bias=child.bias is not None,
                                polarity=pol, **common)
            elif isinstance(child, nn.Conv1d | nn.Conv2d):
                cls = CIMConv1d if isinstance(child, nn.Conv1d) else CIMConv2d
                new = cls(child.in_channels, child.out_channels, child.kernel_size, spec, stride=child.stride,
                          padding=child.padding, dilation=child.dilation, groups=child.groups,
                          bias=child.bias is not None, padding_mode=child.padding_mode, polarity=pol, **common)
            if new is not None:
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    if child.bias is not None and new.bias is not None:
                        new.bias.copy_(child.bias)
                new.project()
                new.macro.reseed(_layer_seed(seed, index))
                index += 1
                setattr(parent, name, new)
            else:
                swap(child, f"{full}.")

    swap(model, "")
    if ranges is not None:
        ranges.fit_weights([layer.weight for _, layer in cim_layers(model)])
    return model


def _polarity_of(model: nn.Module, polarity: str | dict[str, str] | None, excluded: set[str]) -> dict[str, str]:
    """{qualified name: polarity} of the layers ``convert`` will swap (ConfigError for an unknown name or polarity)."""
    swappable = [name for name, m in model.named_modules()
                 if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d) and name not in excluded]
    if polarity is None:
        return {}
    if isinstance(polarity, str):
        chosen = dict.fromkeys(swappable, polarity)
    else:
        chosen = dict(polarity)
        unknown = sorted(set(chosen) - set(swappable))
        if unknown:
            raise ConfigError(f"polarity names layer(s) {', '.join(unknown)} the model does not put on the macro "
                              f"(it has {', '.join(swappable)})")
    bad = sorted({p for p in chosen.values() if p not in POLARITIES})
    if bad:
        raise ConfigError(f"polarity {bad[0]!r} is not one of {', '.join(POLARITIES)}")
    return chosen


def cim_layers(model: nn.Module) -> Iterator[tuple[str, CIMLayer]]:
    """The model's CIM layers with their qualified names, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, CIMLayer):
            yield name, m


def set_transfer(model: nn.Module, transfer: Transfer) -> None:
    """Give every CIM layer of the model this ADC transfer."""
    for _, layer in cim_layers(model):
        layer.set_transfer(transfer)


def reseed(model: nn.Module, seed: int) -> None:
    """Restart every CIM layer's random stream from ``seed`` (layer ``i`` from ``(seed, i)``)."""
    for i, (_, layer) in enumerate(cim_layers(model)):
        layer.macro.reseed(_layer_seed(seed, i))


def set_learn(model: nn.Module, learn: str) -> None:
    """Which input bounds learn in every CIM layer: ``epact``, ``pact`` or ``fixed`` (with ``uniform`` ranges,
    ``fixed`` also fixes the shared weight range)."""
    for _, layer in cim_layers(model):
        if layer.ranges is not None:
            layer.ranges.set_learn(learn)
        else:
            layer.act.set_learn(learn)


def model_quant(model: nn.Module) -> str:
    """``uniform`` when the model's CIM layers share one set of ranges, else ``per-layer``."""
    return "uniform" if any(layer.ranges is not None for _, layer in cim_layers(model)) else "per-layer"


def model_polarity(model: nn.Module) -> dict[str, str]:
    """{layer name: polarity} of the model's CIM layers."""
    return {name: layer.polarity for name, layer in cim_layers(model)}


@torch.no_grad()
def project_polarity(model: nn.Module) -> None:
    """Clip every unipolar CIM layer's float weights to its sign (after each optimizer step: projected gradient
    descent, so a unipolar layer never holds a weight of the other sign)."""
    for _, layer in cim_layers(model):
        layer.project()


def model_spec(model: nn.Module) -> MacroSpec | None:
    """The MacroSpec of the model's CIM layers (None for a model without any)."""
    specs = {layer.spec for _, layer in cim_layers(model)}
    if len(specs) > 1:
        raise ConfigError("the model's CIM layers are for different MacroSpecs")
    return next(iter(specs), None)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], *, quantile: float = 0.999,
              max_samples: int = 1 << 20) -> dict[str, tuple[float, float]]:
    """Set each CIM layer's input bounds from data: ``hi`` at the ``quantile`` of its inputs, ``lo`` at the
    ``1 - quantile`` quantile when inputs go negative, else 0. Runs the model (in eval mode) on ``batches``.

    Returns {layer name: (lo, hi)}.
    """
    if not 0.5 < quantile <= 1.0:
        raise ConfigError(f"quantile must be in (0.5, 1], got {quantile}")
    layers = dict(cim_layers(model))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    gen = torch.Generator().manual_seed(0)

    def hook(name: str):  # noqa: ANN202
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            flat = args[0].detach().reshape(-1).float()
            if flat.numel() > max_samples:
                flat = flat[torch.randint(flat.numel(), (max_samples,), generator=gen)]
            seen[name].append(flat)
        return record

    handles = [layer.act.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for xb in batches:
            model(xb)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    bounds = {}
    groups: dict[int, list[str]] = {}
    for name, layer in layers.items():  # layers with one shared quantizer (uniform ranges) get one pooled range
        groups.setdefault(id(layer.act), []).append(name)
    for members in groups.values():
        for name in members:
            if not seen[name]:
                raise ConfigError(f"calibration saw no inputs for layer {name!r}")
        share = max_samples // len(members)
        parts = []
        for name in members:  # each layer weighs the same in a pooled range
            v = torch.cat(seen[name])
            parts.append(v[torch.randint(v.numel(), (share,), generator=gen)] if v.numel() > share else v)
        v = torch.cat(parts)
        hi = float(torch.quantile(v, quantile))
        vmin = float(v.min())
        lo = float(torch.quantile(v, 1.0 - quantile)) if vmin < 0 else 0.0
        if hi <= lo:
            hi = lo + max(abs(lo), 1.0) * 1e-2
        act = layers[members[0]].act
        act.lo.fill_(lo)
        act.hi.fill_(hi)
        act.calibrated.fill_(True)
        for name in members:
            bounds[name] = (lo, hi)
    return bounds


@torch.no_grad()
def calibrate_columns(model: nn.Module, batches: Iterable[torch.Tensor], *,
                      batch_norm: bool = True) -> dict[str, ColumnCorrection]:
    """The per-chip deploy-time step: fit each CIM layer's per-column correction (``ColumnCorrection``) on the
    chip the layers compute on now (an error model, or the chip itself behind ``cimlab.deploy.runner``), and
    re-estimate the batch-norm statistics on that chip.

    Layer by layer in module order, with the layers before already corrected: the calibration inputs (no labels)
    run through the model, the layer's input codes are sent to its macro once more, and its MAC outputs are fitted
    against the exact integer MACs of the same codes and programmed weights (``codes @ weights``, which the host
    knows). With ``batch_norm`` (and batch-norm layers in the model), every batch norm's running mean and variance
    are then measured afresh on the same inputs (``recalibrate_batch_norm``), so the next layer sees its inputs as
    normalised on this chip: statistics learned under other chips' errors (a population, or a chip's read noise)
    do not fit this one. Costs one pass of ``batches`` per CIM layer (two with batch norm). Returns {layer name:
    correction}, also set on the layers.
    """
    batches = list(batches)
    if not batches:
        raise ConfigError("column calibration needs at least one batch of inputs")
    layers = list(cim_layers(model))
    for _, layer in layers:
        layer.macro.set_correction(None)
    norms = batch_norms(model) if batch_norm else []
    was = model.training
    model.eval()
    fitted: dict[str, ColumnCorrection] = {}
    try:
        for name, layer in layers:
            codes: list[torch.Tensor] = []
            handle = layer.register_forward_pre_hook(
                lambda mod, args: codes.append(mod.macro_matrix_inputs(args[0])))  # type: ignore[misc]
            try:
                for xb in batches:
                    model(xb)
            finally:
                handle.remove()
            x = torch.cat(codes)
            q, _ = layer.quantized_weights()
            weights = torch.round(q).T
            measured = layer.macro.mac_values(x, weights)
            ideal = x.to(torch.float64) @ weights.to(torch.float64)
            fitted[name] = ColumnCorrection.fit(measured, ideal)
            layer.macro.set_correction(fitted[name])
            if norms:
                recalibrate_batch_norm(model, batches)
    finally:
        model.train(was)
    return fitted


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's batch-norm layers that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Measure every batch norm's running mean and variance afresh: the equally weighted average over
    ``batches`` (no labels) of the batch statistics, the rest of the model in eval mode (on the chip or error
    model the CIM layers compute on now). Affine parameters are kept. Returns the number of batch-norm layers."""
    norms = batch_norms(model)
    batches = list(batches)
    if not norms:
        return 0
    if not batches:
        raise ConfigError("batch-norm recalibration needs at least one batch of inputs")
    was = model.training
    momenta = [bn.momentum for bn in norms]
    model.eval()
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches
            bn.train()
        for xb in batches:
            model(xb)
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        model.train(was)
    return len(norms)


def set_columns(model: nn.Module, corrections: dict[str, ColumnCorrection] | None) -> None:
    """Give the CIM layers these per-column corrections (by layer name; None: remove every correction)."""
    layers = dict(cim_layers(model))
    if corrections is not None and set(corrections) != set(layers):
        raise ConfigError(f"corrections for layers {sorted(corrections)}, the model has {sorted(layers)}")
    for name, layer in layers.items():
        layer.macro.set_correction(None if corrections is None else corrections[name])


def clear_columns(model: nn.Module) -> None:
    """Remove every CIM layer's per-column correction."""
    set_columns(model, None)


__all__ = ["CIMConv1d", "CIMConv2d", "CIMLayer", "CIMLinear", "MacroOperands", "batch_norms", "calibrate",
           "calibrate_columns", "cim_layers", "clear_columns", "convert", "model_polarity", "model_quant",
           "model_spec", "project_polarity", "recalibrate_batch_norm", "reseed", "set_columns", "set_learn",
           "set_transfer"]

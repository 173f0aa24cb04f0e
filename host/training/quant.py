"""Quantizers of the CIM layers: weights to the macro's integers, activations to unsigned input codes (E-PACT).

Weights, by storage and polarity (``weight_levels``): a layer's integers ``q`` span ``qmin .. qmax``:

- ``twos`` / ``offset`` storage: signed, ``|q| <= 2**(weight_bits-1) - 1``;
- ``unsigned`` (a unipolar NVM crossbar) and ``differential``: each cell group holds a magnitude
  ``0 .. 2**weight_bits - 1``, so ``|q| <= 2**weight_bits - 1``. On an ``unsigned`` macro a ``unipolar-pos`` layer is
  programmed as it is, a ``unipolar-neg`` layer as magnitudes ``-q`` with its scale negated (one array, no digital
  zero point), and a ``bipolar`` layer as pairs of adjacent columns ``max(q, 0)``, ``max(-q, 0)``
  (``cimlab.mapping.map_paired_layer``);
- ``unipolar-pos`` / ``unipolar-neg`` layers keep ``q >= 0`` / ``q <= 0`` on every macro.

Two quantization schemes (``QUANT_SCHEMES``):

- ``per-layer``: a scale per output channel, ``scale = max|w| / top`` (detached, ``top = max(|qmin|, qmax)``),
  ``q = round(w / scale)`` clipped, the rounding straight-through; and each layer its own input bounds.
- ``uniform`` (García-Redondo et al. 2020): one weight range and one input range shared by *every* CIM layer
  (``UniformRanges``), so one ADC/DAC design serves all layers and training makes the network fit them. The weight
  step is ``w_max / top`` for all layers and channels; ``w_max`` is learned with LSQ's step-size gradient (Esser et
  al., ICLR 2020: through the rounding residual inside the range and the clip bound outside, which plain autograd
  gives once the clip is differentiated) or fixed (``learn="fixed"``) at the 99th percentile of ``|w|`` over every
  layer. The input bounds are one E-PACT quantizer that every layer uses (its bounds learn from all layers' inputs).

Activations, E-PACT:

- Paper (D-NAT): PACT learns an upper clipping bound of the activations; E-PACT ("extended PACT") learns a lower
  and an upper bound per layer, trading quantization range against quantization error.
- Our reading: each CIM layer clips its input to ``[lo, hi]`` (two learned scalars) and quantizes the clipped
  value to the unsigned code ``round((x - lo) / delta)``, ``delta = (hi - lo) / input_max``, which is what the
  macro is driven with; ``lo`` times the weights' column sums is added back digitally, as the host does. The
  gradients are PACT's, applied at both ends: ``dy/dhi = 1`` where ``x >= hi``, ``dy/dlo = 1`` where ``x <= lo``,
  ``dy/dx = 1`` in between, and the rounding (and ``delta`` inside the code) is straight-through, so the
  bounds learn only from clipped elements. ``learn="pact"`` learns ``hi`` only (``lo`` stays where calibration put
  it); ``learn="fixed"`` learns neither (fixed clipping).
"""

from __future__ import annotations

import torch
from torch import nn

from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec
from cimlab.mapping import POLARITIES

LEARN = ("epact", "pact", "fixed")
QUANT_SCHEMES = ("per-layer", "uniform")
"""Weight and input ranges per layer, or one of each shared by every layer (see the module docstring)."""
WEIGHT_RANGE_QUANTILE = 0.99
"""Where a fixed (or initial) shared weight range sits: this quantile of |w| over every layer, layers weighted
equally."""
MIN_RANGE = 1e-4
"""Smallest ``hi - lo`` the forward pass uses (keeps ``delta`` positive)."""


def weight_top(spec: MacroSpec) -> int:
    """Largest weight magnitude the macro stores: ``2**weight_bits - 1`` where a cell group holds a magnitude
    (``unsigned``, ``differential``), ``2**(weight_bits-1) - 1`` for signed storage."""
    top = spec.weight_max
    if top < 1:
        raise ConfigError(f"MacroSpec.weight_bits={spec.weight_bits} leaves no signed weight levels; need >= 2")
    return top


def weight_levels(spec: MacroSpec, polarity: str = "bipolar") -> tuple[int, int]:
    """``(qmin, qmax)`` of a layer's quantized weights on this macro under ``polarity`` (see the module docstring)."""
    if polarity not in POLARITIES:
        raise ConfigError(f"polarity {polarity!r} is not one of {', '.join(POLARITIES)}")
    top = weight_top(spec)
    return {"bipolar": (-top, top), "unipolar-pos": (0, top), "unipolar-neg": (-top, 0)}[polarity]


def stores_on_pairs(spec: MacroSpec, polarity: str) -> bool:
    """Whether a layer of this polarity goes on pairs of adjacent columns: a bipolar layer on a unipolar macro."""
    return spec.weight_storage == "unsigned" and polarity == "bipolar"


def stores_negated(spec: MacroSpec, polarity: str) -> bool:
    """Whether a layer is programmed as magnitudes ``-q`` (scale negated): a unipolar-neg layer on a unipolar macro."""
    return spec.weight_storage == "unsigned" and polarity == "unipolar-neg"


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def quantize_weights(w: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization of w [M, K] to ``qmin .. qmax``: (q [M, K] integer valued, straight-through;
    scale [M] = max|w| / max(|qmin|, qmax), detached)."""
    top = max(-qmin, qmax)
    scale = w.detach().abs().amax(dim=1).clamp_min(1e-12) / top
    v = w / scale[:, None]
    q = v + (torch.round(v).clamp(qmin, qmax) - v).detach()
    return q, scale


def quantize_weights_range(w: torch.Tensor, w_max: torch.Tensor, qmin: int, qmax: int,
                           learn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, K] quantized on the shared range ``w_max`` (``uniform``): (q [M, K], scale [M], every entry
    ``w_max / top``). With ``learn``, ``w_max`` gets LSQ's step-size gradient (the clip is differentiated, the rounding
    straight-through); weights outside the range get no gradient, as in LSQ."""
    top = max(-qmin, qmax)
    step = w_max.clamp_min(1e-8) / top
    if not learn:
        step = step.detach()
    c = (w / step).clamp(qmin, qmax)
    return _round_ste(c), step.expand(w.shape[0])


class InputQuantizer(nn.Module):
    """E-PACT: clip to learned ``[lo, hi]`` and quantize to unsigned input codes (see the module docstring).

    Args:
        input_max: largest input code (``MacroSpec.input_max``).
        learn: ``epact`` (both bounds), ``pact`` (upper bound only) or ``fixed``.
        lo, hi: initial bounds (``calibrate`` sets them from data).
    """

    def __init__(self, input_max: int, learn: str = "epact", lo: float = 0.0, hi: float = 1.0) -> None:
        super().__init__()
        if learn not in LEARN:
            raise ConfigError(f"quantizer {learn!r} is not one of {', '.join(LEARN)}")
        if not hi > lo:
            raise ConfigError(f"the upper bound hi={hi} must exceed the lower bound lo={lo}")
        self.input_max = int(input_max)
        self.learn = learn
        self.lo = nn.Parameter(torch.tensor(float(lo)), requires_grad=learn == "epact")
        self.hi = nn.Parameter(torch.tensor(float(hi)), requires_grad=learn in ("epact", "pact"))
        self.register_buffer("calibrated", torch.tensor(False))

    def set_learn(self, learn: str) -> None:
        """Which bounds learn: ``epact``, ``pact`` or ``fixed``."""
        if learn not in LEARN:
            raise ConfigError(f"quantizer {learn!r} is not one of {', '.join(LEARN)}")
        self.learn = learn
        self.lo.requires_grad_(learn == "epact")
        self.hi.requires_grad_(learn in ("epact", "pact"))

    def step(self) -> torch.Tensor:
        """Input value of one code step, ``(hi - lo) / input_max`` (detached)."""
        return ((self.hi - self.lo).detach().clamp_min(MIN_RANGE)) / self.input_max

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (float, integer valued, straight-through) of x, with the detached step and lower bound."""
        lo = self.lo
        hi = torch.maximum(self.hi, lo.detach() + MIN_RANGE)
        clipped = torch.where(x <= lo, lo, torch.where(x >= hi, hi, x))
        lo_d = lo.detach()
        delta = self.step()
        u = (clipped - lo_d) / delta
        codes = u + (torch.round(u).clamp(0, self.input_max) - u).detach()
        return codes, delta, lo_d

    def extra_repr(self) -> str:
        return f"input_max={self.input_max}, learn={self.learn}, lo={self.lo.item():.4g}, hi={self.hi.item():.4g}"


class UniformRanges(nn.Module):
    """One weight range and one input range shared by every CIM layer of a network (``uniform``).

    Attributes:
        act: the E-PACT input quantizer every layer uses.
        w_max: the weight range (weights are quantized on ``-w_max .. w_max``), learned unless ``learn == "fixed"``.
    """

    def __init__(self, input_max: int, learn: str = "epact", w_max: float = 1.0) -> None:
        super().__init__()
        self.act = InputQuantizer(input_max, learn)
        self.w_max = nn.Parameter(torch.tensor(float(w_max)), requires_grad=learn != "fixed")

    @property
    def learns_weights(self) -> bool:
        """Whether ``w_max`` learns."""
        return self.act.learn != "fixed"

    def set_learn(self, learn: str) -> None:
        """Which ranges learn: ``fixed`` freezes both, ``epact``/``pact`` learn the weight range and those bounds."""
        self.act.set_learn(learn)
        self.w_max.requires_grad_(learn != "fixed")

    @torch.no_grad()
    def fit_weights(self, weights: list[torch.Tensor], samples: int = 1 << 16) -> float:
        """Set ``w_max`` to ``WEIGHT_RANGE_QUANTILE`` of ``|w|`` over the given layers' weights (each layer weighted
        equally: at most ``samples`` of each, drawn with a fixed seed); returns it."""
        if not weights:
            raise ConfigError("a shared weight range needs at least one layer's weights")
        gen = torch.Generator().manual_seed(0)
        per = []
        for w in weights:
            flat = w.detach().abs().reshape(-1).float()
            per.append(flat[torch.randint(flat.numel(), (samples,), generator=gen)])
        value = max(float(torch.quantile(torch.cat(per), WEIGHT_RANGE_QUANTILE)), 1e-6)
        self.w_max.fill_(value)
        return value

    def extra_repr(self) -> str:
        return f"w_max={self.w_max.item():.4g}, learns_weights={self.learns_weights}"


__all__ = ["LEARN", "QUANT_SCHEMES", "InputQuantizer", "UniformRanges", "quantize_weights", "quantize_weights_range",
           "stores_negated", "stores_on_pairs", "weight_levels", "weight_top"]

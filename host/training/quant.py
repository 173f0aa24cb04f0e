"""Quantizers of the CIM layers: weights to the macro's integers, activations to unsigned input codes (E-PACT).

Weights: per output channel, symmetric, ``q = round(w / scale)`` in ``-qmax .. qmax`` with
``qmax = 2**(weight_bits-1) - 1`` and ``scale = max|w| / qmax`` (detached); the rounding is straight-through.
``unsigned`` storage holds ``q + 2**(weight_bits-1)`` and the host removes the zero point digitally.

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

LEARN = ("epact", "pact", "fixed")
MIN_RANGE = 1e-4
"""Smallest ``hi - lo`` the forward pass uses (keeps ``delta`` positive)."""


def weight_qmax(spec: MacroSpec) -> int:
    """Largest magnitude of a signed quantized weight: ``2**(weight_bits-1) - 1``."""
    qmax = 2 ** (spec.weight_bits - 1) - 1
    if qmax < 1:
        raise ConfigError(f"MacroSpec.weight_bits={spec.weight_bits} leaves no signed weight levels; need >= 2")
    return qmax


def weight_zero_point(spec: MacroSpec) -> int:
    """What the host adds to a signed weight before programming it: nonzero only for ``unsigned`` storage."""
    return 2 ** (spec.weight_bits - 1) if spec.weight_storage == "unsigned" else 0


def quantize_weights(w: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of w [M, K]: (q [M, K] integer valued, straight-through; scale [M])."""
    scale = w.detach().abs().amax(dim=1).clamp_min(1e-12) / qmax
    v = w / scale[:, None]
    q = v + (torch.round(v).clamp(-qmax, qmax) - v).detach()
    return q, scale


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


__all__ = ["LEARN", "InputQuantizer", "quantize_weights", "weight_qmax", "weight_zero_point"]

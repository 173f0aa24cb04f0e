"""Device errors of resistive (NVM) multi-level cells: the stage between the digits a cell is asked to hold and the
conductance it computes with.

A cell of ``cell_bits`` bits holds one of ``2**cell_bits`` conductance levels spread evenly over the device's window
``g_min_us .. g_max_us``: level ``k`` targets ``G_k = g_min + k * dG`` with ``dG = (g_max - g_min) / cell_max``. The
array subtracts ``g_min`` per driven row (a reference column of cells at ``g_min``), so an ideal cell contributes
exactly its digit ``k``; the twin's partial sums are counted in units of ``dG`` (one level), as the MacroSpec's are.
What a real cell contributes instead (``DeviceParams``, all off by default):

- **programming error**: write-verify stops within a spread of the target; 1 sigma ``prog_sigma_us +
  prog_sigma_slope * G_k`` (uS), a linear fit in the target conductance; a static draw per cell (reprogramming a cell
  to the same level lands it at the same conductance: the twin's mismatch depends on its seed only);
- **level overlap**: after verify, the conductance relaxes and the distributions of neighbouring levels widen into
  each other; 1 sigma ``relax_sigma_us`` (uS), also static per cell. With the programming error it sets
  how far adjacent levels overlap: ``level_overlap`` gives the fraction of cells that end nearer another level's
  target than their own (more for 4-bit cells than for 2-bit ones in the same window);
- **read noise**: each read of a cell fluctuates by ``read_sigma_rel`` of its conductance (1 sigma). The cells on one
  bit line add up, so the twin applies it per conversion, as one Gaussian of the size it has for a conversion with
  half its rows driven at the top input slice and cells spread evenly over the levels (``read_noise_lsb``), added in
  quadrature to the ADC's own noise: an estimate, not a per-cell draw, that keeps the conversion a table look-up;
- **stuck devices**: ``AnalogParams.stuck_at_0`` / ``stuck_at_1``: cells that stay at ``g_min`` / ``g_max`` whatever
  is written; they get no programming error.

The default values of the ``nvm-*`` profiles come from published measurements, named in each field's ``source``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cimlab.firmware_bridge.spec import MacroSpec

MILO_2021 = ("V. Milo et al., 'Optimized programming algorithms for multilevel RRAM in hardware neural networks', "
             "IEEE IRPS 2021, Fig. 4 (IGVVA-100 write-verify on HfO2 RRAM, 50-225 uS); linear fit as in Sandia "
             "CrossSim's RRAM_Milo device model")
WAN_2022 = ("W. Wan et al., 'A compute-in-memory chip based on resistive random-access memory', Nature 608, 2022, "
            "Extended Data Fig. 3: conductance spread 1 s and 1 day after programming; IBM aihwkit's "
            "ReRamWan2022NoiseModel polynomial fit (g_max 40 uS) at mid window: the spread grows from 2.02 uS (1 s) "
            "to 3.91 uS (1 day), a relaxation of sqrt(3.91**2 - 2.02**2) = 3.35 uS")
AIHWKIT_READ = ("IBM aihwkit, ReRamWan2022NoiseModel documentation: short-term read (1/f) noise of about 1 % of the "
                "conductance, not separately reported by Wan et al. 2022")


def _param(default: float, lo: float, hi: float, unit: str, doc: str, source: str = "") -> Any:
    return field(default=default, metadata={"range": (lo, hi), "unit": unit, "doc": doc, "source": source})


@dataclass(frozen=True)
class DeviceParams:
    """Device errors of multi-level NVM cells (see the module docstring). Off while ``g_max_us`` is 0."""

    g_min_us: float = _param(0.0, 0.0, 1e5, "uS", "Conductance of the lowest level (the reference column's cells).",
                             MILO_2021)
    g_max_us: float = _param(0.0, 0.0, 1e5, "uS", "Conductance of the top level; 0 turns the device stage off.",
                             MILO_2021)
    prog_sigma_us: float = _param(0.0, 0.0, 1e4, "uS",
                                  "Programming error after write-verify, 1 sigma: the fit's value at G = 0.", MILO_2021)
    prog_sigma_slope: float = _param(0.0, -1.0, 1.0, "uS/uS",
                                     "Change of the programming error with the target conductance.", MILO_2021)
    relax_sigma_us: float = _param(0.0, 0.0, 1e4, "uS",
                                   "Level overlap: relaxation of the conductance after verify, 1 sigma.", WAN_2022)
    read_sigma_rel: float = _param(0.0, 0.0, 1.0, "relative", "Read noise of one cell, 1 sigma, per read.",
                                   AIHWKIT_READ)

    @property
    def enabled(self) -> bool:
        """Whether the stage changes anything (a conductance window is given)."""
        return self.g_max_us > 0

    def level_step_us(self, spec: MacroSpec) -> float:
        """Conductance between adjacent levels ``dG``, uS."""
        return (self.g_max_us - self.g_min_us) / spec.cell_max

    def level_conductances(self, spec: MacroSpec) -> np.ndarray:
        """Target conductance of each level ``0 .. cell_max``, uS."""
        return self.g_min_us + self.level_step_us(spec) * np.arange(spec.cell_max + 1)

    def sigma_levels(self, spec: MacroSpec) -> np.ndarray:
        """1-sigma static error of a cell at each level (programming and relaxation), in levels ``dG``."""
        g = self.level_conductances(spec)
        prog = np.maximum(self.prog_sigma_us + self.prog_sigma_slope * g, 0.0)
        relax = self.relax_sigma_us
        return np.sqrt(prog**2 + relax**2) / self.level_step_us(spec)

    def level_overlap(self, spec: MacroSpec) -> float:
        """Fraction of cells (levels equally used) whose static error takes them past half a level step, toward
        a neighbouring level: how far the level distributions overlap."""
        sig = self.sigma_levels(spec)
        nd = [math.erfc(0.5 / (s * math.sqrt(2.0))) / 2.0 if s > 0 else 0.0 for s in sig]
        inner = [2 * p if 0 < k < spec.cell_max else p for k, p in enumerate(nd)]  # the end levels have one neighbour
        return float(np.mean(inner))

    def read_noise_levels(self, spec: MacroSpec) -> float:
        """Read noise of one conversion, 1 sigma, in levels (see the module docstring)."""
        if not self.enabled or self.read_sigma_rel == 0:
            return 0.0
        g = self.level_conductances(spec)
        driven = spec.rows_per_conversion / 2.0
        sigma_us = self.read_sigma_rel * math.sqrt(driven * float(np.mean(g**2))) * spec.slice_max
        return sigma_us / self.level_step_us(spec)

    def programmed_levels(self, spec: MacroSpec, digits: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The levels cells asked to hold ``digits`` compute with (float64), given their static standard normals
        ``z`` (same shape): target plus programming and relaxation error, never below the window (G >= 0)."""
        sig = self.sigma_levels(spec)
        d = digits.astype(np.int64)
        floor = -self.g_min_us / self.level_step_us(spec)
        return np.maximum(d + sig[d] * z, floor)

    def check(self, where: str) -> None:
        """ConfigError when the window is inverted."""
        from cimlab.firmware_bridge.errors import ConfigError

        if self.enabled and not self.g_max_us > self.g_min_us:
            raise ConfigError(f"{where}: DeviceParams.g_max_us={self.g_max_us} must exceed g_min_us={self.g_min_us}")


__all__ = ["AIHWKIT_READ", "MILO_2021", "WAN_2022", "DeviceParams"]

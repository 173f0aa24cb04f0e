"""The conversion: where every non-ideality of the twin acts. Two plug-ins behind one small interface.

A converter owns the integer weights the array computes with (``compute_digits``) and turns the array's partial
sums into ADC codes, vectorised (``convert``) or one conversion at a time (``convert_one``, used by the reference
mode). Both give bit-identical codes because:

- partial sums are sums of small integers (cell variation is quantised to ``1/cell_grid`` of a nominal cell),
  exact in float32 whatever the summation order, as long as they stay below 2**24 (checked);
- after that, each conversion is the same short sequence of correctly rounded float32 operations
  (multiply, add, add), then truncation and table look-ups: no transcendental function per conversion;
- the random items of a vector come from ``cimlab.chip_sim.rng.VectorStream`` keyed by its global index.

``AnalyticConverter``: per-column gain and offset, per-cell variation, stuck compute cells, read noise, and an ADC
transfer with INL/DNL and clipping shared by all columns (one reference ladder), all depending on VDD and
temperature. The analog value is binned at ``SUB_LEVEL`` bins per level and a look-up table gives each bin's
code (thresholds resolve to 1/SUB_LEVEL of a level). Noise is one 16-bit random index per conversion into a table
of the 65536 quantiles of a normal (a Gaussian truncated at +-4.32 sigma): cheaper than drawing a normal, and
identical scalar or vectorised.

``DataDrivenConverter``: each code is drawn from the measured P(code | s, column) of a
``cimlab.firmware_bridge.errmodel.ErrorModel`` (one 32-bit uniform per conversion).
"""

from __future__ import annotations

import functools
import math
import statistics
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from cimlab.chip_sim.config import AnalogParams
from cimlab.chip_sim.devices import DeviceParams
from cimlab.chip_sim.rng import VectorStream, static_generator
from cimlab.firmware_bridge.errmodel import CodeSampler, ErrorModel
from cimlab.firmware_bridge.errors import ConfigError
from cimlab.firmware_bridge.spec import MacroSpec

SUB_LEVEL = 128
"""Bins per ideal level in the ADC look-up table (threshold resolution 1/128 level)."""
CELL_GRID = 1024
"""Nominal cell current in grid units when cells vary (variation resolution 1/1024)."""
EXACT_LIMIT = 2**24
"""Integers below this are exact in float32, so partial sums must stay below it."""
NOISE_TABLE_BITS = 16


@functools.lru_cache(maxsize=1)
def normal_quantiles() -> np.ndarray:
    """The 65536 quantiles ``Phi^-1((i + 0.5) / 65536)`` of a standard normal, float64 (read-only)."""
    n = 1 << NOISE_TABLE_BITS
    nd = statistics.NormalDist()
    table = np.array([nd.inv_cdf((i + 0.5) / n) for i in range(n)], dtype=np.float64)
    table.setflags(write=False)
    return table


@dataclass(frozen=True)
class FusedConversion:
    """``Converter.convert`` as tables, for the fused engines (``cimlab.chip_sim.fastpath``), which replay it exactly.

    Attributes:
        item_bytes: bytes of the random item each conversion reads now (0: none is read, none is drawn).
        scale, shift, noise, lut: the analytic converter's float32 scale and shift per column, its noise table
            (None without noise) and its ADC look-up table (``kind == "analytic"``).
        sampler: the data-driven converter's sampler (``kind == "sampled"``).
    """

    kind: str
    item_bytes: int
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    noise: np.ndarray | None = None
    lut: np.ndarray | None = None
    sampler: CodeSampler | None = None


class Converter(ABC):
    """Turns partial sums into ADC codes. ``item_dtype`` is the random item one conversion consumes."""

    spec: MacroSpec
    item_dtype: np.dtype | None
    code_dtype: np.dtype

    def set_conditions(self, vdd_mv: int, temp_c: float) -> None:  # noqa: B027 - optional
        """Supply (mV) and die temperature (degC) changed."""

    @abstractmethod
    def compute_digits(self, digits: np.ndarray, row0: int) -> np.ndarray:
        """Stored digits [n, J] of rows ``row0 ..`` -> the integer weights the array computes with [n, J]."""

    @abstractmethod
    def convert(self, sums: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        """Partial sums [G, n, P, J] float32 (overwritten) and random items [n, P, G, J] -> codes [G, n, P, J]."""

    @abstractmethod
    def convert_one(self, s: int, j: int, item: int) -> int:
        """One conversion: integer partial sum ``s`` of column ``j`` and its random item -> its code."""

    @abstractmethod
    def fused(self) -> FusedConversion:
        """``convert`` at the present conditions, as tables for the fused engines."""

    def stream(self, seed: int) -> VectorStream | None:
        """The per-vector random stream this converter needs (None when it needs none)."""
        if self.item_dtype is None:
            return None
        return VectorStream(seed, self.spec.conversions_per_vector, self.item_dtype)


class AnalyticConverter(Converter):
    """The parametric analog model (see the module docstring).

    Args:
        spec: the macro.
        params: the profile's analog parameters.
        seed: the twin's seed (static mismatch is drawn from it).
        device: errors of multi-level NVM cells (``cimlab.chip_sim.devices``), applied to the stored digits before
            the cell variation; None or a disabled one leaves the digits as they are.
    """

    def __init__(self, spec: MacroSpec, params: AnalogParams, seed: int, device: DeviceParams | None = None) -> None:
        self.spec = spec
        self.params = params
        self.device = device if device is not None and device.enabled else None
        self.code_dtype = spec.code_dtype
        J = spec.physical_cols
        rows_pad = spec.n_groups * spec.rows_per_conversion
        rng = static_generator(seed)
        # Every map is drawn, in this order, whatever the parameters: a twin's mismatch depends on its seed only.
        z_gain = rng.standard_normal(J)
        z_offset = rng.standard_normal(J)
        z_cell = rng.standard_normal((rows_pad, J))
        u_stuck = rng.random((rows_pad, J))
        z_thr = rng.standard_normal(spec.adc_max)
        # the device stage's per-cell draws come last, so profiles without it keep the maps they always had
        self.z_device = rng.standard_normal((rows_pad, J)) if self.device is not None else None

        self.gain = 1.0 + params.gain_sigma * z_gain
        self.offset_lsb = params.offset_sigma_lsb * z_offset
        self.cell_grid = self._cell_grid(params.cell_sigma, self.device is not None)
        if params.cell_sigma > 0:
            q = np.rint(self.cell_grid * (1.0 + params.cell_sigma * z_cell))
            self.cell_units = np.maximum(q, 0).astype(np.int64)
        else:
            self.cell_units = np.full((rows_pad, J), self.cell_grid, dtype=np.int64)
        self.stuck0 = u_stuck < params.stuck_at_0
        self.stuck1 = (~self.stuck0) & (u_stuck < params.stuck_at_0 + params.stuck_at_1)
        s_eff_max = spec.s_max * int(self.cell_units.max(initial=1)) * self._device_headroom()
        if s_eff_max >= EXACT_LIMIT:
            raise ConfigError(
                f"partial sums up to {s_eff_max} grid units exceed 2**24 and would not be exact in float32; "
                "reduce rows_per_conversion, cell_bits or input_slice_bits"
            )

        # ADC thresholds (levels) shared by all columns: ideal (m + 0.5) LSB, plus INL bow and DNL.
        m = np.arange(spec.adc_max)
        self.exact_thresholds = params.adc_dnl_sigma_lsb == 0 and params.adc_inl_bow_lsb == 0
        x = 2.0 * (m + 0.5) / spec.adc_max - 1.0
        err = params.adc_inl_bow_lsb * (1.0 - x * x) + params.adc_dnl_sigma_lsb * z_thr
        self.thresholds = np.maximum.accumulate((m + 0.5 + err) * spec.adc_lsb)
        self._build_lut()
        # a noisy profile draws its items even at a supply where the noise vanishes, so the items of later
        # vectors do not depend on the VDD history
        self.read_noise_lsb = 0.0 if self.device is None else self.device.read_noise_levels(spec) / spec.adc_lsb
        self.item_dtype = np.dtype(np.uint16) if params.noise_sigma_lsb > 0 or self.read_noise_lsb > 0 else None
        self.set_conditions(params.vdd_nominal_mv, params.temp_nominal_c)

    def _device_headroom(self) -> int:
        """How far programmed levels may exceed the top digit, as a factor on ``s_max`` (1 without the stage)."""
        if self.device is None:
            return 1
        return math.ceil(1.0 + 8.0 * float(self.device.sigma_levels(self.spec).max()) / self.spec.cell_max)

    def _cell_grid(self, cell_sigma: float, device: bool = False) -> int:
        if cell_sigma == 0 and not device:
            return 1
        grid = CELL_GRID
        top = (1.0 + 8.0 * cell_sigma) * self._device_headroom()
        while grid > 1 and self.spec.s_max * grid * top >= EXACT_LIMIT:
            grid //= 2
        return grid

    def _build_lut(self) -> None:
        spec = self.spec
        lo = math.floor(min(0.0, float(self.thresholds[0]))) - 1
        hi = math.ceil(max(float(self.thresholds[-1]), spec.s_max)) + 2
        self.lut_low = lo
        n_bins = (hi - lo) * SUB_LEVEL
        i = np.arange(n_bins, dtype=np.int64)
        if self.exact_thresholds:
            # bin left edge e = lo + i/R; code = #{m : (m + 1/2) * fs / adc_max <= e}, in integers
            keys = (2 * np.arange(spec.adc_max, dtype=np.int64) + 1) * spec.adc_full_scale * SUB_LEVEL
            edges = 2 * spec.adc_max * (lo * SUB_LEVEL + i)
            codes = np.searchsorted(keys, edges, side="right")
        else:
            codes = np.searchsorted(self.thresholds, lo + i / SUB_LEVEL, side="right")
        self.lut = codes.astype(self.code_dtype)

    def set_conditions(self, vdd_mv: int, temp_c: float) -> None:
        p = self.params
        rel_v = (vdd_mv - p.vdd_nominal_mv) / p.vdd_nominal_mv
        d_t = temp_c - p.temp_nominal_c
        gain_cond = (1.0 + p.gain_vdd_coeff * rel_v) * (1.0 + p.gain_tempco_ppm * 1e-6 * d_t)
        lsb = self.spec.adc_lsb
        self.scale = (self.gain * gain_cond * SUB_LEVEL / self.cell_grid).astype(np.float32)
        offset_levels = (self.offset_lsb + p.offset_tempco_lsb * d_t) * lsb
        self.shift = ((offset_levels - self.lut_low) * SUB_LEVEL).astype(np.float32)
        kelvin = math.sqrt((temp_c + 273.15) / (p.temp_nominal_c + 273.15))
        self.noise_lsb = p.noise_sigma_lsb * max(0.0, 1.0 + p.noise_vdd_coeff * rel_v) * kelvin
        if self.read_noise_lsb:  # the cells' read noise, relative to their conductance: follows the gain only
            self.noise_lsb = math.hypot(self.noise_lsb, self.read_noise_lsb)
        self.noise_table = None
        if self.noise_lsb > 0:
            self.noise_table = (normal_quantiles() * (self.noise_lsb * lsb * SUB_LEVEL)).astype(np.float32)

    def compute_digits(self, digits: np.ndarray, row0: int) -> np.ndarray:
        rows = slice(row0, row0 + digits.shape[0])
        d = digits.astype(np.int64)
        d = np.where(self.stuck0[rows], 0, np.where(self.stuck1[rows], self.spec.cell_max, d))
        if self.device is None:
            return d * self.cell_units[rows]
        levels = self.device.programmed_levels(self.spec, d, self.z_device[rows])
        levels = np.where(self.stuck0[rows] | self.stuck1[rows], d, levels)  # stuck cells are not programmed
        return np.rint(levels * self.cell_units[rows]).astype(np.int64)

    def convert(self, sums: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        np.multiply(sums, self.scale, out=sums)
        np.add(sums, self.shift, out=sums)
        if self.noise_table is not None and items is not None:
            noise = self.noise_table.take(items)
            np.add(sums, noise.transpose(2, 0, 1, 3), out=sums)
        return self.lut.take(sums.astype(np.intp), mode="clip")

    def fused(self) -> FusedConversion:
        noisy = self.noise_table is not None and self.item_dtype is not None
        return FusedConversion("analytic", self.item_dtype.itemsize if noisy else 0,  # type: ignore[union-attr]
                               scale=self.scale, shift=self.shift, noise=self.noise_table, lut=self.lut)

    def convert_one(self, s: int, j: int, item: int) -> int:
        t = np.float32(s) * self.scale[j]
        t = t + self.shift[j]
        if self.noise_table is not None:
            t = t + self.noise_table[item]
        index = min(max(int(t), 0), self.lut.size - 1)
        return int(self.lut[index])


class DataDrivenConverter(Converter):
    """Codes drawn from a measured error model: a twin of one measured chip.

    The model's MacroSpec must equal the profile's. VDD and temperature registers still act on the energy
    estimate, not on the codes (the model holds one set of conditions).
    """

    def __init__(self, spec: MacroSpec, model: ErrorModel) -> None:
        if model.spec != spec:
            diff = [
                f"{k}: model {v} vs profile {getattr(spec, k)}"
                for k, v in model.spec.to_dict().items()
                if getattr(spec, k) != v
            ]
            raise ConfigError("the error model's MacroSpec differs from the profile's: " + "; ".join(diff))
        self.spec = spec
        self.model = model
        self.sampler = model.sampler()
        self.item_dtype = np.dtype(np.uint32)
        self.code_dtype = spec.code_dtype

    def compute_digits(self, digits: np.ndarray, row0: int) -> np.ndarray:
        return digits.astype(np.int64)

    def convert(self, sums: np.ndarray, items: np.ndarray | None) -> np.ndarray:
        if items is None:
            raise ValueError("the data-driven converter needs one random item per conversion")
        levels = sums.astype(np.intp)  # exact integers 0 .. s_max by construction
        codes = self.sampler.sample_bits(levels, items.transpose(2, 0, 1, 3), check=False)
        return codes.astype(self.code_dtype, copy=False)

    def fused(self) -> FusedConversion:
        return FusedConversion("sampled", self.item_dtype.itemsize, sampler=self.sampler)

    def convert_one(self, s: int, j: int, item: int) -> int:
        return self.sampler.sample_one(s, j, item)

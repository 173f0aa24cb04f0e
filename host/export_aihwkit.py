"""A measured error model in IBM's aihwkit-lightning: the closest config, its residual, and a measured-noise class.

``export_lightning(model)`` fits what an aihwkit-lightning ``TorchInferenceRPUConfig`` (v2.1) can carry of a
measured D-MAC-EM, layer by layer, and says what it cannot:

- **operands, exactly**: the macro's unsigned ``input_bits`` input codes over ``[0, input_range]`` are
  ``forward.inp_res = 2 * input_max`` steps over lightning's symmetric ``[-input_range, input_range]`` (non-negative
  inputs, as after a ReLU, land on the same grid); the per-channel symmetric ``weight_bits`` weights are
  ``modifier.quantization_type = DISCRETIZE_PER_CHANNEL`` with ``modifier.res = 2 * (2**(weight_bits-1) - 1)``.
  ``mapping.max_input_size = -1``: one input range and one weight scale per layer, as cimlab's CIM layers quantize.
- **the ADC's errors, as output noise**: the macro converts each (bit plane, row group, weight bit) partial sum
  and the host recombines the codes, so a layer's MAC carries every conversion's code error, weighted by the
  recombination, and a column's systematic errors (gain, offset) add up coherently across its conversions.
  Lightning adds one zero-mean Gaussian per output (``forward.out_noise`` times the input range times the channel's
  max weight, during training). The export matches its variance to the mean square MAC error of the layer under
  the measured model: ``out_noise = mac_noise(K) / (qmax * input_max)``, with ``mac_noise(K)`` the RMS error of
  ``MeasuredMacroNoise`` MACs of a K-input layer over uniformly random input codes and weights (estimated by
  Monte Carlo, ``MAC_NOISE_VECTORS`` vectors, fixed seed), so it depends on K (``lightning_config(in_features)``).
- **ADC resolution and range**: lightning's ``out_res``/``out_bound`` quantize a layer's whole analog sum; the
  macro's ADC digitises each conversion and the recombined MAC is an integer with no further rounding. So both stay
  off; the rounding and clipping of each conversion are in the MAC error (so in ``out_noise``), and clipping is
  reported (``levels_clipped``).
- **not carried** (no such fields in the config): per-column gain and offset (systematic, the same on every
  inference), the mean error, and the shape of ``P(code | s, column)``. ``residual`` says how much that is, and
  ``MeasuredMacroNoise`` carries all of it: it runs an ``AnalogLinear``'s MACs conversion by conversion on the
  macro's tiles (``cimlab.mapping``) and draws each code from the measured ``P(code | s, column)``.

Residual figures (``LightningExport.residual``), each (column, level) row of the model weighted equally:
``error_mean_lsb`` (the bias the config drops), ``error_rms_lsb`` (what the config carries as noise),
``systematic_fraction`` (share of the mean square error that is fixed per column and level, carried as random
noise by the config), and ``tv_distance``: the mean total-variation distance between the measured ``P(code | s, j)``
and the config's view of one conversion, a zero-mean Gaussian of ``error_rms_lsb`` around the ideal code.

aihwkit-lightning comes with the ``cimlab[aihwkit]`` extra; ``export_lightning`` and its residual need only numpy
and scipy, ``lightning_config`` and the noise class need aihwkit-lightning and torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cimlab.errmodel import MacErrorModel
from cimlab.firmware_bridge.errors import BackendUnavailable, ConfigError, ShapeError
from cimlab.firmware_bridge.files import atomic_path
from cimlab.firmware_bridge.spec import MacroSpec

if TYPE_CHECKING:
    import torch

FORMAT = "cimlab.aihwkit-lightning-export"
VERSION = 1
MAC_NOISE_VECTORS = 128
"""Random input vectors behind the Monte Carlo estimate of a layer's MAC error (``LightningExport.mac_noise``)."""


def weight_qmax(spec: MacroSpec) -> int:
    """Largest magnitude of a quantized weight, as cimlab's CIM layers quantize (``cimlab.training.quant``): the
    macro's ``weight_max`` (``2**(weight_bits-1) - 1`` for signed storage, ``2**weight_bits - 1`` where a cell group
    holds a magnitude)."""
    return spec.weight_max


@dataclass(frozen=True)
class LightningExport:
    """The fit of a measured error model to aihwkit-lightning's config (see the module docstring).

    Attributes:
        spec: the measured macro.
        inp_res: ``forward.inp_res``, steps over ``[-input_range, input_range]``.
        weight_res: ``modifier.res`` of ``DISCRETIZE_PER_CHANNEL``, states over ``[-w_max, w_max]``.
        error_rms_lsb: RMS code error of one conversion, LSB (rows weighted equally).
        error_mean_lsb: mean code error of one conversion, LSB (not carried).
        systematic_fraction: share of the mean square error that is fixed per (column, level).
        tv_distance: mean total-variation distance, measured P(code | s, j) vs the config's Gaussian view (0..1).
        levels_clipped: ideal levels above the ADC's full scale (they saturate the top code).
        source: where the model came from (chip id, conditions, conversions).
        model: the measured model (for ``mac_noise``).
    """

    spec: MacroSpec
    inp_res: int
    weight_res: int
    error_rms_lsb: float
    error_mean_lsb: float
    systematic_fraction: float
    tv_distance: float
    levels_clipped: int
    source: dict[str, Any]
    model: MacErrorModel = field(compare=False, repr=False)
    _mac_noise: dict[int, float] = field(default_factory=dict, compare=False, repr=False)

    def mac_noise(self, in_features: int) -> float:
        """RMS error of a K-input layer's MAC outputs under the measured model, MAC units (``adc_lsb`` levels):
        ``MeasuredMacroNoise`` against the exact product, uniformly random input codes and weights, seed K."""
        if in_features < 1:
            raise ConfigError(f"a layer needs at least one input, got in_features={in_features}")
        if in_features not in self._mac_noise:
            spec = self.spec
            rng = np.random.default_rng(in_features)
            x = rng.integers(0, spec.input_max + 1, (MAC_NOISE_VECTORS, in_features))
            qmax = weight_qmax(spec)
            w = rng.integers(-qmax if spec.weight_min < 0 else 0, qmax + 1, (in_features, spec.cols))
            err = MeasuredMacroNoise(self.model, seed=in_features).mac(x, w) - x @ w
            self._mac_noise[in_features] = float(np.sqrt(np.mean(err.astype(np.float64) ** 2)))
        return self._mac_noise[in_features]

    def out_noise(self, in_features: int) -> float:
        """``forward.out_noise`` for a layer with ``in_features`` inputs (relative to input range x max weight)."""
        return self.mac_noise(in_features) / (weight_qmax(self.spec) * self.spec.input_max)

    @property
    def residual(self) -> dict[str, float]:
        """What the config does not carry (see the module docstring)."""
        return {"error_mean_lsb": self.error_mean_lsb, "error_rms_lsb": self.error_rms_lsb,
                "systematic_fraction": self.systematic_fraction, "tv_distance": self.tv_distance,
                "levels_clipped": float(self.levels_clipped)}

    def to_dict(self, layers: list[int] | None = None) -> dict[str, Any]:
        """JSON-friendly: the config fields, per-layer out_noise for ``layers`` (input counts), the residual."""
        out: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "spec": self.spec.to_dict(), "source": self.source,
            "config": {
                "forward.inp_res": self.inp_res, "forward.out_res": -1, "forward.out_bound": 0.0,
                "forward.out_noise_per_channel": True, "pre_post.input_range.enable": True,
                "modifier.quantization_type": "DISCRETIZE_PER_CHANNEL", "modifier.res": self.weight_res,
                "mapping.max_input_size": -1,
            },
            "out_noise_by_in_features": {str(k): self.out_noise(k) for k in (layers or [])},
            "residual": self.residual,
            "not_carried": ["per-column gain and offset", "mean error", "shape of P(code | s, column)",
                            "per-conversion clipping"],
        }
        return out

    def save(self, path: str | os.PathLike, layers: list[int] | None = None) -> Path:
        """Write ``to_dict`` as JSON, atomically."""
        target = Path(path)
        with atomic_path(target) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(layers), indent=2) + "\n")
        return target

    def lightning_config(self, in_features: int) -> Any:
        """The ``aihwkit_lightning`` ``TorchInferenceRPUConfig`` for a layer with ``in_features`` inputs."""
        cfg_mod = _lightning_configs()
        cfg = cfg_mod.TorchInferenceRPUConfig()
        cfg.forward.inp_res = self.inp_res
        cfg.forward.out_res = -1
        cfg.forward.out_bound = 0.0
        cfg.forward.out_noise = self.out_noise(in_features)
        cfg.forward.out_noise_per_channel = True
        cfg.pre_post.input_range.enable = True
        cfg.modifier.quantization_type = cfg_mod.WeightQuantizationType.DISCRETIZE_PER_CHANNEL
        cfg.modifier.res = self.weight_res
        cfg.mapping.max_input_size = -1
        return cfg


def _lightning_configs() -> Any:
    try:
        from aihwkit_lightning.simulator import configs
    except ImportError as err:
        raise BackendUnavailable("this needs aihwkit-lightning: pip install 'cimlab[aihwkit]'") from err
    return configs


def export_lightning(model: MacErrorModel) -> LightningExport:
    """Fit aihwkit-lightning's config to a measured error model (see the module docstring)."""
    spec = model.spec
    if spec.weight_storage == "unsigned":
        raise ConfigError("aihwkit-lightning quantizes weights symmetrically; a macro with unsigned weight storage "
                          "has no matching config")
    counts = model.counts.astype(np.float64)
    totals = counts.sum(axis=-1)
    rows = totals > 0
    if not rows.any():
        raise ConfigError("the error model holds no conversions")
    codes = np.arange(spec.n_codes, dtype=np.float64)
    ideal = np.arange(spec.n_levels, dtype=np.float64) / spec.adc_lsb  # ideal analog value of a level, LSB
    p = np.where(rows[..., None], counts / np.maximum(totals, 1)[..., None], 0.0)
    err = codes[None, None, :] - ideal[None, :, None]  # [1, L, C]: code error, LSB
    row_mean = (p * err).sum(axis=-1)[rows]
    row_ms = (p * err**2).sum(axis=-1)[rows]
    mean = float(row_mean.mean())
    ms = float(row_ms.mean())
    rms = float(np.sqrt(ms))
    systematic = float((row_mean**2).mean() / ms) if ms > 0 else 0.0
    tv = float(0.5 * np.abs(p[rows] - gaussian_rows(spec, rms)[np.nonzero(rows)[1]]).sum(axis=-1).mean())
    return LightningExport(
        spec=spec, inp_res=2 * spec.input_max, weight_res=2 * weight_qmax(spec), error_rms_lsb=rms,
        error_mean_lsb=mean, systematic_fraction=systematic, tv_distance=tv,
        levels_clipped=int(max(0, spec.s_max - spec.adc_full_scale)),
        source={"chip_id": model.model.chip_id, "conditions": model.model.conditions,
                "conversions": int(counts.sum())},
        model=model,
    )


def gaussian_rows(spec: MacroSpec, sigma_lsb: float) -> np.ndarray:
    """P(code | s) [L, C] of a zero-mean Gaussian error of ``sigma_lsb`` around each level's ideal value,
    rounded to codes and clipped to the ADC's range (sigma 0: the ideal transfer)."""
    from scipy.special import ndtr

    x = np.arange(spec.n_levels, dtype=np.float64)[:, None] / spec.adc_lsb
    edges = np.arange(spec.n_codes + 1, dtype=np.float64)[None, :] - 0.5
    if sigma_lsb <= 0:
        out = np.zeros((spec.n_levels, spec.n_codes))
        out[np.arange(spec.n_levels), spec.ideal_codes(np.arange(spec.n_levels))] = 1.0
        return out
    cdf = ndtr((edges - x) / sigma_lsb)
    cdf[:, 0], cdf[:, -1] = 0.0, 1.0
    return np.diff(cdf, axis=1)


# ---- the measured noise, for what the config cannot carry --------------------------------------------------
class MeasuredMacroNoise:
    """MACs of integer operands run as the macro runs them, each code drawn from the measured P(code | s, column).

    The layer is cut into the macro's tiles (``cimlab.mapping.map_layer``); each tile's partial sums are the
    MacroSpec's reference ``ideal_levels``, each conversion's code is drawn from the model's table for that
    physical column (``MacErrorModel.sample``), and the codes are recombined as the macro's back end does
    (``MacroSpec.recombine``). ``applied_to(lightning_model)`` makes every ``AnalogLinear`` of a model compute its
    outputs this way in eval mode.

    Args:
        model: the measured error model.
        seed: seed of the code draws (``reseed`` starts a new stream).
    """

    def __init__(self, model: MacErrorModel, seed: int = 0) -> None:
        self.model = model
        self.spec = model.spec
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Restart the draws from ``seed``."""
        self.rng = np.random.default_rng(seed)

    def mac(self, inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """MAC outputs [N, M] (units of ``adc_lsb`` levels) of input codes [N, K] and signed weights [K, M]."""
        from cimlab.mapping import map_layer

        spec = self.spec
        x = np.asarray(inputs, dtype=np.int64)
        w = np.asarray(weights, dtype=np.int64)
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
            raise ShapeError(f"inputs [N, K] and weights [K, M] expected, got {list(x.shape)} and {list(w.shape)}")
        if x.min(initial=0) < 0 or x.max(initial=0) > spec.input_max:
            raise ConfigError(f"input codes must lie in 0..{spec.input_max}")
        if w.min(initial=0) < spec.weight_min or w.max(initial=0) > spec.weight_max:
            raise ConfigError(f"weights must lie in {spec.weight_min}..{spec.weight_max}")
        out = np.zeros((x.shape[0], w.shape[1]), dtype=np.int64)
        for tile in map_layer(spec, w.shape[0], w.shape[1]).tiles:
            macro_w = np.zeros((spec.rows, spec.cols), dtype=np.int64)
            macro_w[tile.macro_row : tile.macro_row + tile.n_rows, tile.macro_col : tile.macro_col + tile.n_cols] = (
                w[tile.row0 : tile.row1, tile.col0 : tile.col1])
            xt = x[:, tile.row0 : tile.row1]
            # contiguous: CodeSampler.sample_bits loses its draws on a strided array (it writes into a copy)
            levels = np.ascontiguousarray(spec.ideal_levels(xt, macro_w, tile.macro_row))
            codes = self.model.sample(levels, self.rng)
            y = spec.recombine(codes, xt)
            out[:, tile.col0 : tile.col1] += y[:, tile.macro_col : tile.macro_col + tile.n_cols]
        return out

    def linear(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """An aihwkit-lightning ``AnalogLinear``'s output for input x [..., K] under the measured errors.

        The layer's own quantizers, as its config sets them (``lightning_config``): x clipped to
        ``[-input_range, input_range]`` on ``2 * input_max`` steps (negative codes are refused: the macro's inputs
        are unsigned), weights per channel on ``2 * qmax`` states.
        """
        import torch

        spec = self.spec
        cfg = layer.rpu_config
        if cfg.forward.inp_res != 2 * spec.input_max or cfg.modifier.res != 2 * weight_qmax(spec):
            raise ConfigError("the layer's rpu_config does not quantize as this macro (use lightning_config)")
        if len(layer.in_sizes) != 1:
            raise ConfigError("the layer is split into tiles by lightning (mapping.max_input_size); use -1")
        qmax = weight_qmax(spec)
        ir = layer.input_range.detach().reshape(-1)[0].to(torch.float64)
        step = 2 * ir / cfg.forward.inp_res
        xf = x.detach().reshape(-1, layer.in_features).to(torch.float64)
        codes = torch.round(torch.clamp(xf, -ir, ir) / step)
        if (codes < 0).any():
            raise ConfigError(f"{type(layer).__name__}: negative inputs; the macro takes unsigned input codes "
                              "(feed it after a ReLU)")
        wf = layer.weight.detach().to(torch.float64)
        scale = wf.abs().amax(dim=1) / qmax
        q = torch.clamp(torch.round(wf / torch.where(scale > 0, scale, 1.0)[:, None]), -qmax, qmax)
        mac = self.mac(codes.to(torch.int64).numpy(), q.to(torch.int64).numpy().T)
        y = torch.from_numpy(mac).to(torch.float64) * step * scale[None, :]
        if layer.bias is not None:
            y = y + layer.bias.detach().to(torch.float64)
        return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

    @contextmanager
    def applied_to(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the block, every ``AnalogLinear`` of ``model`` in eval mode computes under the measured errors."""
        try:
            from aihwkit_lightning.nn import AnalogLinear
        except ImportError as err:
            raise BackendUnavailable("this needs aihwkit-lightning: pip install 'cimlab[aihwkit]'") from err

        def hook(layer: Any, args: tuple[Any, ...], output: Any) -> Any:
            return output if layer.training else self.linear(layer, args[0])

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, AnalogLinear)]
        if not handles:
            raise ConfigError("the model has no aihwkit-lightning AnalogLinear layer")
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def to_lightning(model: torch.nn.Module, export: LightningExport) -> torch.nn.Module:
    """A torch model with its ``nn.Linear`` layers converted to aihwkit-lightning's, each with its layer's config."""
    try:
        from aihwkit_lightning.nn import AnalogLinear
        from aihwkit_lightning.nn.conversion import convert_to_analog
    except ImportError as err:
        raise BackendUnavailable("this needs aihwkit-lightning: pip install 'cimlab[aihwkit]'") from err
    analog = convert_to_analog(model, export.lightning_config(1))
    for m in analog.modules():
        if isinstance(m, AnalogLinear):
            m.rpu_config = export.lightning_config(m.in_features)
    return analog


def lightning_to_checkpoint(analog: torch.nn.Module, path: str | os.PathLike, *, spec: MacroSpec, task: str,
                            model_name: str, model_kwargs: dict[str, Any] | None = None) -> Path:
    """Save a lightning model as a cimlab checkpoint (mode ``quant``) of ``model_name``: the same weights, biases
    and other parameters, each CIM layer's E-PACT bounds ``[0, input_range]``; ``cimlab evaluate``,
    ``compile`` and ``deploy`` then run it on the chip."""
    import torch
    from aihwkit_lightning.nn import AnalogLinear

    from cimlab.training.checkpoint import save_checkpoint
    from cimlab.training.layers import cim_layers, convert
    from cimlab.training.models import build_model

    kwargs = dict(model_kwargs or {})
    net = build_model(model_name, **kwargs)
    convert(net, spec, learn="epact")
    state = net.state_dict()
    layers = dict(cim_layers(net))
    for name, m in analog.named_modules():
        if isinstance(m, AnalogLinear):
            if name not in layers:
                raise ConfigError(f"{model_name} has no CIM layer {name!r} for the lightning layer of that name")
            if len(m.in_sizes) != 1:
                raise ConfigError(f"lightning layer {name!r} is split into tiles; export with max_input_size -1")
            state[f"{name}.weight"] = m.weight.detach().clone()
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach().clone()
            state[f"{name}.act.lo"] = torch.tensor(0.0)
            state[f"{name}.act.hi"] = m.input_range.detach().reshape(-1)[0].clone()
            state[f"{name}.act.calibrated"] = torch.tensor(True)
        elif name and not list(m.children()):
            for key, value in m.state_dict().items():
                state[f"{name}.{key}"] = value.detach().clone()
    net.load_state_dict(state, strict=True)
    manifest = {"task": task, "model": {"name": model_name, "kwargs": kwargs}, "mode": "quant",
                "spec": spec.to_dict(), "quantizer": "epact", "train": {"source": "aihwkit-lightning"}}
    return save_checkpoint(path, net.eval(), manifest)


def summary_lines(export: LightningExport, layers: list[int]) -> list[str]:
    """The export for people."""
    r = export.residual
    lines = [
        f"aihwkit-lightning TorchInferenceRPUConfig for {export.spec.describe()}:",
        f"  forward.inp_res = {export.inp_res}, pre_post.input_range.enable = True, "
        f"modifier: DISCRETIZE_PER_CHANNEL res = {export.weight_res}, mapping.max_input_size = -1",
        "  forward.out_res = -1, out_bound = 0 (the macro's ADC rounds each conversion; its error is in out_noise)",
    ]
    lines += [f"  forward.out_noise = {export.out_noise(k):.6g} for a layer of {k} inputs "
              f"(MAC error {export.mac_noise(k):.3g} rms, random operands)" for k in layers]
    lines += [
        f"residual: error per conversion {r['error_rms_lsb']:.4f} LSB rms (in out_noise), mean "
        f"{r['error_mean_lsb']:+.4f} LSB (dropped); {r['systematic_fraction'] * 100:.1f} % of the mean square "
        f"error is fixed per column and level (carried as random); P(code | s, column) vs the config's Gaussian: "
        f"total variation {r['tv_distance']:.4f}; {export.levels_clipped} level(s) above the ADC's full scale",
        "not carried by the config: per-column gain and offset, the mean error, the shape of P(code | s, column): "
        "use cimlab.export_aihwkit.MeasuredMacroNoise",
    ]
    return lines


__all__ = [
    "LightningExport",
    "MeasuredMacroNoise",
    "export_lightning",
    "gaussian_rows",
    "lightning_to_checkpoint",
    "summary_lines",
    "to_lightning",
]

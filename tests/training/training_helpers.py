"""Small error models and specs for the training tests (built in memory, no twin needed)."""

from __future__ import annotations

import numpy as np

from cimlab.firmware_bridge.errmodel import ErrorModel
from cimlab.firmware_bridge.spec import MacroSpec


def ideal_model(spec: MacroSpec, count: int = 10) -> ErrorModel:
    """An error model whose every (column, level) always reads the ideal code."""
    counts = np.zeros((spec.physical_cols, spec.n_levels, spec.n_codes), dtype=np.int64)
    counts[:, np.arange(spec.n_levels), spec.ideal_codes(np.arange(spec.n_levels))] = count
    return ErrorModel(spec, counts, chip_id="ideal-test")


def noisy_model(spec: MacroSpec, seed: int = 0, *, noise: float = 0.6, offset: float = 0.4, gain: float = 0.05,
                draws: int = 400, observed: float = 1.0) -> ErrorModel:
    """Counts drawn from a Gaussian analog value per (column, level): gain and offset per column, noise per draw,
    then the ideal ADC thresholds; a fraction ``1 - observed`` of (column, level) rows is left unmeasured."""
    rng = np.random.default_rng(seed)
    J, L, C = spec.physical_cols, spec.n_levels, spec.n_codes
    g = 1.0 + gain * rng.standard_normal(J)
    o = offset * rng.standard_normal(J)
    analog = g[:, None] * np.arange(L)[None, :] / spec.adc_lsb + o[:, None]  # [J, L] in codes
    samples = analog[:, :, None] + noise * rng.standard_normal((J, L, draws))
    codes = np.clip(np.floor(samples + 0.5), 0, spec.adc_max).astype(np.int64)
    counts = np.zeros((J, L, C), dtype=np.int64)
    jj, ss = np.meshgrid(np.arange(J), np.arange(L), indexing="ij")
    np.add.at(counts, (jj[:, :, None], ss[:, :, None], codes), 1)
    if observed < 1.0:
        counts[rng.random((J, L)) >= observed] = 0
    return ErrorModel(spec, counts, chip_id="noisy-test", provenance={"seed": seed})


SMALL_LOSSY = MacroSpec(rows=40, cols=6, weight_bits=4, weight_storage="offset", cell_bits=2, input_bits=4,
                        input_slice_bits=2, rows_per_conversion=8, adc_bits=3, adc_full_scale=7)
"""Offset weights in 2-bit cells, 2-bit input pulses, an ADC that clips (8-row groups of 3 x 3 reach 72 levels)."""
SMALL_ODD = MacroSpec(rows=23, cols=5, weight_bits=3, weight_storage="unsigned", cell_bits=1, input_bits=5,
                      input_slice_bits=2, rows_per_conversion=5, adc_bits=3, adc_full_scale=12)
"""Unsigned 3-bit weights, 5-bit inputs in 2-bit slices (the last slice holds one bit), 5-row groups, a non-integer
ADC step (12/7 levels per code)."""
SMALL_TWOS = MacroSpec(rows=32, cols=8, weight_bits=4, weight_storage="twos", cell_bits=1, input_bits=4,
                       input_slice_bits=1, rows_per_conversion=8, adc_bits=4, adc_full_scale=15)
"""A small bit-serial two's-complement macro whose ADC resolves every level (lossless)."""

SMALL_DIFF = MacroSpec(rows=24, cols=5, weight_bits=3, weight_storage="differential", cell_bits=2, input_bits=3,
                       input_slice_bits=1, rows_per_conversion=6, adc_bits=4, adc_full_scale=15)
"""Differential 3-bit magnitudes in 2-bit cells (two a side, the top one holding 1 bit), bit-serial inputs, an ADC
that clips above 15 of the 18 levels."""


def sim_url(spec: MacroSpec, profile: str = "ideal") -> str:
    """A sim:// URL of the twin profile with ``spec``'s fields as overrides."""
    fields = "&".join(f"{k}={v}" for k, v in spec.to_dict().items())
    return f"sim://?profile={profile}&{fields}"


def train_population_twice(epochs: int, **fit_options: object) -> tuple[list, list]:
    """Train the same small digits MLP twice, from the same seeds, through a population of two noisy chips of
    ``SMALL_TWOS`` (calibration batches on): ([chip transfers], [trained models]). Imports torch lazily."""
    import torch

    from cimlab.training.layers import calibrate, convert
    from cimlab.training.loop import TrainConfig, fit
    from cimlab.training.models import digits_mlp
    from cimlab.training.tasks import load_task
    from cimlab.training.transfer import Transfer

    data = load_task("digits", limit=64)
    chips = [Transfer.from_model(noisy_model(SMALL_TWOS, seed=s), pooled=False) for s in (1, 2)]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = convert(digits_mlp(hidden=8), SMALL_TWOS, chips[0], seed=0)
        calibrate(model, [data.x_train[:32]])
        fit(model, data, TrainConfig(epochs=epochs, batch_size=16, seed=3), evaluate_each_epoch=False,
            population=chips, calibration=[data.x_train[:32]], **fit_options)
        models.append(model)
    return chips, models

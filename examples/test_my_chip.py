"""Hardware tests for a CIM chip, written once: on the twin in CI, on a board at the bench.

    pytest examples/test_my_chip.py                                   # the twin (sim://), as CI runs it
    pytest examples/test_my_chip.py --cimlab-link /dev/ttyUSB0?baud=3000000   # a board at the bench
    pytest examples/test_my_chip.py --cimlab-error-model runs/chip1/dmacem.npz

The fixtures and the marker come from cimlab's pytest plugin (installed with cimlab). Read the geometry from
``chip.spec``: a board is what it is, whatever profile the twin runs.
"""

import numpy as np
import pytest


def test_weights_read_back(chip):
    """Every cell stores what was written."""
    spec = chip.spec
    rng = np.random.default_rng(1)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    chip.write_weights(w)
    assert (chip.read_weights() == w).all()


def test_mac_tracks_the_ideal(chip, error_model):
    """MACs stay within 5 sigma of x @ W, sigma from the chip's own error model."""
    spec = chip.spec
    rng = np.random.default_rng(2)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (64, spec.rows))
    chip.write_weights(w)
    err = chip.mac(x) - x @ w
    # one conversion's code spread, scaled by the recombination weights of all conversions of an output
    sigma_code = np.nanmax(error_model.sigma(pooled=True))
    scale = np.sqrt(spec.n_groups * (spec.plane_weights() ** 2).sum() * (spec.slice_weights() ** 2).sum())
    bias = np.abs(np.nanmean(error_model.gain_offset().offset)) * spec.n_groups * scale
    assert np.abs(err).max() <= 5 * sigma_code * scale * spec.adc_lsb + bias + 1


@pytest.mark.cimlab(profile="ideal", needs="twin")
def test_ideal_twin_is_exact(chip):
    """On the ideal twin the chip computes x @ W exactly (skipped on a board)."""
    spec = chip.spec
    rng = np.random.default_rng(3)
    w = rng.integers(spec.weight_min, spec.weight_max + 1, (spec.rows, spec.cols))
    x = rng.integers(0, spec.input_max + 1, (16, spec.rows))
    chip.write_weights(w)
    assert (chip.mac(x) == x @ w).all()


@pytest.mark.cimlab(needs="board")
def test_die_temperature_in_range(chip):
    """The die reports a plausible temperature (a board only: the twin's is a setting)."""
    assert -40.0 <= chip.read_reg("TEMP_CC") / 100.0 <= 125.0


def test_served_twin_over_a_pty(twin_server):
    """A twin behind a real pty answers the same bytes a board would."""
    from cimlab import Chip

    with Chip.open(twin_server) as served:
        assert served.hello.bitstream_id == "twin"
        assert served.ping(b"cimlab") >= 0
